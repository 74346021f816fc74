#!/usr/bin/env python3
"""Write tests/reference/data/python_written.safetensors with the real `safetensors` library.

tests/unit/test_safetensors.c reads the file with strata's reader and recomputes every value from
the same formulas, so the C reader is checked against the format as the reference implementation
writes it (header layout, padding, dtype names, 0-d and zero-size tensors, metadata).

    pip install safetensors numpy
    python3 tools/reference/safetensors_fixture.py [out_path]

BF16 is absent: numpy has no bfloat16 (the C round-trip test covers it).
"""
import os
import sys

import numpy as np
from safetensors.numpy import save_file


def tensors():
    # Keep these formulas in sync with python_fixture_expect() in tests/unit/test_safetensors.c.
    return {
        "f32.arange": (np.arange(6, dtype=np.float32) * 0.5 - 1.0).reshape(2, 3),
        "f64.scalar": np.array(np.pi, dtype=np.float64),  # 0-d
        "f16.ramp": ((np.arange(4) - 1.5) * 0.25).astype(np.float16),
        "i32.square": (np.arange(6, dtype=np.int32) ** 2 - 7).reshape(3, 2),
        "i64.big": np.arange(3, dtype=np.int64) * (1 << 33) - 5,
        "u8.mod": ((np.arange(5) * 37) % 256).astype(np.uint8),
        "bool.even": np.arange(4) % 2 == 0,
        "f32.empty": np.zeros((0, 3), dtype=np.float32),  # zero-size
    }


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests/reference/data/python_written.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors(), out, metadata={"format": "np", "writer": "safetensors_fixture.py"})
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()

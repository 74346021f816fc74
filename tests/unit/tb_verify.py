#!/usr/bin/env python3
"""Reads strata's TensorBoard event file with TensorBoard's own reader (skips, exit 77, when the
tensorboard package is not installed). Usage: tb_verify.py TEST_METRICS_EXE"""
import subprocess, sys, tempfile

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print("tensorboard is not installed: skipped (scripts/test installs it from PyPI)")
    sys.exit(77)

with tempfile.TemporaryDirectory() as d:
    subprocess.run([sys.argv[1], "--write-tb", d], check=True)
    acc = EventAccumulator(d)
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    assert tags == ["train/loss", "train/lr"], tags
    loss = acc.Scalars("train/loss")
    lr = acc.Scalars("train/lr")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5], loss
    # values are float32 on disk: compare at float32 resolution
    for e in loss:
        assert abs(e.value - 1.0 / e.step) <= 1e-7, e
        assert e.wall_time == 1700000000.0 + e.step, e
    for e in lr:
        assert abs(e.value - 1e-4 * e.step) <= 1e-7 * e.value + 1e-12, e
    print("tensorboard read %d + %d scalars back" % (len(loss), len(lr)))

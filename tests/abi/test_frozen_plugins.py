#!/usr/bin/env python3
"""A plugin compiled against the FROZEN v1 headers (tests/abi/v1) loads into and trains with the
current runtime. The plugins are the SDK examples (plugins/examples/tiny_mlp and local_sgd),
compiled by tests/plugin/meson.build with tests/abi/v1 as their only strata include path.
Usage: test_frozen_plugins.py STRATA MODEL_SO STRATEGY_SO
Checks: `strata plugins`-style loading succeeds (training starts and names both plugins and their
paths), 40 steps run, and the loss falls (mean of the last 10 steps below 0.7x the first 5: the
teacher task is learnable, measured ~0.3x) — a struct read at a wrong offset would crash, fail
to load, or train garbage."""
import json, os, shutil, subprocess, sys, tempfile

strata, model_so, strategy_so = sys.argv[1:4]
tmp = tempfile.mkdtemp(prefix="strata-abi-")
cfg = {
    "train_micro_batch_size_per_gpu": 8,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    "model": {"plugin": model_so, "in_features": 8, "hidden": 32, "out_features": 2},
    "strategy": {"plugin": strategy_so, "sync_every": 2},
    "data": {"synthetic": {"num_samples": 256}},
    "train": {"max_steps": 40, "seed": 11, "output_path": os.path.join(tmp, "out")},
    "device": {"threads": 1},
}
path = os.path.join(tmp, "cfg.json")
with open(path, "w") as f:
    json.dump(cfg, f)
p = subprocess.run([strata, "validate", path], capture_output=True, text=True, timeout=120)
ok = p.returncode == 0 and model_so in p.stdout and strategy_so in p.stdout
if not ok:
    print("FAIL: strata validate did not load both frozen-header plugins:\n" + p.stdout + p.stderr)
    sys.exit(1)
p = subprocess.run([strata, "train", path], capture_output=True, text=True, timeout=300)
if p.returncode != 0 or "training tiny_mlp with local_sgd" not in p.stderr:
    print("FAIL: training with the frozen-header plugins: exit %d\n%s" % (p.returncode, p.stderr[-3000:]))
    sys.exit(1)
loss = [json.loads(l)["train/loss"] for l in open(os.path.join(tmp, "out", "metrics.jsonl"))]
first, last = sum(loss[:5]) / 5, sum(loss[-10:]) / 10
print("steps %d, loss first-5 mean %.4f, last-10 mean %.4f" % (len(loss), first, last))
if len(loss) != 40 or not last < 0.7 * first:
    print("FAIL: expected 40 steps and a falling loss")
    sys.exit(1)
shutil.rmtree(tmp, ignore_errors=True)

#!/usr/bin/env python3
"""The expert_parallel strategy end to end through `strata launch` on the tiny Qwen3-VL-MoE demo
(loopback, Gloo).
Usage: test_train_ep.py STRATA SOURCE_ROOT CASE
  equivalence  local x1 (the reference: every expert here, the core's local MoE exchange),
               expert_parallel EP=1 x1 (dense ddp), EP=2 x2 (dense ddp), EP=4 x4 (dense fsdp) and
               EP=2 x DP=2 on 4 ranks (dense ddp), all at the same global batch of 8 samples made of
               the same micro-batches of 2 (ranks x accumulation = 4), 32 experts top-2 so that some
               experts get no token in a micro-batch: the same loss, CE, aux loss and load metrics at
               every step and the same final parameters. Then micro-batches of 1: EP=2 x DP=2 (dense
               fsdp) with 2 accumulation micro-steps vs local x1 with 8, for 12 steps.
  reshard      EP=4 x4 (fsdp) saves at step 4; the run resumes with EP=2 x2 (ddp), then EP=1 x1, then
               the plain local strategy, and every step's loss equals the uninterrupted local run's
               (experts are saved under their global names and offsets).
  config       expert_parallel_size 3 on 2 ranks and 32 experts on 3 ranks with EP=3 fail at start-up
               with the numbers in the message.
Tolerance: fp32 throughout. The same samples reach the same micro-batches and the same experts, but
gradients are summed in a different order (all-reduce of per-rank partial sums, the all-to-all moves
expert rows between ranks, expert gradients are summed over the expert-data-parallel group and
divided by the world size): a few ulps per step, growing slowly through Adam. 1e-5 relative on the
losses and metrics (seen: 1e-7 to 3e-7). Parameters after 20 AdamW steps, per tensor |a-b| / max|b|:
2e-4 on expert tensors (seen <= 9.3e-5) and 1e-3 on the others: this model's floor is set by the vision
tower's fc1, whose tiny gradients Adam normalises to full-size steps, so rounding in the gradient sum
moves it by ~2e-4 already for plain ddp x2 vs local x1 without any expert parallelism (measured
1.6e-4). A missing 1/world on the expert gradients, a wrong expert slice or a mis-permuted row shows
up at 1e-2 or worse."""
import json, os, struct, subprocess, sys, tempfile

STRATA, ROOT, CASE = sys.argv[1], sys.argv[2], sys.argv[3]
DEMO = os.path.join(ROOT, "configs/demo/qwen3_vl_moe_tiny.json")
failures = []
GLOBAL, MICRO = 8, 2
METRICS = ["train/loss", "lm/ce_loss", "moe/aux_loss", "moe/load_cv", "moe/empty_experts"]


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def train(out, ranks, strategy, steps, extra=(), expect_ok=True, micro=MICRO):
    """strategy: "local" or (ep_size, dense_name)"""
    gas = max(GLOBAL // (ranks * micro), 1)
    sets = ["train.output_path=" + out, "train.max_steps=%d" % steps, "train_micro_batch_size_per_gpu=%d" % micro,
            "gradient_accumulation_steps=%d" % gas, "gradient_clipping=1.0", "data.synthetic.num_samples=64",
            "device.comm_timeout_s=60", "device.threads=1", "model.overrides.num_experts=32",
            "train.save_steps=%d" % steps]
    if strategy == "local":
        sets.append("strategy.name=local")
    else:
        sets += ["strategy.name=expert_parallel", "strategy.expert_parallel_size=%d" % strategy[0],
                 "strategy.dense.name=" + strategy[1]]
    args = []
    for s in list(sets) + list(extra):
        args += ["--set", s]
    cmd = [STRATA, "launch", "--num_processes", str(ranks), "--log_dir", os.path.join(out, "logs"), "--",
           STRATA, "train", DEMO] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    if expect_ok:
        check(p.returncode == 0, "%s x%d: exit %d\n%s" % (strategy, ranks, p.returncode, log[-3000:]))
    else:
        check(p.returncode != 0, "%s x%d: exit 0 but an error was expected\n%s" % (strategy, ranks, log[-3000:]))
    return log


def metrics(out):
    res = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for j in map(json.loads, f):
            if "train/loss" in j:
                res[j["step"]] = j
    return res


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = struct.unpack("<%df" % ((b - a) // 4), data[a:b])
    return out


def final_params(out, tmp):
    """the checkpoint consolidated by `strata export` (expert slices live in per-rank files)"""
    latest = open(os.path.join(out, "latest")).read().strip()
    dest = os.path.join(tmp, "export-" + os.path.basename(out))
    p = subprocess.run([STRATA, "export", os.path.join(out, latest), "--format", "safetensors", "--out", dest],
                       capture_output=True, text=True, timeout=300)
    check(p.returncode == 0, "export of %s failed:\n%s" % (out, p.stderr))
    params = {}
    for f in (os.listdir(dest) if p.returncode == 0 else []):
        if f.endswith(".safetensors"):
            params.update(read_safetensors(os.path.join(dest, f)))
    return params


def compare_params(a, b, what, rtol_experts=2e-4, rtol=1e-3):
    check(len(b) > 0 and sorted(a) == sorted(b), "%s: tensor names differ" % what)
    check(any(".experts." in k for k in b), "%s: no expert tensor in the export" % what)
    worst = [0.0, 0.0]  # experts, others
    for k in a:
        if k not in b:
            continue
        scale = max(max(abs(x) for x in b[k]), 1e-12)
        d = max(abs(x - y) for x, y in zip(a[k], b[k])) / scale
        tol = rtol_experts if ".experts." in k else rtol
        check(d <= tol, "%s: %s differs by %.3g relative (tolerance %g)" % (what, k, d, tol))
        i = 0 if ".experts." in k else 1
        worst[i] = max(worst[i], d)
    return worst


def compare_metrics(ma, mb, steps, what, keys=METRICS, rtol=1e-5):
    worst = 0.0
    for s in steps:
        for k in keys:
            if s not in ma or s not in mb or k not in ma[s] or k not in mb[s]:
                check(False, "%s: step %d has no %s" % (what, s, k))
                continue
            a, b = ma[s][k], mb[s][k]
            worst = max(worst, abs(a - b) / max(abs(b), 1e-6))
    check(worst <= rtol, "%s: %s differ by %.3g relative (tolerance %g)" % (what, "/".join(keys), worst, rtol))
    return worst


def case_equivalence(tmp):
    steps = 20
    ref = os.path.join(tmp, "local1")
    train(ref, 1, "local", steps)
    mref, pref = metrics(ref), final_params(ref, tmp)
    check(steps in mref and mref[steps]["train/loss"] < mref[1]["train/loss"], "the loss did not fall")
    check(any(m.get("moe/empty_experts", 0) > 0 for m in mref.values()),
          "no micro-batch left an expert without tokens: the idle-expert path is not exercised")
    for ranks, ep, dense in [(1, 1, "ddp"), (2, 2, "ddp"), (4, 4, "fsdp"), (4, 2, "ddp")]:
        out = os.path.join(tmp, "ep%d-%s-x%d" % (ep, dense, ranks))
        log = train(out, ranks, (ep, dense), steps)
        check("expert-parallel size %d" % ep in log and "expert-data-parallel size %d" % (ranks // ep) in log,
              "EP=%d x%d: the strategy did not report its groups:\n%s" % (ep, ranks, log[-2000:]))
        what = "expert_parallel EP=%d x DP=%d (dense %s) vs local x1" % (ep, ranks // ep, dense)
        wl = compare_metrics(metrics(out), mref, range(1, steps + 1), what)
        wp = compare_params(final_params(out, tmp), pref, what)
        print("%s: metrics %.2g, expert params %.2g, other params %.2g relative" % (what, wl, wp[0], wp[1]))
    # micro-batches of 1: gradient accumulation (2 micro-steps) with an expert-data-parallel group of 2,
    # against local x1 with 8 micro-steps of 1. 12 steps: with micro-batches of 1 this run meets a
    # near-tie in the router's top-k at step 18, where the ~1e-7 rounding drift flips one token's
    # expert and the curves separate by 1e-4 (plain ddp x4 happens not to flip). Resuming local x1
    # and EP=2 x DP=2 from the same step-17 checkpoint agreed to 1e-8 on steps 18-20, load metrics
    # included, so that is drift, not the exchange.
    steps = 12
    ref1 = os.path.join(tmp, "local1-micro1")
    train(ref1, 1, "local", steps, micro=1)
    mref1, pref1 = metrics(ref1), final_params(ref1, tmp)
    out = os.path.join(tmp, "ep2-fsdp-x4-micro1")
    train(out, 4, (2, "fsdp"), steps, micro=1)
    what = "expert_parallel EP=2 x DP=2 (dense fsdp), micro-batch 1 x 2 accumulation vs local x1 (1 x 8)"
    wl = compare_metrics(metrics(out), mref1, range(1, steps + 1), what)
    # parameters: 1e-3 on every tensor here: with micro-batches of 1 rarely-routed experts get tiny
    # gradients that Adam normalises, and plain ddp x4 (no EP) already ends 3.3e-4 from local x1 on
    # expert tensors (fsdp x4: 2.7e-4)
    wp = compare_params(final_params(out, tmp), pref1, what, rtol_experts=1e-3)
    print("%s: metrics %.2g, expert params %.2g, other params %.2g relative" % (what, wl, wp[0], wp[1]))


def case_reshard(tmp):
    steps = 10
    ref = os.path.join(tmp, "ref")
    train(ref, 1, "local", steps)
    mref = metrics(ref)
    out = os.path.join(tmp, "run")
    train(out, 4, (4, "fsdp"), 4)
    for ranks, strategy, until in [(2, (2, "ddp"), 6), (1, (1, "ddp"), 8), (1, "local", 10)]:
        log = train(out, ranks, strategy, until, ["train.resume=latest"])
        check("resumed from" in log, "%s x%d did not resume:\n%s" % (strategy, ranks, log[-2000:]))
    compare_metrics(metrics(out), mref, range(1, steps + 1), "EP4 x4 -> EP2 x2 -> EP1 x1 -> local x1",
                    keys=["train/loss", "moe/aux_loss"])
    compare_params(final_params(out, tmp), final_params(ref, tmp), "resharded run vs local")


def case_config(tmp):
    log = train(os.path.join(tmp, "w"), 2, (3, "ddp"), 1, expect_ok=False)
    check("world size 2 is not divisible by strategy.expert_parallel_size 3" in log,
          "no world-size message:\n%s" % log[-2000:])
    log = train(os.path.join(tmp, "e"), 3, (3, "ddp"), 1, expect_ok=False)
    check("has 32 experts, not divisible by strategy.expert_parallel_size 3" in log,
          "no expert-count message:\n%s" % log[-2000:])


with tempfile.TemporaryDirectory(prefix="strata-ep-") as tmp:
    {"equivalence": case_equivalence, "reshard": case_reshard, "config": case_config}[CASE](tmp)
print("%s: %d failure(s)" % (CASE, len(failures)))
sys.exit(1 if failures else 0)

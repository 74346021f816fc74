#!/usr/bin/env python3
"""The expert_parallel strategy end to end through `strata launch` on the tiny Qwen3-VL-MoE demo
(loopback, Gloo).
Usage: test_train_ep.py STRATA SOURCE_ROOT CASE
  equivalence  local x1 (the reference: every expert here, the core's local MoE exchange),
               expert_parallel EP=1 x1 (dense ddp), EP=2 x2 (dense ddp), EP=4 x4 (dense fsdp) and
               EP=2 x DP=2 on 4 ranks (dense ddp), all at the same global batch of 8 samples in two
               global micro-batches of 4 (the ranks' micro-batches at one accumulation step: 4 x 1
               rank, 2 x 2, 1 x 4), 32 experts top-2 so that some experts get no token in a
               micro-batch: the same loss, CE, aux loss and load metrics at every step and the same
               final parameters. The aux loss and the load metrics come from router statistics
               summed over the ranks, so they are the global micro-batch's on every rank count.
               Then the loss normalisation: with the aux loss off, EP=2 x DP=2 (dense fsdp) with
               micro-batches of 1 and 2 accumulation steps vs local x1 with one micro-batch of 8
               for 12 steps. The synthetic samples have different numbers of labelled tokens, so
               this holds only because the loss is the mean over every labelled token of the global
               batch (a per-micro-batch mean would weight tokens differently).
  reshard      EP=4 x4 (fsdp) saves at step 4; the run resumes with EP=2 x2 (ddp), then EP=1 x1, then
               the plain local strategy (global micro-batches of 4 throughout), and every step's loss
               equals the uninterrupted local run's (experts are saved under their global names and
               offsets).
  config       expert_parallel_size 3 on 2 ranks and 32 experts on 3 ranks with EP=3 fail at start-up
               with the numbers in the message.
Tolerances. The runs compute in fp64 (model.dtype=fp64): the same samples reach the same global
micro-batches and the same experts, and what differs is only the order of sums (per-rank partial
sums all-reduced, expert rows moved between ranks, expert gradients summed over the
expert-data-parallel group). Those ulps grow through Adam, which turns tiny gradients into
full-size steps: losses, gradient norms and metrics agree to ~1e-16 at step 1 and to 1.3e-11 at step
19 (EP=2 x2), so 1e-9 relative; the parameters after the AdamW steps to 1e-6 (compared as `strata
export` writes them, fp32; seen 8.6e-8). A wrong scale on the aux loss's router gradient, a missing 1/world on the expert gradients,
a wrong expert slice or a mis-permuted row shows up at 1e-4 or worse. One fp32 run (EP=2 x DP=2)
checks the default precision: 1e-4 on the losses, gradient norms and metrics (seen 2.1e-5, the
gradient norm) and 1e-3 on the parameters, because Adam
normalises the tiny gradients of rarely-routed experts and of the vision tower's fc1 into full-size
steps, so fp32 rounding in a gradient sum moves them by ~3e-4 already for plain ddp x4 vs local x1
(measured)."""
import json, os, struct, subprocess, sys, tempfile

STRATA, ROOT, CASE = sys.argv[1], sys.argv[2], sys.argv[3]
DEMO = os.path.join(ROOT, "configs/demo/qwen3_vl_moe_tiny.json")
failures = []
GLOBAL, GLOBAL_MICRO = 8, 4  # samples per step, and per accumulation step over all ranks
METRICS = ["train/loss", "train/grad_norm", "lm/ce_loss", "moe/aux_loss", "moe/load_cv", "moe/empty_experts"]


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def train(out, ranks, strategy, steps, extra=(), expect_ok=True, micro=None, dtype="fp64"):
    """strategy: "local" or (ep_size, dense_name); micro-batches of GLOBAL_MICRO / ranks by default"""
    micro = micro or max(GLOBAL_MICRO // ranks, 1)
    gas = max(GLOBAL // (ranks * micro), 1)
    sets = ["train.output_path=" + out, "train.max_steps=%d" % steps, "train_micro_batch_size_per_gpu=%d" % micro,
            "gradient_accumulation_steps=%d" % gas, "gradient_clipping=1.0", "data.synthetic.num_samples=64",
            "device.comm_timeout_s=60", "device.threads=1", "model.overrides.num_experts=32", "model.dtype=" + dtype,
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


def compare_params(a, b, what, rtol_experts=1e-6, rtol=1e-6):
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


def compare_metrics(ma, mb, steps, what, keys=METRICS, rtol=1e-9):
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
    # fp32, the default precision (tolerances in the docstring)
    ref32, out32 = os.path.join(tmp, "local1-fp32"), os.path.join(tmp, "ep2-ddp-x4-fp32")
    train(ref32, 1, "local", steps, dtype="fp32")
    train(out32, 4, (2, "ddp"), steps, dtype="fp32")
    what = "fp32: expert_parallel EP=2 x DP=2 (dense ddp) vs local x1"
    wl = compare_metrics(metrics(out32), metrics(ref32), range(1, steps + 1), what, rtol=1e-4)
    wp = compare_params(final_params(out32, tmp), final_params(ref32, tmp), what, rtol_experts=1e-3, rtol=1e-3)
    print("%s: metrics %.2g, expert params %.2g, other params %.2g relative" % (what, wl, wp[0], wp[1]))
    # the loss normalisation, with the aux loss off (its statistics are per global micro-batch by
    # definition): micro-batches of 1 and 2 accumulation steps on 4 ranks vs one micro-batch of 8
    no_aux = ["model.overrides.router_aux_loss_coef=0"]
    ref1 = os.path.join(tmp, "local1-micro8")
    train(ref1, 1, "local", steps, no_aux, micro=8)
    out = os.path.join(tmp, "ep2-fsdp-x4-micro1")
    train(out, 4, (2, "fsdp"), steps, no_aux, micro=1)
    what = "no aux loss: expert_parallel EP=2 x DP=2 (dense fsdp), micro-batch 1 x 2 accumulation vs local x1 (8 x 1)"
    wl = compare_metrics(metrics(out), metrics(ref1), range(1, steps + 1), what, keys=["train/loss", "train/grad_norm", "lm/ce_loss"])
    wp = compare_params(final_params(out, tmp), final_params(ref1, tmp), what)
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

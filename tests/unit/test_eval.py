#!/usr/bin/env python3
"""Validation, `strata eval`, checkpoint selection and on_save callbacks, through the strata binary.
Usage: test_eval.py STRATA SOURCE_ROOT CASE [RANKS]
  dump         `strata eval --dump` on validation samples that store sigma and noise, with the
               fixture's weights in fp64, reproduces diffusers' prediction and loss from
               tests/reference/qwen_image_tiny.safetensors (fp64 both sides: 1e-10 relative)
  seeds        the validation loss of fixed weights is bit-identical for two training seeds
  ranks        (distributed) val_loss of local x1 = ddp x2 = fsdp x2 within 1e-6 relative (the
               per-sample losses are summed in a different order across ranks)
  select       save_top_k=2 keeps exactly the two best checkpoints (by the val/loss logged in
               metrics.jsonl) plus the newest, and `best` names the lowest
  on-save      a failing on_save command is reported and training completes; a PNG written by
               the command is in the TensorBoard event file as an image (tensorboard's reader,
               when installed)"""
import json, os, shutil, struct, subprocess, sys, tempfile
import numpy as np

STRATA, ROOT, CASE = sys.argv[1], sys.argv[2], sys.argv[3]
DEMO = os.path.join(ROOT, "configs/demo/qwen_image_tiny.json")
FIXTURE = os.path.join(ROOT, "tests/reference/qwen_image_tiny.safetensors")
failures = []
DT = {"F64": np.float64, "F32": np.float32, "U8": np.uint8, "I64": np.int64}
CODE = {np.dtype(v): k for k, v in DT.items()}


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], DT[v["dtype"]]).reshape(v["shape"])
            for k, v in h.items() if k != "__metadata__"}


def write_st(path, tensors):
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[k] = {"dtype": CODE[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def run(args, cmd="train", cfg=DEMO, launch=0):
    pre = [STRATA, "launch", "--num_processes", str(launch), "--log_dir", os.path.join(TMP, "launch-logs"),
           "--"] if launch else []
    p = subprocess.run(pre + [STRATA, cmd, cfg] + args, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def sets(*kv):
    out = []
    for s in kv:
        out += ["--set", s]
    return out


def val_loss(stdout):
    for line in stdout.splitlines():  # "val_loss X over N samples", "[rank 0] " in front under launch
        if "val_loss " in line:
            return float(line.split("val_loss ")[1].split()[0])
    return None


def case_dump(tmp):
    fx = read_st(FIXTURE)
    data = os.path.join(tmp, "val")
    os.makedirs(data)
    for i in range(2):
        write_st(os.path.join(data, "sample-%06d.safetensors" % i), {
            "latents": fx["in.latents"][i], "noise": fx["in.noise"][i], "prompt_emb": fx["in.prompt_emb"][i],
            "prompt_mask": fx["in.prompt_mask"][i], "sigma": fx["in.sigma"][i:i + 1]})
    meta = os.path.join(data, "metadata.jsonl")  # read through a metadata file: the dump still names samples
    with open(meta, "w") as f:
        f.write("".join(json.dumps({"file": "sample-%06d.safetensors" % i}) + "\n" for i in range(2)))
    weights = os.path.join(tmp, "weights.safetensors")
    write_st(weights, {k[6:]: v for k, v in fx.items() if k.startswith("param.")})
    overrides = json.loads(read_header_meta(FIXTURE)["config"].replace("'", '"').replace("(", "[").replace(")", "]"))
    dump = os.path.join(tmp, "dump.safetensors")
    rc, out, err = run(["--weights", weights, "--dump", dump] + sets(
        "model.dtype=fp64", "model.overrides=" + json.dumps(overrides),
        "data.validation=" + json.dumps({"dataset_base_path": data, "dataset_metadata_path": meta}),
        "train.output_path=" + os.path.join(tmp, "o")),
        cmd="eval")
    check(rc == 0, "eval failed:\n" + err)
    if rc:
        return
    d = read_st(dump)
    losses = []
    for i in range(2):
        key = "sample-%06d" % i
        name = [k for k in d if k == key + "/output"]
        check(len(name) == 1, "no output for %s in %s" % (key, sorted(d)))
        if not name:
            continue
        got, want = d[name[0]].reshape(-1), fx["out.pred"][i].reshape(-1)
        rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
        check(rel <= 1e-10, "%s: prediction differs from diffusers by %.3g relative" % (key, rel))
        losses.append(float(d[key + "/loss"][0]))
    if len(losses) == 2:
        # the fixture's loss is the batch mean of the per-sample weighted MSE
        rel = abs(np.mean(losses) - fx["out.loss"][0]) / abs(fx["out.loss"][0])
        check(rel <= 1e-10, "mean per-sample loss %r vs diffusers %r" % (np.mean(losses), fx["out.loss"][0]))
        check(abs(val_loss(out) - np.mean(losses)) <= 1e-8 * abs(np.mean(losses)), "printed val_loss " + out)  # %.9g


def read_header_meta(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})


def trained(tmp, name="w", extra=()):
    out = os.path.join(tmp, name)
    rc, _, err = run(sets("train.output_path=" + out, "train.max_steps=10", *extra))
    check(rc == 0, "training failed:\n" + err)
    return os.path.join(out, "step-000010")


VAL = "data.validation=" + json.dumps({"synthetic": {"num_samples": 8}})


def case_seeds(tmp):
    ckpt = trained(tmp)
    a = run(["--checkpoint", ckpt] + sets(VAL, "train.seed=1", "train.output_path=" + os.path.join(tmp, "a")), "eval")
    b = run(["--checkpoint", ckpt] + sets(VAL, "train.seed=2", "train.output_path=" + os.path.join(tmp, "b")), "eval")
    check(a[0] == 0 and b[0] == 0, "eval failed:\n" + a[2] + b[2])
    check(val_loss(a[1]) is not None and val_loss(a[1]) == val_loss(b[1]), "val_loss %r vs %r" % (a[1], b[1]))
    # a checkpoint path with a quote and a backslash reaches the config intact
    odd = os.path.join(tmp, 'we"ird\\dir')
    shutil.copytree(ckpt, odd)
    q = run(["--checkpoint", odd] + sets(VAL, "train.seed=1", "train.output_path=" + os.path.join(tmp, "q")), "eval")
    check(q[0] == 0 and val_loss(q[1]) == val_loss(a[1]), "eval from %r: %s" % (odd, q[1] + q[2]))
    # a different validation seed draws other sigmas and noise: the check above can fail
    c = run(["--checkpoint", ckpt] + sets(VAL.replace("}}", "}, \"seed\": 99}"), "train.output_path=" +
                                          os.path.join(tmp, "c")), "eval")
    check(c[0] == 0 and val_loss(c[1]) != val_loss(a[1]), "another validation seed gave the same loss: " + c[1] + c[2])


def case_ranks(tmp):
    ckpt = trained(tmp)
    ref = run(["--checkpoint", ckpt] + sets(VAL, "train.output_path=" + os.path.join(tmp, "l")), "eval")
    check(ref[0] == 0, "eval x1 failed:\n" + ref[2])
    for strategy in ("ddp", "fsdp"):
        r = run(["--checkpoint", ckpt] + sets(VAL, "strategy.name=" + strategy, "train_micro_batch_size_per_gpu=4",
                                              "train.output_path=" + os.path.join(tmp, strategy)), "eval", launch=2)
        v, v1 = val_loss(r[1]), val_loss(ref[1])
        check(r[0] == 0 and v is not None and abs(v - v1) <= 1e-6 * abs(v1),
              "%s x2 val_loss %r vs local %r:\n%s" % (strategy, v, v1, r[2][-2000:]))


def case_select(tmp):
    out = os.path.join(tmp, "sel")
    rc, _, err = run(sets("train.output_path=" + out, "train.max_steps=50", "train.eval_steps=10", VAL,
                          "train.checkpoint=" + json.dumps({"save_top_k": 2}), "optimizer.params.lr=3e-3"))
    check(rc == 0, "training failed:\n" + err)
    vals = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        j = json.loads(line)
        if "val/loss" in j:
            vals[j["step"]] = j["val/loss"]
    check(sorted(vals) == [10, 20, 30, 40, 50], "validated at %s" % sorted(vals))
    best2 = sorted(vals, key=lambda s: vals[s])[:2]
    want = sorted(set(["step-%06d" % s for s in best2] + ["step-000050"]))
    have = sorted(d for d in os.listdir(out) if d.startswith("step-"))
    check(have == want, "kept %s, expected %s (val %s)" % (have, want, vals))
    best = open(os.path.join(out, "best")).read().strip()
    check(best == "step-%06d" % best2[0], "best is %s, expected step %d" % (best, best2[0]))


def case_on_save(tmp):
    out = os.path.join(tmp, "cb")
    script = os.path.join(tmp, "cb.sh")
    with open(script, "w") as f:
        f.write("""#!/bin/sh
echo "checkpoint $STRATA_CHECKPOINT step $STRATA_STEP"
if [ "$STRATA_STEP" = 4 ]; then echo "sampler exploded" >&2; exit 3; fi
python3 - <<'PY'
import os, struct, zlib
def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
raw = b''.join(b'\\x00' + bytes([200, 50, 50]) * 4 for _ in range(3))
png = (b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 4, 3, 8, 2, 0, 0, 0)) +
       chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
open(os.environ['STRATA_SAMPLES_DIR'] + '/grid.png', 'wb').write(png)
PY
""")
    os.chmod(script, 0o755)
    rc, _, err = run(sets("train.output_path=" + out, "train.max_steps=8", "train.save_steps=4", "train.on_save=" + script))
    check(rc == 0, "training stopped:\n" + err)
    check("the command for step 4 failed with exit code 3" in err and "sampler exploded" in err,
          "failure not reported:\n" + err)
    check(os.path.exists(os.path.join(out, "step-000008")), "training did not finish")
    check(os.path.exists(os.path.join(out, "samples/step-000008/grid.png")), "the command did not run at step 8")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        print("tensorboard not installed: image check skipped")
        return
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    check(tags == ["samples/grid"], "image tags %r" % tags)
    if tags:
        ims = acc.Images("samples/grid")
        check([e.step for e in ims] == [8] and ims[0].width == 4 and ims[0].height == 3,
              "images %r" % [(e.step, e.width, e.height) for e in ims])


with tempfile.TemporaryDirectory(prefix="strata-eval-") as tmp:
    TMP = tmp
    {"dump": case_dump, "seeds": case_seeds, "ranks": case_ranks, "select": case_select, "on-save": case_on_save}[CASE](tmp)
print("%s: %d failure(s)" % (CASE, len(failures)))
sys.exit(1 if failures else 0)

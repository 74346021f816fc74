#!/usr/bin/env python3
"""Interop suite, Qwen3-VL-MoE: strata's exports loaded by transformers / PEFT give strata's outputs.

  test_qwen3_vl_moe_interop.py STRATA SOURCE_ROOT

Exit 77 (skip) when torch, transformers or peft cannot be imported; the python of .venv-interop
(scripts/interop-setup) is preferred over the one running this script.

Everything goes through the `strata` binary, on configs/demo/qwen3_vl_moe_tiny.json (tiny preset:
2 MoE layers of 8 experts top-2, the 3-block vision tower with DeepStack; synthetic samples with one
image each, so the tower, DeepStack, the 3-D MRoPE positions and the aux loss are on the path) with
moe_intermediate_size 48: with the tiny default (hidden 64 = 2 x 32) the expert tensor [E, H, 2I] is
square and transformers' Transpose(1, 2, check_dims=True) skips the transpose it must apply on load.

1. Full run: `strata train` 30 steps, `strata export --format transformers`.
   strata: `strata eval --checkpoint step-000030 --dump` on the first 8 training samples (one
   sample per batch: logits [1, S, V] and loss = CE + coef * aux per sample), from the checkpoint,
   not from the exported files; and the padded batch of those 8 samples through `strata train` with
   lr 0 from the exported weights (first step's train/loss: the batch's pooled CE + coef * aux).
   transformers: Qwen3VLMoeForConditionalGeneration.from_pretrained(export), fp32, each sample alone
   (logits and loss with output_router_logits) and the 8 padded on the right with an attention mask
   (loss; logits of the real tokens against strata's per-sample logits).
2. LoRA run (rank 4, alpha 8 on q/k/v/o, base frozen at the seeded init): export transformers (the
   base), peft, and transformers --merge-lora. strata: `strata eval --checkpoint` (base + adapters
   inside strata). transformers: the base + the PEFT export through PeftModel.from_pretrained, and
   the merged export.
Tolerances (float32 on both sides through 2 layers, 3 vision blocks): logits max |strata - hf| /
max |hf| <= 1e-4 per sample, losses 1e-5 relative (seen <= 7.6e-7 / 1.4e-7). A wrong scale, a transposed
or missing tensor is off by > 1e-2. Controls: the trained full model's logits differ from the
untrained base's by > 100x the tolerance (the run moved the weights), the LoRA model's from its base
by > 100x (the adapter matters), and the PEFT adapter with every lora_B doubled misses by > 100x.
3. tools/qwen3_vl_prepare.py --dry-run-random (tiny random Qwen3-VL processor/tokenizer built
   locally, ids fitting the tiny preset): its output is read by strata's loader and accepted by the
   model (`strata eval` on it as the validation set through metadata.jsonl, and 2 training steps
   with batch 2 on it as data.dataset_base_path); strata's logits and losses on those samples (two
   images of different grids in one sample, a non-square grid, a text-only sample) equal
   transformers' from the full-run export (same tolerances); sample 0's input_ids / pixel_values /
   image_grid_thw equal the processor's on the templated conversation built here independently;
   the labelled tokens decode to exactly each answer + "<|im_end|>\n" (prompt and image tokens
   -100); the same processor saved to a folder and passed as --model with the rows as a JSONL file
   writes identical files; a row with more <image> placeholders than images is refused naming it.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

STRATA, ROOT = (sys.argv[1:3] + [None] * 2)[:2]
if ROOT is None:
    print(__doc__)
    sys.exit(2)

venv_py = os.path.join(ROOT, ".venv-interop", "bin", "python")
if os.path.exists(venv_py) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv-interop")) \
        and not os.environ.get("ST_INTEROP_REEXEC"):
    os.environ["ST_INTEROP_REEXEC"] = "1"
    os.execv(venv_py, [venv_py] + sys.argv)

try:
    import torch
    import transformers  # noqa: F401
    import peft  # noqa: F401
    from safetensors.torch import load_file
    from transformers import Qwen3VLMoeForConditionalGeneration
    from peft import PeftModel
except ImportError as e:
    print(f"SKIP: {e} (scripts/interop-setup installs torch, transformers and peft into .venv-interop)")
    sys.exit(77)

torch.set_num_threads(2)
TOL_LOGITS, TOL_LOSS = 1e-4, 1e-5
N = 8
CONFIG = os.path.join(ROOT, "configs", "demo", "qwen3_vl_moe_tiny.json")
COMMON = ["--set", "model.overrides.moe_intermediate_size=48", "--set", "tensorboard.enabled=false"]
LORA = ["--set", 'model.lora={"rank": 4, "alpha": 8}']
failures = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        failures.append(msg)


def run(*cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout, p.stderr, sep="\n")
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}")
    return p.stdout + p.stderr


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def rel_loss(a, b):
    return abs(a - b) / abs(b)


def strata_eval(tmp, name, data, *extra):
    """strata eval on the first N samples of data: {sample id: (logits [S, V], loss)}"""
    out = os.path.join(tmp, f"eval-{name}.safetensors")
    run(STRATA, "eval", CONFIG, *COMMON, "--set", f"train.output_path={tmp}/eval-{name}", "--set",
        f"data.validation.dataset_base_path={data}", "--set", f"data.validation.max_samples={N}", "--dump", out, *extra)
    d = load_file(out)
    ids = sorted({k.split("/")[0] for k in d})
    return {i: (d[f"{i}/output"][0], d[f"{i}/loss"].item()) for i in ids}


def strata_batch_loss(tmp, name, weights, *extra):
    """the first N samples as one padded batch through `strata train` with lr 0: the step's loss"""
    out = os.path.join(tmp, name)
    run(STRATA, "train", CONFIG, *COMMON, *extra, "--set", f"train.output_path={out}", "--set", "train.max_steps=1",
        "--set", "optimizer.params.lr=0", "--set", "data.shuffle=false", "--set", f"model.weights={weights}",
        "--set", f"train_micro_batch_size_per_gpu={N}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return json.loads(f.readline())["train/loss"]


def samples(data):
    return {i: load_file(os.path.join(data, f"{i}.safetensors")) for i in (f"sample-{k:06d}" for k in range(N))}


def hf_single(model, s):
    ids = s["input_ids"][None].long()
    mm = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s["pixel_values"].float(),
                  image_grid_thw=s["image_grid_thw"], mm_token_type_ids=mm, labels=s["labels"][None].long(),
                  output_router_logits=True)
    return o.logits[0], o.loss.item()


def hf_batch(model, ss):
    S = max(s["input_ids"].shape[0] for s in ss)
    ids = torch.zeros(len(ss), S, dtype=torch.long)
    lab = torch.full((len(ss), S), -100)
    mask = torch.zeros(len(ss), S, dtype=torch.long)
    for i, s in enumerate(ss):
        n = s["input_ids"].shape[0]
        ids[i, :n], lab[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
    mm = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([s["pixel_values"] for s in ss]).float(),
                  image_grid_thw=torch.cat([s["image_grid_thw"] for s in ss]), mm_token_type_ids=mm, labels=lab,
                  output_router_logits=True)
    return o.logits, o.loss.item()


def compare(what, strata_out, model, ss):
    """per-sample logits and losses of model against strata's; returns the worst logits error"""
    worst_l, worst_loss = 0.0, 0.0
    hf = {}
    for i, s in ss.items():
        lg, loss = hf_single(model, s)
        hf[i] = lg
        sl, sloss = strata_out[i]
        if sl.shape != lg.shape:
            check(False, f"{what}, {i}: strata logits {list(sl.shape)}, transformers {list(lg.shape)}")
            continue
        worst_l, worst_loss = max(worst_l, rel(sl, lg)), max(worst_loss, rel_loss(sloss, loss))
    check(worst_l <= TOL_LOGITS, f"{what}: logits of {len(ss)} samples, worst rel err {worst_l:.2e}")
    check(worst_loss <= TOL_LOSS, f"{what}: per-sample loss (CE + coef*aux), worst rel err {worst_loss:.2e}")
    return hf


def main():
    tmp = tempfile.mkdtemp(prefix="st-interop-vl-")
    j = lambda *p: os.path.join(tmp, *p)

    # 1. full run
    run(STRATA, "train", CONFIG, *COMMON, "--set", f"train.output_path={j('full')}", "--set", "train.max_steps=30")
    run(STRATA, "export", j("full", "step-000030"), "--format", "transformers", "--out", j("full_tf"))
    data = j("full", "synthetic-data")
    ss = samples(data)
    s_full = strata_eval(tmp, "full", data, "--checkpoint", j("full", "step-000030"))
    check(sorted(s_full) == sorted(ss), f"strata eval dumped the {N} samples ({len(s_full)})")
    m_full = Qwen3VLMoeForConditionalGeneration.from_pretrained(j("full_tf"), dtype=torch.float32).eval()
    hf_full = compare("full run, transformers export vs the checkpoint in strata", s_full, m_full, ss)
    lg, loss = hf_batch(m_full, list(ss.values()))
    worst = max(rel(s_full[i][0], lg[b, :s_full[i][0].shape[0]]) for b, i in enumerate(ss))
    check(worst <= TOL_LOGITS, f"full run, padded batch of {N} in transformers: real-token logits vs strata's "
                               f"per-sample logits, worst rel err {worst:.2e}")
    want = strata_batch_loss(tmp, "batch-full", j("full_tf", "model.safetensors"))
    check(rel_loss(want, loss) <= TOL_LOSS, f"full run, padded batch of {N}: transformers loss {loss:.7f}, strata "
                                            f"{want:.7f}, rel err {rel_loss(want, loss):.2e}")

    # 2. LoRA run
    run(STRATA, "train", CONFIG, *COMMON, *LORA, "--set", f"train.output_path={j('lora')}", "--set", "train.max_steps=30")
    ck = j("lora", "step-000030")
    run(STRATA, "export", ck, "--format", "transformers", "--out", j("lora_base"))
    run(STRATA, "export", ck, "--format", "peft", "--out", j("lora_peft"))
    run(STRATA, "export", ck, "--format", "transformers", "--merge-lora", "--out", j("lora_merged"))
    s_lora = strata_eval(tmp, "lora", data, *LORA, "--checkpoint", ck)
    base = Qwen3VLMoeForConditionalGeneration.from_pretrained(j("lora_base"), dtype=torch.float32).eval()
    hf_base = {i: hf_single(base, s)[0] for i, s in ss.items()}
    moved = min(rel(hf_full[i], hf_base[i]) for i in ss)
    check(moved > 100 * TOL_LOGITS, f"the full run moved the weights: logits {moved:.2e} from the untrained base's")
    moved = min(rel(s_lora[i][0], hf_base[i]) for i in ss)
    check(moved > 100 * TOL_LOGITS, f"the LoRA adapter matters: strata's LoRA logits {moved:.2e} from the base's")

    adapter = load_file(j("lora_peft", "adapter_model.safetensors"))
    m_peft = PeftModel.from_pretrained(base, j("lora_peft")).eval()
    sd = m_peft.state_dict()
    loaded = sum(1 for k, v in adapter.items() if k.replace(".weight", ".default.weight") in sd
                 and torch.equal(sd[k.replace(".weight", ".default.weight")], v))
    check(loaded == len(adapter) and loaded == 2 * 4 * 2, f"PEFT loaded all {len(adapter)} adapter tensors "
                                                          f"unchanged ({loaded}; 2 layers x q/k/v/o x A/B)")
    compare("LoRA run, base + PEFT export (PeftModel.from_pretrained) vs strata", s_lora, m_peft, ss)
    with torch.no_grad():
        for k, v in adapter.items():
            if "lora_B" in k:
                sd[k.replace(".weight", ".default.weight")].copy_(2 * v)
    bad = min(rel(s_lora[i][0], hf_single(m_peft, s)[0]) for i, s in ss.items())
    check(bad > 100 * TOL_LOGITS, f"negative control: the adapter with lora_B doubled is {bad:.2e} away")
    m_merged = Qwen3VLMoeForConditionalGeneration.from_pretrained(j("lora_merged"), dtype=torch.float32).eval()
    compare("LoRA run, merged transformers export vs strata", s_lora, m_merged, ss)

    prepare_check(tmp, m_full, j("full", "step-000030"))
    if failures:
        print(f"{len(failures)} check(s) failed; files kept in {tmp}")
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)
    print("all interop checks passed")


def prepare_check(tmp, m_full, full_ckpt):
    """tools/qwen3_vl_prepare.py --dry-run-random: strata reads it; ids/labels as the processor makes them."""
    import importlib.util
    tool = os.path.join(ROOT, "tools", "qwen3_vl_prepare.py")
    out, proc_dir = os.path.join(tmp, "prepared"), os.path.join(tmp, "random-processor")
    run(sys.executable, tool, "--dry-run-random", "--seed", "3", "--out", out, "--save-processor", proc_dir)
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    files = {r["file"][:-len(".safetensors")]: load_file(os.path.join(out, r["file"])) for r in rows}
    n = len(rows)

    # strata's loader + model: as the validation set (metadata.jsonl), and 2 training steps on it
    log = run(STRATA, "eval", CONFIG, *COMMON, "--set", f"train.output_path={tmp}/eval-prepared", "--set",
              f"data.validation.dataset_base_path={out}", "--set",
              f"data.validation.dataset_metadata_path={out}/metadata.jsonl", "--checkpoint", full_ckpt)
    check(f"over {n} samples" in log, f"prepared data: strata eval read the {n} samples through metadata.jsonl")
    run(STRATA, "train", CONFIG, *COMMON, "--set", f"train.output_path={tmp}/train-prepared", "--set",
        f"data.dataset_base_path={out}", "--set", f"data.dataset_metadata_path={out}/metadata.jsonl", "--set",
        "train_micro_batch_size_per_gpu=2", "--set", "train.max_steps=2")
    with open(os.path.join(tmp, "train-prepared", "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f]
    check(len(losses) == 2 and all(0 < v < 100 for v in losses), f"prepared data: 2 training steps (batch 2, "
                                                                   f"padded), losses {losses}")
    # strata's logits on the processor's samples (two images of different grids in one sample, a
    # non-square grid, a text-only sample) against transformers on the same tensors
    s_prep = strata_eval(tmp, "prepared", out, "--checkpoint", full_ckpt)
    worst = 0.0
    for i, s in files.items():
        ids = s["input_ids"][None]
        kw = dict(pixel_values=s["pixel_values"].float(), image_grid_thw=s["image_grid_thw"]) if "pixel_values" in s else {}
        with torch.no_grad():
            o = m_full(input_ids=ids, attention_mask=torch.ones_like(ids), labels=s["labels"][None],
                       mm_token_type_ids=(ids == m_full.config.image_token_id).int(), output_router_logits=True, **kw)
        worst = max(worst, rel(s_prep[i][0], o.logits[0]), rel_loss(s_prep[i][1], o.loss.item()))
    check(worst <= TOL_LOGITS, f"prepared data: strata's logits and losses vs transformers', worst rel err {worst:.2e}")

    # the token ids and pixels are the processor's on the same conversation; labels = the answers
    spec = importlib.util.spec_from_file_location("qwen3_vl_prepare", tool)
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    proc = prep.random_processor()
    from PIL import Image
    src = prep.make_random_inputs(os.path.join(tmp, "regen"), 3)
    r0 = src[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r0["prompt"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": r0["answer"]}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    enc = proc(text=[text], images=[Image.open(r0["image"]).convert("RGB")], return_tensors="pt")
    s0 = files["000000"]
    check(torch.equal(s0["input_ids"], enc["input_ids"][0]) and torch.equal(s0["pixel_values"], enc["pixel_values"])
          and torch.equal(s0["image_grid_thw"], enc["image_grid_thw"]),
          f"sample 0: input_ids, pixel_values, image_grid_thw equal the processor's on the templated conversation")
    tok = proc.tokenizer
    want = {"000000": ["Red."], "000001": ["The first is square; the second is tall."],
            "000002": ["Two.", "One of them."], "000003": ["Hi!"]}
    for i, answers in want.items():
        lab, ids = files[i]["labels"], files[i]["input_ids"]
        got = tok.decode(lab[lab != -100].tolist())
        exp = "".join(a + "<|im_end|>\n" for a in answers)
        ok = got == exp and bool((lab[lab != -100] == ids[lab != -100]).all()) and not bool((lab == 1001).any())
        check(ok, f"{i}: labelled tokens decode to {got!r} (want {exp!r}); prompt and image tokens are -100")
    g1 = files["000001"]["image_grid_thw"].tolist()
    check(len(g1) == 2 and g1[0] != g1[1] and int((files["000001"]["input_ids"] == 1001).sum()) ==
          sum(t * h * w for t, h, w in g1) // 4, f"000001: two images of grids {g1}, one image token per 2x2 patches")

    # --model: the same processor saved to a folder, the generated rows as a JSONL input file
    with open(os.path.join(tmp, "input.jsonl"), "w") as f:
        for r in src:
            f.write(json.dumps(r) + "\n")
    run(sys.executable, tool, "--model", proc_dir, "--input", os.path.join(tmp, "input.jsonl"), "--out",
        os.path.join(tmp, "prepared-model"))
    same = all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
               for a, b in ((files[r["file"][:-12]], load_file(os.path.join(tmp, "prepared-model", r["file"])))
                            for r in rows))
    check(same, "--model DIR + --input JSONL writes what the dry run wrote")
    with open(os.path.join(tmp, "bad.jsonl"), "w") as f:
        f.write(json.dumps({"images": [src[0]["image"]], "prompt": "<image> vs <image>", "answer": "x"}) + "\n")
    p = subprocess.run([sys.executable, tool, "--model", proc_dir, "--input", os.path.join(tmp, "bad.jsonl"), "--out",
                        os.path.join(tmp, "prepared-bad")], capture_output=True, text=True)
    check(p.returncode != 0 and "row 1" in p.stderr and "more <image> placeholders than images" in p.stderr,
          f"a row with more <image> placeholders than images is refused naming the row: {p.stderr.strip()[-90:]!r}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Interop suite, Qwen-Image: strata's exports loaded by diffusers / PEFT give strata's outputs.

  test_qwen_image_interop.py STRATA QWEN_IMAGE_MODULE.so QWEN_IMAGE_INTEROP SOURCE_ROOT

Exit 77 (skip) when torch, diffusers or peft cannot be imported; the python of .venv-interop
(scripts/interop-setup) is preferred over the one running this script.

1. diffusers builds a random tiny base transformer (the demo's model: tiny preset, 4 layers, 4 x 16
   heads; every parameter random and non-zero) and save_pretrained()s it.
2. `strata train` (configs/demo/qwen_image_tiny.json) from those weights: a full run, and a LoRA
   run (rank 4, alpha 8, DiffSynth's targets) on the frozen base; both checkpoint at the end.
3. `strata export --format diffusers` (full run; and the LoRA run with --merge-lora) and
   `--format peft` (LoRA run).
4. The same inputs (batch 2, 4 x 6 patch grid, sample 1's prompt padded and masked, pinned sigma and
   noise) through
     strata: tests/interop/qwen_image_interop forward, which loads the checkpoint's tensors (and
             for LoRA the base weights) into the model plugin — not the exported files;
     diffusers: QwenImageTransformer2DModel.from_pretrained(export), the base + the PEFT export
             through QwenImagePipeline.load_lora_weights, and the base + peft's own
             LoraConfig.from_pretrained / inject_adapter_in_model / set_peft_model_state_dict.
   Tolerance: max |strata - diffusers| / max |diffusers| <= 1e-4 per prediction (float32 on both
   sides through 4 blocks; the reference suite sees ~1e-6 at 2 blocks; a wrong scale, a
   transposed or missing tensor is off by > 1e-2). Each trained prediction must differ from the
   base model's by more than 100x that tolerance, so the comparison cannot pass on an adapter
   or update that was silently dropped.
   Negative control: the PEFT adapter with lora_B doubled must miss by more than 100x the tolerance.
5. tools/qwen_image_prepare.py --dry-run-random writes a cache that strata's data loader and the
   model accept (qwen_image_interop check-data), and its prompt embeddings equal diffusers'
   QwenImagePipeline.encode_prompt on the same random text encoder and tokenizer. The same models
   saved in diffusers' folder layout and passed as --model (images named by a CSV) give identical
   files once --drop-idx is forced, and are refused without it (their prefix is not 34 tokens).
"""
import os
import shutil
import subprocess
import sys
import tempfile

STRATA, MODULE, HELPER, ROOT = (sys.argv[1:5] + [None] * 4)[:4]
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
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from safetensors.torch import load_file, save_file
except ImportError as e:
    print(f"SKIP: {e} (scripts/interop-setup installs torch, diffusers and peft into .venv-interop)")
    sys.exit(77)

from diffusers import QwenImageTransformer2DModel

torch.set_num_threads(2)
TOL = 1e-4
MODEL = dict(num_layers=4, num_attention_heads=4, attention_head_dim=16, joint_attention_dim=24, in_channels=16,
             out_channels=4, patch_size=2, axes_dims_rope=(4, 6, 6))
MODEL_BLOCK = '"name": "qwen_image", "preset": "tiny", "overrides": {"num_layers": 4, "num_attention_heads": 4}'
LORA_BLOCK = '"lora": {"rank": 4, "alpha": 8}'
GRID_H, GRID_W, NT, VALID1 = 4, 6, 7, 4
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


def pack(lat, p=2):  # "B C (H P) (W Q) -> B (H W) (C P Q)"
    b, c, hh, ww = lat.shape
    return lat.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // p) * (ww // p), -1)


def random_base(path):
    gen = torch.Generator().manual_seed(4)
    model = QwenImageTransformer2DModel(**MODEL)
    sd = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".norm_" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            sd[name] = 0.1 * torch.randn(p.shape, generator=gen)
        else:
            sd[name] = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
    model.load_state_dict(sd)
    model.save_pretrained(path, safe_serialization=True)
    return model


def diffusers_pred(model, inp):
    s4 = inp["in.sigma"][:, None, None, None]
    x_t = pack((1 - s4) * inp["in.latents"] + s4 * inp["in.noise"])
    with torch.no_grad():
        return model(hidden_states=x_t, encoder_hidden_states=inp["in.prompt_emb"],
                     encoder_hidden_states_mask=inp["in.prompt_mask"].bool(), timestep=inp["in.sigma"],
                     img_shapes=[(1, GRID_H, GRID_W)] * 2, return_dict=False)[0]


def strata_pred(tmp, name, model_json, inputs, *weights):
    out = os.path.join(tmp, f"pred-{name}.safetensors")
    run(HELPER, "forward", MODULE, model_json, inputs, out, *weights)
    return load_file(out)["out.pred"]


def main():
    tmp = tempfile.mkdtemp(prefix="st-interop-")
    demo = os.path.join(ROOT, "configs", "demo", "qwen_image_tiny.json")
    base_dir = os.path.join(tmp, "base")
    base = random_base(base_dir).eval()

    gen = torch.Generator().manual_seed(11)
    f = lambda *s: torch.randn(*s, generator=gen)
    inp = {"in.latents": f(2, 4, 2 * GRID_H, 2 * GRID_W), "in.noise": f(2, 4, 2 * GRID_H, 2 * GRID_W),
           "in.prompt_emb": f(2, NT, 24), "in.prompt_mask": torch.ones(2, NT, dtype=torch.uint8),
           "in.sigma": torch.tensor([0.3, 0.8])}
    inp["in.prompt_emb"][1, VALID1:] = 0
    inp["in.prompt_mask"][1, VALID1:] = 0
    inputs = os.path.join(tmp, "inputs.safetensors")
    save_file(inp, inputs)
    full_json = "{\"model\": {" + MODEL_BLOCK + "}}"
    lora_json = "{\"model\": {" + MODEL_BLOCK + ", " + LORA_BLOCK + "}}"

    # the harness itself against diffusers on the untrained base
    p_base = diffusers_pred(base, inp)
    s_base = strata_pred(tmp, "base", full_json, inputs, base_dir)
    check(rel(s_base, p_base) <= TOL, f"base weights: strata vs diffusers rel err {rel(s_base, p_base):.2e}")

    common = ["--set", f"model.weights={base_dir}", "--set", "train.max_steps=20", "--set", "train.save_steps=20",
              "--set", "tensorboard.enabled=false"]
    run(STRATA, "train", demo, "--set", f"train.output_path={tmp}/full", *common)
    run(STRATA, "train", demo, "--set", f"train.output_path={tmp}/lora", "--set", "model.lora.rank=4",
        "--set", "model.lora.alpha=8", *common)
    full_ckpt, lora_ckpt = f"{tmp}/full/step-000020", f"{tmp}/lora/step-000020"
    run(STRATA, "export", full_ckpt, "--format", "diffusers", "--out", f"{tmp}/full-diffusers")
    run(STRATA, "export", lora_ckpt, "--format", "peft", "--out", f"{tmp}/lora-peft")
    run(STRATA, "export", lora_ckpt, "--format", "diffusers", "--merge-lora", "--out", f"{tmp}/lora-merged")

    # full run: diffusers export vs the checkpoint in strata
    s_full = strata_pred(tmp, "full", full_json, inputs, os.path.join(full_ckpt, "model.safetensors"))
    m_full = QwenImageTransformer2DModel.from_pretrained(f"{tmp}/full-diffusers", torch_dtype=torch.float32).eval()
    p_full = diffusers_pred(m_full, inp)
    check(rel(s_full, p_full) <= TOL, f"full run, diffusers export: rel err {rel(s_full, p_full):.2e}")
    check(rel(p_full, p_base) > 100 * TOL, f"full run moved the weights: {rel(p_full, p_base):.2e} from the base")

    # LoRA run: strata = base + the checkpoint's adapters
    s_lora = strata_pred(tmp, "lora", lora_json, inputs, base_dir, os.path.join(lora_ckpt, "model.safetensors"))
    check(rel(s_lora, s_base) > 100 * TOL, f"LoRA run changed the prediction: {rel(s_lora, s_base):.2e} from the base")

    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=QwenImageTransformer2DModel.from_pretrained(base_dir).eval())
    pipe.load_lora_weights(f"{tmp}/lora-peft", weight_name="adapter_model.safetensors")
    p_lora = diffusers_pred(pipe.transformer, inp)
    check(rel(s_lora, p_lora) <= TOL, f"LoRA run, PEFT export via QwenImagePipeline.load_lora_weights: "
                                      f"rel err {rel(s_lora, p_lora):.2e}")

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    m_peft = QwenImageTransformer2DModel.from_pretrained(base_dir).eval()
    cfg = LoraConfig.from_pretrained(f"{tmp}/lora-peft")
    m_peft = inject_adapter_in_model(cfg, m_peft)
    sd = {k[len("transformer."):]: v for k, v in load_file(f"{tmp}/lora-peft/adapter_model.safetensors").items()}
    res = set_peft_model_state_dict(m_peft, sd)
    unexpected = getattr(res, "unexpected_keys", [])
    check(not unexpected, f"peft accepted every adapter tensor (unexpected: {unexpected[:3]})")
    p_peft = diffusers_pred(m_peft, inp)
    check(rel(s_lora, p_peft) <= TOL, f"LoRA run, PEFT export via peft LoraConfig + set_peft_model_state_dict: "
                                      f"rel err {rel(s_lora, p_peft):.2e}")

    # negative control: the same adapter with every lora_B doubled must fail the tolerance
    m_bad = inject_adapter_in_model(cfg, QwenImageTransformer2DModel.from_pretrained(base_dir).eval())
    set_peft_model_state_dict(m_bad, {k: (2 * v if "lora_B" in k else v) for k, v in sd.items()})
    p_bad = diffusers_pred(m_bad, inp)
    check(rel(s_lora, p_bad) > 100 * TOL, f"negative control: lora_B doubled is {rel(s_lora, p_bad):.2e} away")

    m_merged = QwenImageTransformer2DModel.from_pretrained(f"{tmp}/lora-merged").eval()
    p_merged = diffusers_pred(m_merged, inp)
    check(rel(s_lora, p_merged) <= TOL, f"LoRA run, merged diffusers export: rel err {rel(s_lora, p_merged):.2e}")

    prepare_check(tmp)
    if failures:
        print(f"{len(failures)} check(s) failed; files kept in {tmp}")
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)
    print("all interop checks passed")


def prepare_check(tmp):
    """tools/qwen_image_prepare.py --dry-run-random: strata reads it; embeddings equal diffusers'."""
    import argparse
    import importlib.util
    out = os.path.join(tmp, "prepared")
    run(sys.executable, os.path.join(ROOT, "tools", "qwen_image_prepare.py"), "--dry-run-random", "--dtype", "fp32",
        "--compute-dtype", "fp32", "--seed", "3", "--out", out)
    log = run(HELPER, "check-data", MODULE,
              '{"model": {"name": "qwen_image", "preset": "tiny", "overrides": {"in_channels": 64, "out_channels": 16}}}',
              out, os.path.join(out, "metadata.jsonl"))
    check("check-data: 3 samples" in log, "prepared cache: strata's loader read 3 samples and the model took them")

    spec = importlib.util.spec_from_file_location("qwen_image_prepare", os.path.join(ROOT, "tools", "qwen_image_prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    vae, te, tok = prep.random_models(argparse.Namespace(seed=3, dry_hidden=24))
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                             transformer=None)
    pipe.prompt_template_encode_start_idx = prep.measured_drop(tok)
    check(pipe.prompt_template_encode == prep.PROMPT_TEMPLATE, "prepare's prompt template is diffusers' template")
    import json
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    for r in rows:
        emb, mask = pipe.encode_prompt(r["prompt"], device="cpu")
        got = load_file(os.path.join(out, r["file"]))
        ok = got["prompt_emb"].shape == emb[0].shape and rel(got["prompt_emb"], emb[0]) <= 1e-6
        check(ok, f"{r['file']}: prompt_emb {list(got['prompt_emb'].shape)} equals diffusers' encode_prompt "
                  f"{list(emb[0].shape)}")
        check(got["latents"].shape[0] == 16 and got["latents"].shape[1] * 8 == r["height"]
              and got["latents"].shape[2] * 8 == r["width"], f"{r['file']}: latents {list(got['latents'].shape)} "
                                                             f"for a {r['height']}x{r['width']} image")

    # --model: the same random models saved in diffusers' folder layout, the images named by a CSV
    model_dir = os.path.join(tmp, "random-qwen-image")
    vae.save_pretrained(os.path.join(model_dir, "vae"))
    te.save_pretrained(os.path.join(model_dir, "text_encoder"))
    tok.save_pretrained(os.path.join(model_dir, "tokenizer"))
    import csv
    with open(os.path.join(tmp, "meta.csv"), "w", newline="") as fcsv:
        wr = csv.writer(fcsv)
        wr.writerow(["image", "prompt"])
        for r in rows:
            wr.writerow([r["source"], r["prompt"]])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "qwen_image_prepare.py"), "--model", model_dir, "--metadata",
           os.path.join(tmp, "meta.csv"), "--dtype", "fp32", "--compute-dtype", "fp32", "--out",
           os.path.join(tmp, "prepared-model")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    check(p.returncode != 0 and "not 34" in p.stderr, "--model with a tokenizer whose template prefix is not 34 "
                                                      "tokens is refused")
    run(*cmd, "--drop-idx", str(pipe.prompt_template_encode_start_idx))
    for r in rows:
        a = load_file(os.path.join(out, r["file"]))
        b = load_file(os.path.join(tmp, "prepared-model", r["file"]))
        same = all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
        check(same and set(a) == set(b), f"{r['file']}: --model + CSV metadata writes what the dry run wrote")


if __name__ == "__main__":
    main()

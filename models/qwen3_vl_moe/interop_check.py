#!/usr/bin/env python3
"""Exports of the qwen3_vl_moe plugin, loaded by transformers / PEFT, against strata's own loss.

Not wired into a meson suite yet (tests/interop is outside this plugin's folder): run by hand,
  .venv-interop/bin/python models/qwen3_vl_moe/interop_check.py [BUILD_DIR]
Exit 0 when every comparison passes, 1 otherwise, 77 when torch / transformers / peft are missing.

What it does, in a temporary directory, on the tiny demo config (synthetic samples with one image
each, so the vision tower, DeepStack and the 3-D positions are on the path):
 1. full run: `strata train` 30 steps, `strata export --format transformers`; strata's loss on the
    first batch (samples 0..7, data.shuffle false) with the exported weights loaded back through
    model.weights and lr 0; transformers' loss (CE + coef * aux, fp32) from from_pretrained on the
    same samples, padded on the right with an attention mask.
 2. LoRA run (rank 4, alpha 8 on q/k/v/o): export transformers (base), peft and transformers
    --merge-lora; strata's loss with the merged weights; transformers' loss from base + PEFT adapter
    (PeftModel.from_pretrained) and from the merged export.
moe_intermediate_size is overridden to 48: with the tiny default (hidden 64 = 2 x 32) the expert
tensor [E, H, 2I] is square, and transformers' Transpose(1, 2, check_dims=True) then skips the
transpose it must apply on load (its shape check cannot tell the layouts apart). Tolerance 1e-5
relative (float32 on both sides; seen ~1e-7).
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

try:
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3VLMoeForConditionalGeneration
    from peft import PeftModel
except ImportError as e:  # pragma: no cover
    print(f"skipping: {e}")
    sys.exit(77)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
STRATA = os.path.join(BUILD, "runtime", "strata")
CONFIG = os.path.join(ROOT, "configs", "demo", "qwen3_vl_moe_tiny.json")
OVR = ["--set", "model.overrides.moe_intermediate_size=48"]
LORA = ["--set", 'model.lora={"rank": 4, "alpha": 8}']


def strata(*args):
    r = subprocess.run([STRATA, *args], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        raise SystemExit(f"strata {args[0]} failed")


def strata_loss(tmp, name, weights):
    out = os.path.join(tmp, name)
    strata("train", CONFIG, "--set", f"train.output_path={out}", "--set", "train.max_steps=1", "--set",
           "optimizer.params.lr=0", "--set", "data.shuffle=false", "--set", f"model.weights={weights}", *OVR)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return json.loads(f.readline())["train/loss"], os.path.join(out, "synthetic-data")


def hf_loss(model, data):
    ss = [load_file(f) for f in sorted(glob.glob(os.path.join(data, "sample-*.safetensors")))[:8]]
    S = max(s["input_ids"].shape[0] for s in ss)
    ids = torch.zeros(8, S, dtype=torch.long)
    lab = torch.full((8, S), -100)
    mask = torch.zeros(8, S, dtype=torch.long)
    for i, s in enumerate(ss):
        n = s["input_ids"].shape[0]
        ids[i, :n], lab[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
    pix = torch.cat([s["pixel_values"] for s in ss]).float()
    grid = torch.cat([s["image_grid_thw"] for s in ss])
    mm = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid, mm_token_type_ids=mm,
                     labels=lab, output_router_logits=True).loss.item()


def load(path):
    return Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def main():
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        j = lambda *p: os.path.join(tmp, *p)
        strata("train", CONFIG, "--set", f"train.output_path={j('full')}", "--set", "train.max_steps=30", *OVR)
        strata("export", j("full", "step-000030"), "--format", "transformers", "--out", j("full_tf"))
        want, data = strata_loss(tmp, "eval_full", j("full_tf", "model.safetensors"))
        got = hf_loss(load(j("full_tf")), data)
        rel = abs(got - want) / want
        print(f"full export: transformers {got:.7f}, strata {want:.7f}, rel {rel:.2e}")
        ok &= rel < 1e-5

        strata("train", CONFIG, "--set", f"train.output_path={j('lora')}", "--set", "train.max_steps=30", *OVR, *LORA)
        ck = j("lora", "step-000030")
        strata("export", ck, "--format", "transformers", "--out", j("lora_base"))
        strata("export", ck, "--format", "peft", "--out", j("lora_peft"))
        strata("export", ck, "--format", "transformers", "--merge-lora", "--out", j("lora_merged"))
        want, data = strata_loss(tmp, "eval_lora", j("lora_merged", "model.safetensors"))
        base = load(j("lora_base"))
        got_base = hf_loss(base, data)
        got_peft = hf_loss(PeftModel.from_pretrained(base, j("lora_peft")).eval(), data)
        got_merged = hf_loss(load(j("lora_merged")), data)
        rp, rm = abs(got_peft - want) / want, abs(got_merged - want) / want
        print(f"LoRA: base {got_base:.7f}; base + PEFT adapter {got_peft:.7f} (rel {rp:.2e}); merged "
              f"{got_merged:.7f} (rel {rm:.2e}); strata {want:.7f}")
        ok &= rp < 1e-5 and rm < 1e-5 and abs(got_base - want) / want > 1e-3  # the adapter matters
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

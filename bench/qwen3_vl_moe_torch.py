#!/usr/bin/env python3
"""PyTorch eager twin of strata's Qwen3-VL-MoE training step, for bench/qwen3_vl_moe_vs_torch.sh.

transformers' Qwen3VLMoeForConditionalGeneration, fp32, built from a strata transformers export
(config.json + model.safetensors: exactly strata's shapes) and trained on strata's own synthetic
samples in strata's order (data.shuffle false: step k takes samples k*B .. k*B+B-1, padded on the
right with an attention mask): forward with labels and output_router_logits (CE + coef * aux, as
strata), backward, clip_grad_norm_(1.0), torch.optim.AdamW(lr, weight_decay 0.01) step, zero_grad.

  python3 bench/qwen3_vl_moe_torch.py --export DIR --data DIR [--batch 8] [--threads 2] [--steps 5]
      [--attn sdpa|eager] [--lr 3e-3]

Prints the median and fastest step time over --steps timed steps after one warm-up step, and the
peak RSS (resource.getrusage, torch's libraries included). Needs torch, transformers, safetensors
(scripts/interop-setup installs them into .venv-interop).
"""
import argparse
import glob
import os
import resource
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="strata export --format transformers folder")
    ap.add_argument("--data", required=True, help="folder of strata's sample-*.safetensors")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--label", default="torch")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from safetensors.torch import load_file
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(args.export, dtype=torch.float32,
                                                               attn_implementation=args.attn).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    files = sorted(glob.glob(os.path.join(args.data, "sample-*.safetensors")))
    need = args.batch * (args.steps + 1)
    if len(files) < need:
        raise SystemExit(f"{args.data} holds {len(files)} samples, {need} needed")
    img = model.config.image_token_id

    def batch(k):
        ss = [load_file(f) for f in files[k * args.batch:(k + 1) * args.batch]]
        S = max(s["input_ids"].shape[0] for s in ss)
        ids = torch.zeros(len(ss), S, dtype=torch.long)
        lab = torch.full((len(ss), S), -100)
        mask = torch.zeros(len(ss), S, dtype=torch.long)
        for i, s in enumerate(ss):
            n = s["input_ids"].shape[0]
            ids[i, :n], lab[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
        kw = {}
        if "pixel_values" in ss[0]:
            kw = dict(pixel_values=torch.cat([s["pixel_values"] for s in ss]).float(),
                      image_grid_thw=torch.cat([s["image_grid_thw"] for s in ss]))
        return dict(input_ids=ids, attention_mask=mask, labels=lab, mm_token_type_ids=(ids == img).int(), **kw)

    batches = [batch(k) for k in range(args.steps + 1)]
    times, losses = [], []
    for k, b in enumerate(batches):
        t0 = time.perf_counter()
        out = model(**b, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(out.loss.item())
        if k:
            times.append(dt)
        print(f"{args.label} step {k + 1}: {dt:.4f} s, loss {losses[-1]:.4f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"RESULT torch params={n_params} step_s={statistics.median(times):.5f} min_s={min(times):.5f} "
          f"peak_rss_mib={rss:.0f} first_loss={losses[0]:.5f}")


if __name__ == "__main__":
    main()

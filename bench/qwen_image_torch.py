#!/usr/bin/env python3
"""PyTorch eager twin of bench/bench_qwen_image.c: one Qwen-Image training step on the CPU with
diffusers' QwenImageTransformer2DModel on the same shapes (fp32): pack the latents, x_t = (1 - s) x0
+ s eps with a random sigma per sample, forward, DiffSynth-weighted MSE against eps - x0, backward,
torch.optim.AdamW(lr 1e-4, weight_decay 0.01) step, zero_grad.

  python3 bench/qwen_image_torch.py [--config tiny|mid] [--threads N] [--steps N]

Prints the median step time over --steps timed steps after one warm-up step and the process's peak
RSS (resource.getrusage: torch's own libraries included; the RSS right after `import torch` is
printed too so the model's share can be told apart). Needs torch and diffusers
(scripts/interop-setup installs them into .venv-interop).
"""
import argparse
import math
import resource
import statistics
import time

CONFIGS = {
    # the reference tiny model; batch 2, grid 3x5, 7 text tokens
    "tiny": dict(model=dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
                            in_channels=16, out_channels=4, patch_size=2, axes_dims_rope=(4, 6, 6)),
                 batch=2, grid=(3, 5), text_len=7),
    # 4 layers, D 512 = 4 x 128, joint_attention_dim 512; batch 1, 32x32 = 1024 image tokens, 64 text tokens
    "mid": dict(model=dict(num_layers=4, num_attention_heads=4, attention_head_dim=128, joint_attention_dim=512,
                           in_channels=64, out_channels=16, patch_size=2, axes_dims_rope=(16, 56, 56)),
                batch=1, grid=(32, 32), text_len=64),
}


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    rss_import = rss_mib()
    from diffusers import QwenImageTransformer2DModel

    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**cfg["model"]).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    B, (h, w), nt = cfg["batch"], cfg["grid"], cfg["text_len"]
    c_lat = cfg["model"]["in_channels"] // 4
    latents = torch.randn(B, c_lat, 2 * h, 2 * w)
    prompt = torch.randn(B, nt, cfg["model"]["joint_attention_dim"])
    mask = torch.ones(B, nt, dtype=torch.bool)

    def pack(lat):  # "B C (H P) (W Q) -> B (H W) (C P Q)"
        b, c, hh, ww = lat.shape
        return lat.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)

    def step():
        sigma = torch.rand(B)
        noise = torch.randn_like(latents)
        s4 = sigma[:, None, None, None]
        x_t = pack((1 - s4) * latents + s4 * noise)
        target = pack(noise - latents)
        weight = torch.exp(-2.0 * ((1000 * sigma - 500) / 1000) ** 2)  # a Gaussian bump like DiffSynth's weights
        pred = model(hidden_states=x_t, encoder_hidden_states=prompt, encoder_hidden_states_mask=mask,
                     timestep=sigma, img_shapes=[(1, h, w)] * B, return_dict=False)[0]
        loss = (weight * ((pred - target) ** 2).flatten(1).mean(1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    loss0 = step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"torch {args.config}: params {n_params}, batch {B}, image tokens {h * w}, text tokens {nt}, "
          f"threads {torch.get_num_threads()}, steps {args.steps}: median {med:.4f} s/step "
          f"(min {min(times):.4f}, max {max(times):.4f}); loss {loss0:.4f} -> {loss:.4f}; peak RSS {rss_mib():.1f} MiB "
          f"({rss_import:.1f} MiB after import torch); torch {torch.__version__}")
    print(f"RESULT torch {args.config} step_s={med:.6f} min_s={min(times):.6f} peak_rss_mib={rss_mib():.1f} threads={torch.get_num_threads()}")
    assert math.isfinite(loss)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Golden fixture for the qwen_image model plugin: the `tiny` Qwen-Image config run by diffusers.

What it builds (reference notes, shared/reference/qwen_image.md §7.1):
  QwenImageTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=16,
  joint_attention_dim=24, in_channels=16, out_channels=4, patch_size=2, axes_dims_rope=(4, 6, 6))
  in float64, every parameter random and non-zero (modulation and norm_out included, RMSNorm gains
  1 + 0.1 N(0, 1)); all parameter values are rounded to float32 first so the fixture can store
  them as F32 exactly. Batch of 2: latents [2, 4, 6, 10] (grid 3 x 5: odd and non-square), prompt
  embeddings [2, 7, 24] where sample 1 has 4 valid tokens and 3 zero padded ones (key mask),
  sigma = (0.25, 0.875), fixed noise.

The training objective is written here independently of the C code (DiffSynth-Studio's recipe,
reference §4): x_t = (1 - sigma) x0 + sigma eps, target = eps - x0 (both packed to tokens),
per-sample weight w = DiffSynth's Gaussian-bump weight of the grid timestep nearest to 1000 sigma,
loss = mean_b( w_b * mean((pred_b - target_b)^2) ).

Then: backward (every parameter gradient; parameters that get no gradient — the dead text tail of
the last block — are stored as zeros), and 3 steps of torch.optim.AdamW(lr=1e-3,
weight_decay=0.01), re-running forward/backward on the same inputs before each step. strata's
optimizer updates every trainable tensor each step, so tensors whose .grad is None get a zero
gradient here (AdamW then only decays them) instead of being skipped.

float64 exactness: stock diffusers computes a few things in float32 even in a float64 model
(RMSNorm's variance, the timestep sinusoid, the RoPE tables and rotation). For a float64
reference those four are replaced by float64 versions of the same formulas (patch_float64 below);
the script checks that the stock float32 model agrees with the patched float64 one to float32
accuracy, so the patches change precision, not semantics.

Output: tests/reference/qwen_image_tiny.safetensors with
  in.latents, in.noise [2,4,6,10] F64; in.prompt_emb [2,7,24] F64; in.prompt_mask [2,7] U8;
  in.sigma [2] F64; out.pred, out.target [2,15,16] F64; out.weight [2] F64; out.loss [1] F64;
  param.<name> F32 (initial values, exact); grad.<name> F64;
  step<k>.<name> F32 and step<k>.loss [1] F64 (loss before step k) for k = 1, 2, 3.

Regenerate (CPU is enough; takes a few seconds):
  python3 -m venv /tmp/qi-venv
  /tmp/qi-venv/bin/pip install torch diffusers safetensors   # CPU torch also: --index-url https://download.pytorch.org/whl/cpu
  /tmp/qi-venv/bin/python tools/reference/qwen_image_fixture.py [--out tests/reference/qwen_image_tiny.safetensors]
Versions used for the committed file are printed and stored in the file's metadata.
"""
import argparse
import math
import os

import torch

import diffusers
import diffusers.models.embeddings as demb
import diffusers.models.normalization as dnorm
import diffusers.models.transformers.transformer_qwenimage as dq
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import save_file

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
            in_channels=16, out_channels=4, patch_size=2, axes_dims_rope=(4, 6, 6))
GRID_H, GRID_W, NT, VALID1 = 3, 5, 7, 4
SIGMA = (0.25, 0.875)


# ---- float64 versions of the four float32 islands of diffusers (same formulas) ----
def _rms_forward_f64(self, x):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    if self.weight is not None:
        y = y * self.weight
        if getattr(self, "bias", None) is not None:
            y = y + self.bias
    return y


def _timestep_embedding_f64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                            max_period=10000):
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * (timesteps[:, None].to(torch.float64) * torch.exp(exponent)[None, :])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


def _rope_params_f64(self, index, dim, theta=10000):
    freqs = torch.outer(index.to(torch.float64),
                        1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def _apply_rope_f64(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
    assert not use_real
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis.to(torch.complex128).unsqueeze(1)).flatten(3)
    return out.type_as(x)


STOCK = dict(rms=dnorm.RMSNorm.forward, temb=demb.get_timestep_embedding, rope_params=dq.QwenEmbedRope.rope_params,
             rope=dq.apply_rotary_emb_qwen)


def patch_float64(on):
    dnorm.RMSNorm.forward = _rms_forward_f64 if on else STOCK["rms"]
    demb.get_timestep_embedding = _timestep_embedding_f64 if on else STOCK["temb"]
    dq.QwenEmbedRope.rope_params = _rope_params_f64 if on else STOCK["rope_params"]
    dq.apply_rotary_emb_qwen = _apply_rope_f64 if on else STOCK["rope"]


# ---- the objective, written from the reference notes ----
def diffsynth_grid():
    """sigma_i, t_i and weights w_i of DiffSynth's Qwen-Image training grid (mu 0.8, terminal 0.02)."""
    u = 1.0 - torch.arange(1000, dtype=torch.float64) / 1000.0
    mu = 0.8
    sig = math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    one_minus = 1.0 - sig
    sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - 0.02))
    t = sig * 1000.0
    y = torch.exp(-2.0 * ((t - 500.0) / 1000.0) ** 2)
    ys = y - y.min()
    w = ys * (1000.0 / ys.sum())
    return sig, t, w


def pack(lat, p=2):  # "B C (H P) (W Q) -> B (H W) (C P Q)"
    b, c, hh, ww = lat.shape
    x = lat.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // p) * (ww // p), c * p * p)


def loss_fn(pred, target, weight):
    per_sample = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return (weight * per_sample).mean()


def build(dtype, state=None):
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).to(dtype)
    if state is not None:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model


def random_state(model, gen):
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".norm_" in name:  # RMSNorm gains
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        elif name.endswith(".bias"):
            v = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        else:
            v = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[1])
        state[name] = v.float().double()  # exactly representable in float32
    return state


def run(model, inputs, weight, target):
    pred = model(hidden_states=inputs["x_t"], encoder_hidden_states=inputs["prompt_emb"],
                 encoder_hidden_states_mask=inputs["mask"], timestep=inputs["sigma"],
                 img_shapes=[(1, GRID_H, GRID_W)] * 2, return_dict=False)[0]
    return pred, loss_fn(pred, target, weight)


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "reference", "qwen_image_tiny.safetensors"))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(20250804)

    patch_float64(True)
    model = build(torch.float64)
    state = random_state(model, gen)
    model.load_state_dict(state)

    f = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).float().double()
    latents, noise = f(2, 4, 2 * GRID_H, 2 * GRID_W), f(2, 4, 2 * GRID_H, 2 * GRID_W)
    prompt = f(2, NT, TINY["joint_attention_dim"])
    prompt[1, VALID1:] = 0.0
    mask = torch.ones(2, NT, dtype=torch.uint8)
    mask[1, VALID1:] = 0
    sigma = torch.tensor(SIGMA, dtype=torch.float64)
    s4 = sigma[:, None, None, None]
    x_t = pack((1 - s4) * latents + s4 * noise)
    target = pack(noise - latents)
    _, gt, gw = diffsynth_grid()
    weight = torch.stack([gw[torch.argmin((gt - 1000.0 * s).abs())] for s in sigma])
    inputs = dict(x_t=x_t, prompt_emb=prompt, mask=mask.bool(), sigma=sigma)

    pred, loss = run(model, inputs, weight, target)
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in
             model.named_parameters()}

    # the float64 patches change precision only: stock diffusers in float32 must agree
    patch_float64(False)
    m32 = build(torch.float32, state)
    with torch.no_grad():
        p32, _ = run(m32, {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()},
                     weight.float(), target.float())
    rel = ((p32.double() - pred.detach()).abs().max() / pred.detach().abs().max()).item()
    print(f"stock float32 diffusers vs patched float64: max rel diff {rel:.2e}")
    assert rel < 1e-4, "the float64 patches disagree with stock diffusers"
    patch_float64(True)

    out = {"in.latents": latents, "in.noise": noise, "in.prompt_emb": prompt, "in.prompt_mask": mask,
           "in.sigma": sigma, "out.pred": pred.detach(), "out.target": target, "out.weight": weight,
           "out.loss": loss.detach().reshape(1)}
    for n, v in state.items():
        out["param." + n] = v.float()
        out["grad." + n] = grads[n]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for k in range(1, 4):
        opt.zero_grad(set_to_none=False)
        _, l = run(model, inputs, weight, target)
        l.backward()
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        out[f"step{k}.loss"] = l.detach().reshape(1)
        for n, p in model.named_parameters():
            out[f"step{k}.{n}"] = p.detach().float()

    out = {k: v.contiguous() for k, v in out.items()}
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "config": repr(TINY),
            "sigma": repr(SIGMA), "adamw": "lr=1e-3 weight_decay=0.01 betas=(0.9,0.999) eps=1e-8"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(out, args.out, metadata=meta)
    print(f"loss {loss.item():.12g}  weights {weight.tolist()}  wrote {args.out} "
          f"({os.path.getsize(args.out)} bytes, {len(out)} tensors)")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Golden fixture for the qwen3_vl_moe model plugin (language model, text-only batch).

What it builds (reference notes, shared/reference/qwen3_vl_moe.md §6): transformers'
Qwen3VLMoeForConditionalGeneration with the tiny text config (hidden 64, 2 layers, 4 q heads /
2 kv heads x head_dim 32, 8 experts top-2, moe_intermediate 32, mrope_section [6,5,5] interleaved,
rope_theta 1e4, router_aux_loss_coef 0.01, untied lm_head) and a tiny vision config that is never
run (no pixel_values). vocab_size is 512 instead of §6's 1024 to keep the file under 3 MB; the C
test passes the same override. Model in float64; every parameter random and non-zero, rounded to
float32 first so the fixture stores them as F32 exactly (RMSNorm gains 1 + 0.1 N(0,1)).

Batch of 2, S = 12, right padding: sample 0 has 12 tokens and explicit 3-row position ids whose
t/h/w rows differ (an image-like span: exercises the interleaved MRoPE split), sample 1 has 8 tokens
+ 4 padding (attention_mask 0, pad id 0) and the default positions arange(12) on all three axes.
Labels: prompt tokens and padding are -100, the rest equal input_ids (the model shifts them).
The routing is made to leave experts without any token in layer 0 (the router row of the last
expert is scaled down and the parameter seed is searched until that happens): those experts'
gradients are exactly zero.

float64 exactness: stock transformers computes a few things in float32 even in a float64 model
(RMSNorm's variance, the router softmax, the RoPE inv_freq/angles, eager attention softmax, the
load-balancing loss accumulators, the causal-LM loss upcast). They are replaced by float64 versions
of the same formulas below (attention runs through sdpa, which is float64 throughout); the script
checks that the stock float32 model agrees with the patched float64 one to float32 accuracy, so the
patches change precision, not semantics. The aux loss is transformers' load_balancing_loss_func
(pooled over layers, padding excluded by attention_mask, router logits = pre-softmax, i.e. after
PR #45111), loss = CE (mean over non-ignored shifted labels) + coef * aux.

Expert layout: transformers v5 modules hold gate_up_proj [E, 2I, H] / down_proj [E, H, I]; the
checkpoint (and strata) use [E, H, 2I] / [E, I, H] (conversion_mapping.py: Transpose(1, 2)). The
fixture stores parameters and gradients in the checkpoint layout.

Output: tests/reference/qwen3_vl_moe_tiny.safetensors with
  in.input_ids, in.labels [2,12] I64; in.attention_mask [2,12] U8; in.position_ids [3,2,12] I64;
  out.logits [2,12,512] F64; out.loss, out.ce_loss, out.aux_loss [1] F64;
  out.router_topk.<l> [24,2] I32 (top-k expert ids per token row b*S+s, descending probability);
  out.router_weight.<l> [24,2] F64; param.<name> F32; grad.<name> F64 (language model and lm_head;
  the vision tower gets no gradient and is not stored);
  step<k>.loss [1] F64 (k = 1, 2, 3: the loss before step k) and step3.delta.<name> F32 (parameter
  after 3 steps minus param.<name>, checkpoint layout) of 3 torch.optim.AdamW steps (lr 1e-3,
  weight_decay 0.01, betas (0.9, 0.999), eps 1e-8, float64 model and state; forward/backward re-run
  on the same batch before each step; a parameter without gradient gets a zero one, so AdamW only
  decays it, as strata does). The deltas cover every language-model parameter but lm_head.weight
  (kept out to stay near 3.5 MB; the step-2/3 losses depend on it). Storing the change, not the
  parameter, keeps ~1e-10 absolute accuracy in float32 (changes are <= ~3e-3).
  The transformers square-expert transpose hazard (models/qwen3_vl_moe/README.md: hidden 64 = 2 x
  moe_intermediate 32) does not apply: parameters are copied into the modules in their v5 layout and
  transposed here explicitly, never loaded through from_pretrained's conversion.

Second file, tests/reference/qwen3_vl_moe_vision_tiny.safetensors (same model and language-model
parameters as the first file, plus random vision-tower parameters; the tiny vision config of §6:
depth 3, hidden 32, 2 heads, MLP 64 GELU-tanh, patch 4, temporal 2, merge 2, 4x4 learned grid,
deepstack after blocks 0 and 1 into LM layers 0 and 1): a batch of 3 x 16 tokens (no padding),
sample 0 = text, <vision_start>, one 4x6-patch image (6 tokens: the grid differs from the 4x4
table, so the bilinear resampling runs), <vision_end>, text; sample 1 = text, a 4x4 image (4
tokens), text, a 2x4 image (2 tokens), text; sample 2 = text, a 2-frame 2x4 video as two spans
(frame, text, frame: timestamps are text), text, a 2x4 image, text: the video comes first in the
rows, so the joint image/video DeepStack order differs from "images, then videos"; per-frame
attention. transformers computes the 3-D
position ids itself (get_rope_index, from mm_token_type_ids). Extra float32 islands of the vision tower made float64:
the interpolation taps/weights, the vision rotary angles and apply_rotary_pos_emb_vision.
Stores in.input_ids, in.labels [3,16] I64, in.pixel_values [56,96] F64, in.image_grid_thw [4,3]
I64, in.images_per_sample [3] I64, in.pixel_values_videos [16,96] F64, in.video_grid_thw [1,3],
in.videos_per_sample [3], out.logits, out.loss, out.ce_loss, out.aux_loss, out.position_ids [3,3,16] I64, out.router_topk.<l>, param.model.visual.<name> F32 and grad.<name>
F64 for every parameter except lm_head (its gradient is checked by the first file; this keeps the
file under 3 MB).

Regenerate (CPU is enough; a few seconds):
  .venv-interop/bin/python tools/reference/qwen3_vl_moe_fixture.py [--out tests/reference/qwen3_vl_moe_tiny.safetensors]
      [--vision-out tests/reference/qwen3_vl_moe_vision_tiny.safetensors]
"""
import argparse
import os

import torch
import torch.nn.functional as F

import transformers
import transformers.vision_utils as vu
import transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe as mq
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from safetensors.torch import save_file

VOCAB, S, VALID1, PROMPT = 512, 12, 8, (3, 2)
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, router_aux_loss_coef=0.01,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True},
            tie_word_embeddings=False, attention_bias=False, max_position_embeddings=4096)
VISION = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, hidden_act="gelu_pytorch_tanh",
              in_channels=3, patch_size=4, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
              num_position_embeddings=16, deepstack_visual_indexes=[0, 1])


# ---- float64 versions of transformers' float32 islands (same formulas) ----
def _rms_f64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _router_f64(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight)
    probs = torch.softmax(logits, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
    top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value, top_index


def _rotary_f64(self, x, position_ids):
    base = self.config.rope_parameters["rope_theta"]
    dim = self.config.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    position_ids = position_ids.expand(3, -1, -1)
    freqs = position_ids[..., None].double() * inv_freq
    cos = self.recomposition_frequencies(freqs.cos())
    sin = self.recomposition_frequencies(freqs.sin())
    return cos.to(x.dtype), sin.to(x.dtype)


def _lb_loss_f64(gate_logits, num_experts, top_k, attention_mask):
    """load_balancing_loss_func with float64 accumulators (same formula)."""
    flat_mask = attention_mask.reshape(-1).double()
    count = torch.zeros(num_experts, dtype=torch.float64)
    psum = torch.zeros(num_experts, dtype=torch.float64)
    rows = 0.0
    for layer_gate in gate_logits:
        p = torch.softmax(layer_gate.double(), dim=-1)
        _, sel = torch.topk(p, top_k, dim=-1)
        count = count + torch.zeros(num_experts, dtype=torch.float64).scatter_add_(
            0, sel.reshape(-1), flat_mask.repeat_interleave(top_k))
        psum = psum + (p * flat_mask.unsqueeze(-1)).sum(0)
        rows = rows + flat_mask.sum()
    return torch.sum((count / rows) * (psum / rows)) * num_experts


def ce_f64(logits, labels):
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), shift.reshape(-1), ignore_index=-100,
                           reduction="mean")


_taps_f32 = vu._interpolation_axis_taps_weights


def _taps_f64(index, size, side, mode, align_corners, padding="border"):
    """the same taps and weights, with the source coordinate computed in float64"""
    index = index.to(torch.float64)
    src = index * (side - 1) / torch.clamp(size - 1, min=1) if align_corners else (index + 0.5) * side / size - 0.5
    floor = torch.floor(src)
    assert mode == "bilinear"
    offsets = torch.arange(0, 2)
    raw = floor.long()[:, None] + offsets
    taps = raw.clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def _vision_rotary_f64(self, x, position_ids):
    dim = self.config.hidden_size // self.config.num_heads
    spatial = dim // 2
    inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, spatial, 2, dtype=torch.float64)
                                                                     / spatial))
    freqs = position_ids[..., None].double() * inv_freq
    return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())


def _apply_vision_rope_keep_dtype(q, k, cos, sin):
    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
    return (q * cos) + (mq.rotate_half(q) * sin), (k * cos) + (mq.rotate_half(k) * sin)


def patch_float64():
    mq.Qwen3VLMoeTextRMSNorm.forward = _rms_f64
    mq.Qwen3VLMoeTextTopKRouter.forward = _router_f64
    mq.Qwen3VLMoeTextRotaryEmbedding.forward = _rotary_f64
    mq.load_balancing_loss_func = _lb_loss_f64
    vu._interpolation_axis_taps_weights = _taps_f64
    mq.Qwen3VLMoeVisionRotaryEmbedding.forward = _vision_rotary_f64
    mq.apply_rotary_pos_emb_vision = _apply_vision_rope_keep_dtype


def make_config():
    cfg = Qwen3VLMoeConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_id=1001 % VOCAB,
                           video_token_id=1002 % VOCAB, vision_start_token_id=1000 % VOCAB,
                           vision_end_token_id=1003 % VOCAB, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    for c in (cfg, cfg.text_config):
        try:
            c._experts_implementation = "eager"
        except Exception:
            pass
    return cfg


def random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if "norm" in name and p.ndim == 1:
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif "embed_tokens" in name:
            v = 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif name.endswith("mlp.gate.weight"):
            v = 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            v[-1] *= 0.05  # the last expert is rarely chosen: an expert with no tokens
        else:
            v = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        state[name] = v.float().double()  # exactly representable in float32
    return state


def build(dtype, state):
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(make_config()).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name].to(dtype))
    model.train()
    return model


def inputs():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (2, S), generator=g)
    ids[1, VALID1:] = 0
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, VALID1:] = 0
    labels = ids.clone()
    labels[0, :PROMPT[0]] = -100
    labels[1, :PROMPT[1]] = -100
    labels[1, VALID1:] = -100
    pos = torch.arange(S).view(1, 1, S).expand(3, 2, S).clone()
    # sample 0: text 0..2, a 2x3 "vision" span at t = 3, h = 3..4, w = 3..5, then text from 3 + 3 = 6
    span = [(3, 3 + h, 3 + w) for h in range(2) for w in range(3)]
    for j, (t, h, w) in enumerate(span):
        pos[:, 0, 3 + j] = torch.tensor([t, h, w])
    pos[:, 0, 9:] = torch.arange(6, 6 + S - 9).view(1, -1)
    return ids, labels, mask, pos


def run(model, ids, labels, mask, pos, own_loss):
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=None if own_loss else labels,
                output_router_logits=True)
    coef = model.config.text_config.router_aux_loss_coef
    if own_loss:
        ce = ce_f64(out.logits, labels)
        loss = ce + coef * out.aux_loss
    else:
        ce = out.loss - coef * out.aux_loss
        loss = out.loss
    return out, loss, ce


IMG_TOKEN, VID_TOKEN, VS_TOKEN, VE_TOKEN = 1001 % VOCAB, 1002 % VOCAB, 1000 % VOCAB, 1003 % VOCAB
GRIDS = [(1, 4, 6), (1, 4, 4), (1, 2, 4), (1, 2, 4)]  # sample 0: image 0; sample 1: images 1, 2; sample 2: image 3
VGRIDS = [(2, 2, 4)]  # sample 2: a 2-frame video before its image (2 tokens per frame)


def vision_inputs():
    g = torch.Generator().manual_seed(23)
    text = lambda n: torch.randint(1, 480, (n,), generator=g).tolist()  # never a special token
    img = lambda grid: [IMG_TOKEN] * (grid[0] * grid[1] * grid[2] // 4)
    s0 = text(3) + [VS_TOKEN] + img(GRIDS[0]) + [VE_TOKEN] + text(5)
    s1 = text(2) + [VS_TOKEN] + img(GRIDS[1]) + [VE_TOKEN] + text(1) + [VS_TOKEN] + img(GRIDS[2]) + [VE_TOKEN] + text(3)
    frame = [VID_TOKEN] * (VGRIDS[0][1] * VGRIDS[0][2] // 4)  # frames are separate spans (timestamps between)
    s2 = (text(1) + [VS_TOKEN] + frame + [VE_TOKEN] + text(1) + [VS_TOKEN] + frame + [VE_TOKEN] + text(1) +
          [VS_TOKEN] + img(GRIDS[3]) + [VE_TOKEN] + text(1))  # the video before the image: row order != kind order
    assert len(s0) == len(s1) == len(s2) == 16
    ids = torch.tensor([s0, s1, s2])
    labels = ids.clone()
    labels[(ids == IMG_TOKEN) | (ids == VID_TOKEN) | (ids == VS_TOKEN) | (ids == VE_TOKEN)] = -100
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    mm = (ids == IMG_TOKEN).int() + 2 * (ids == VID_TOKEN).int()
    grid, vgrid = torch.tensor(GRIDS), torch.tensor(VGRIDS)
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g, dtype=torch.float64)
    vpix = torch.randn(int(vgrid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g, dtype=torch.float64)
    return ids, labels, mask, mm, grid, pix, vgrid, vpix


def vision_state(lm_state):
    probe = Qwen3VLMoeForConditionalGeneration(make_config())
    g = torch.Generator().manual_seed(7)
    state = dict(lm_state)
    for name, p in probe.named_parameters():
        if not name.startswith("model.visual."):
            continue
        if ("norm" in name) and name.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif name.endswith("bias"):
            v = 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif "pos_embed" in name:
            v = 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        else:
            v = 0.15 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        state[name] = v.float().double()
    return state


def run_v(model):
    ids, labels, mask, mm, grid, pix, vgrid, vpix = vision_inputs()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pix.to(model.dtype), image_grid_thw=grid,
                pixel_values_videos=vpix.to(model.dtype), video_grid_thw=vgrid, mm_token_type_ids=mm,
                output_router_logits=True)
    ce = ce_f64(out.logits, labels)
    return out, ce + model.config.text_config.router_aux_loss_coef * out.aux_loss, ce


def vision_fixture(path, state, logits32):
    ids, labels, mask, mm, grid, pix, vgrid, vpix = vision_inputs()
    m64 = build(torch.float64, state)
    out, loss, ce = run_v(m64)
    rel = ((out.logits - logits32.double()).abs().max() / out.logits.abs().max()).item()
    print(f"vision: stock float32 vs patched float64 logits max rel diff {rel:.2e}")
    assert rel < 1e-4
    pos, _ = m64.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, video_grid_thw=vgrid,
                                      attention_mask=mask)
    loss.backward()
    res = {"in.input_ids": ids, "in.labels": labels, "in.pixel_values": pix, "in.image_grid_thw": grid,
           "in.images_per_sample": torch.tensor([1, 2, 1]), "in.pixel_values_videos": vpix,
           "in.video_grid_thw": vgrid, "in.videos_per_sample": torch.tensor([0, 0, 1]),
           "out.logits": out.logits.detach().clone(),
           "out.loss": loss.detach().reshape(1).clone(), "out.ce_loss": ce.detach().reshape(1).clone(),
           "out.aux_loss": out.aux_loss.detach().double().reshape(1).clone(), "out.position_ids": pos.clone()}
    for l, z in enumerate(out.router_logits):
        p = torch.softmax(z.detach().double(), -1)
        res[f"out.router_topk.{l}"] = torch.topk(p, 2, dim=-1).indices.to(torch.int32).contiguous()
    n = 0
    for name, p in m64.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            grad = grad.transpose(1, 2)
        if name.startswith("model.visual."):
            res[f"param.{name}"] = p.detach().float().contiguous()
        if name != "lm_head.weight":
            res[f"grad.{name}"] = grad.detach().double().contiguous()
            n += 1
    print(f"vision: {n} gradients; loss {loss.item():.12f} (ce {ce.item():.12f}, aux {out.aux_loss.item():.12f}); "
          f"positions sample 0: {pos[:, 0].tolist()}; sample 2: {pos[:, 2].tolist()}")
    save_file(res, path, metadata={"torch": torch.__version__, "transformers": transformers.__version__,
                                   "script": "tools/reference/qwen3_vl_moe_fixture.py"})
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def adamw_steps(model, res, state, ids, labels, mask, pos):
    """3 torch AdamW steps on the same batch; stores each step's loss (before the step) and the
    step-3 change of every language-model parameter except lm_head (checkpoint layout, F32)."""
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for k in range(1, 4):
        opt.zero_grad(set_to_none=True)  # fresh .grad tensors: res["grad.*"] may alias the old ones
        _, loss, _ = run(model, ids, labels, mask, pos, own_loss=True)
        loss.backward()
        for _, p in params:
            if p.grad is None:  # strata updates every trainable tensor (decay only when no gradient)
                p.grad = torch.zeros_like(p)
        opt.step()
        res[f"step{k}.loss"] = loss.detach().reshape(1).clone()
    assert res["step1.loss"].item() == res["out.loss"].item()
    worst = 0.0
    for name, p in params:
        if name == "lm_head.weight":
            continue  # kept out to stay under ~3.5 MB; the step-2/3 losses still depend on it
        delta = p.detach() - state[name]
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            delta = delta.transpose(1, 2)
        res[f"step3.delta.{name}"] = delta.float().contiguous()
        worst = max(worst, delta.abs().max().item())
    print(f"AdamW: losses {[res[f'step{k}.loss'].item() for k in range(1, 4)]}, max |step-3 change| {worst:.3g}")


def main():
    ap = argparse.ArgumentParser()
    ref = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "reference")
    ap.add_argument("--out", default=os.path.join(ref, "qwen3_vl_moe_tiny.safetensors"))
    ap.add_argument("--vision-out", default=os.path.join(ref, "qwen3_vl_moe_vision_tiny.safetensors"))
    args = ap.parse_args()
    ids, labels, mask, pos = inputs()

    # stock float32 reference first (before patching), for the precision-only check
    seed = 0
    while True:
        probe = Qwen3VLMoeForConditionalGeneration(make_config())
        state = random_state(probe, 100 + seed)
        m32 = build(torch.float32, state)
        out32, loss32, _ = run(m32, ids, labels, mask, pos, own_loss=False)
        sel = torch.topk(torch.softmax(out32.router_logits[0].double(), -1), 2, dim=-1).indices
        counts = torch.bincount(sel.reshape(-1), minlength=8)
        if (counts == 0).any():
            break
        seed += 1
        assert seed < 200, "no seed leaves an expert without tokens in layer 0"
    print(f"parameter seed {100 + seed}: layer-0 expert loads {counts.tolist()}")

    # the stock float32 run of the vision batch, before the (class-level) float64 patches
    vstate = vision_state(state)
    vlogits32 = run_v(build(torch.float32, vstate))[0].logits.detach()
    patch_float64()
    m64 = build(torch.float64, state)
    out, loss, ce = run(m64, ids, labels, mask, pos, own_loss=True)
    rel = ((out.logits - out32.logits.double()).abs().max() / out.logits.abs().max()).item()
    print(f"stock float32 transformers vs patched float64: logits max rel diff {rel:.2e}, "
          f"loss {loss32.item():.8f} vs {loss.item():.8f}")
    assert rel < 1e-4 and abs(loss32.item() - loss.item()) < 1e-4 * abs(loss.item())
    loss.backward()

    res = {"in.input_ids": ids.clone(), "in.labels": labels.clone(), "in.attention_mask": mask.to(torch.uint8),
           "in.position_ids": pos.clone(), "out.logits": out.logits.detach().clone(),
           "out.loss": loss.detach().reshape(1).clone(), "out.ce_loss": ce.detach().reshape(1).clone(),
           "out.aux_loss": out.aux_loss.detach().double().reshape(1).clone()}
    for l, z in enumerate(out.router_logits):
        p = torch.softmax(z.detach().double(), -1)
        v, i = torch.topk(p, 2, dim=-1)
        res[f"out.router_topk.{l}"] = i.to(torch.int32).contiguous()
        res[f"out.router_weight.{l}"] = (v / v.sum(-1, keepdim=True)).contiguous()
    n_grad = 0
    for name, p in m64.named_parameters():
        if name.startswith("model.visual."):
            assert p.grad is None or p.grad.abs().max() == 0
            continue
        val, grad = p.detach(), p.grad if p.grad is not None else torch.zeros_like(p)
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            val, grad = val.transpose(1, 2), grad.transpose(1, 2)  # v5 module layout -> checkpoint layout
        res[f"param.{name}"] = val.float().contiguous()
        res[f"grad.{name}"] = grad.detach().double().contiguous()
        n_grad += 1
    print(f"{n_grad} parameter gradients; loss {loss.item():.12f} (ce {ce.item():.12f}, aux "
          f"{out.aux_loss.item():.12f})")
    adamw_steps(m64, res, state, ids, labels, mask, pos)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "script": "tools/reference/qwen3_vl_moe_fixture.py", "param_seed": str(100 + seed),
            "adamw": "torch.optim.AdamW lr=1e-3 weight_decay=0.01 betas=(0.9,0.999) eps=1e-8 float64, 3 steps on "
                     "in.*; every language-model parameter and lm_head (zero gradient where none)"}
    save_file(res, args.out, metadata=meta)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    vision_fixture(args.vision_out, vstate, vlogits32)


if __name__ == "__main__":
    main()

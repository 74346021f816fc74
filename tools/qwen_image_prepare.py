#!/usr/bin/env python3
"""Qwen-Image data preparation for strata: images + prompts -> cached samples strata trains on.

The preparation stage of DiffSynth-Studio's split training (`--task sft:data_process`), done with
diffusers and transformers, writing the format strata's data loader reads (DESIGN.md section 5,
runtime/data.h, models/qwen_image/README.md "Data"):

  OUT/<id>.safetensors   one per sample:
      latents      [16, H/8, W/8]  normalized VAE posterior mean, (z - latents_mean) / latents_std
      prompt_emb   [Nt, 3584]      Qwen2.5-VL last hidden state of the templated prompt, first 34
                                   tokens (the system prompt through "<|im_start|>user\\n") dropped,
                                   the trailing assistant-opening tokens kept
      prompt_mask  [Nt] U8         all ones (one prompt per file: no padding is stored)
  OUT/metadata.jsonl     {"file": "<id>.safetensors", "prompt": ..., "height": H, "width": W,
                          "source": <image path>} per sample, in input order

Train on it with
  "data": {"dataset_base_path": "OUT", "dataset_metadata_path": "OUT/metadata.jsonl"}

Input: a metadata file as DiffSynth-Studio accepts (CSV with a header row holding `image` and
`prompt` columns, a JSON array of objects or JSONL), image paths relative to --base-path (default:
the metadata file's folder).

Images (DiffSynth's ImageCropAndResize): with --height/--width, resize to cover and center-crop to
that size; otherwise, if H*W > --max-pixels the image is scaled down by sqrt(H*W / max_pixels),
both sides are floored to multiples of 16, then resized to cover and center-cropped. RGB in
[-1, 1], encoded as a one-frame video [1, 3, 1, H, W]; DiffSynth keeps the posterior mean (the
diffusers DreamBooth script samples instead: --sample-posterior).

Prompts (diffusers QwenImagePipeline._get_qwen_prompt_embeds): the chat template below, tokenized
and truncated at --max-text-tokens + 34, run through the text encoder with its attention mask,
hidden_states[-1], the first 34 tokens dropped. The 34 is checked against the tokenizer: the
template's prefix must tokenize to exactly that many tokens (an error otherwise, since embeddings
would be shifted).

  python3 tools/qwen_image_prepare.py --model PATH/TO/Qwen-Image --metadata data/metadata.csv --out data/cache
  python3 tools/qwen_image_prepare.py --dry-run-random --out /tmp/qi-cache    # no weights needed

--model is a diffusers Qwen-Image folder (or hub id when this machine can reach the hub) with the
subfolders vae/, text_encoder/ and tokenizer/; the 20B transformer is not loaded.
--dry-run-random exercises the same code path with a randomly initialised tiny VAE (z_dim 16),
a tiny Qwen2.5-VL text encoder (hidden size --dry-hidden, default 24 = strata's `tiny` preset's
joint_attention_dim) and a byte-level tokenizer built in memory, on a few generated images (unless
--metadata is given): for testing the writing path only — the numbers mean nothing. With that
tokenizer the template prefix is not 34 tokens; the drop uses the prefix's measured length.

Needs torch, diffusers, transformers, safetensors, Pillow (scripts/interop-setup installs them into
.venv-interop). Optional; not part of CI.
"""
import argparse
import csv
import json
import math
import os
import sys

PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                   "{}<|im_end|>\n<|im_start|>assistant\n")
DROP_IDX = 34  # diffusers prompt_template_encode_start_idx for Qwen-Image T2I


# ---- metadata --------------------------------------------------------------------------------
def read_metadata(path):
    """Rows (dicts) of a CSV / JSON / JSONL metadata file, chosen by suffix as DiffSynth does."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise SystemExit(f"{path}: expected a JSON array of objects")
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "image" not in r or "prompt" not in r:
            raise SystemExit(f"{path}: row {i + 1} needs 'image' and 'prompt' fields")
    return rows


# ---- images ----------------------------------------------------------------------------------
def target_size(h, w, height, width, max_pixels):
    if height and width:
        return height, width
    if h * w > max_pixels:
        s = math.sqrt(h * w / max_pixels)
        h, w = int(h / s), int(w / s)
    h, w = h // 16 * 16, w // 16 * 16
    if h < 16 or w < 16:
        raise ValueError(f"image of {h}x{w} pixels is smaller than 16x16 after resizing")
    return h, w


def load_image(path, height, width, max_pixels):
    """[1, 3, 1, H, W] float in [-1, 1] (resize to cover, center crop) and (H, W)."""
    import numpy as np
    import torch
    from PIL import Image
    img = Image.open(path).convert("RGB")
    W0, H0 = img.size
    h, w = target_size(H0, W0, height, width, max_pixels)
    scale = max(h / H0, w / W0)
    rh, rw = max(h, round(H0 * scale)), max(w, round(W0 * scale))
    img = img.resize((rw, rh), Image.BILINEAR)
    top, left = (rh - h) // 2, (rw - w) // 2
    img = img.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x[None, :, None], (h, w)


# ---- models ----------------------------------------------------------------------------------
def load_models(args, torch_dtype):
    from diffusers import AutoencoderKLQwenImage
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    vae = AutoencoderKLQwenImage.from_pretrained(args.model, subfolder="vae", torch_dtype=torch_dtype)
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, subfolder="text_encoder",
                                                            torch_dtype=torch_dtype)
    tok = AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    return vae.eval(), te.eval(), tok


def random_models(args):
    """A tiny random VAE / Qwen2.5-VL text encoder / byte-level tokenizer (writing-path tests)."""
    import torch
    from diffusers import AutoencoderKLQwenImage
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {b: i for i, b in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # sorted: stable ids
    for s in specials:
        vocab[s] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.padding_side = "right"
    hd = args.dry_hidden
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"], hidden_size=hd, intermediate_size=2 * hd, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [hd // 8, hd // 8, hd // 4 - 2 * (hd // 8)]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hd,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
        image_token_id=len(vocab) + 1, video_token_id=len(vocab) + 2, vision_start_token_id=len(vocab) + 3)
    te = Qwen2_5_VLForConditionalGeneration(cfg)
    for p in te.parameters():  # transformers' init is tiny (std 0.02): widen it so outputs vary visibly
        p.data.normal_(0.0, 0.2) if p.dim() > 1 else None
    return vae.eval(), te.eval(), tok


def measured_drop(tok):
    """Number of tokens of the template before the prompt: what the drop index must be."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tok(prefix, add_special_tokens=False).input_ids)


# ---- encoding --------------------------------------------------------------------------------
def encode_prompt(te, tok, prompt, drop_idx, max_text_tokens):
    """[Nt, hidden]: diffusers' _get_qwen_prompt_embeds for one prompt."""
    import torch
    t = tok([PROMPT_TEMPLATE.format(prompt)], max_length=max_text_tokens + drop_idx, padding=True,
            truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = te(input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True)
    hs = out.hidden_states[-1][0][t.attention_mask[0].bool()]
    emb = hs[drop_idx:]
    if emb.shape[0] == 0:
        raise ValueError("the prompt left no tokens after the template prefix")
    return emb


def encode_image(vae, x, sample_posterior, generator):
    import torch
    x = x.to(next(vae.parameters()).dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample_posterior else dist.mean  # [1, 16, 1, h, w]
    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return ((z - mean) / std)[0, :, 0]


def make_random_inputs(out_dir, seed):
    """A few generated images (odd sizes) and prompts; returns metadata rows with absolute paths."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    src = os.path.join(out_dir, "_dry_run_images")
    os.makedirs(src, exist_ok=True)
    rows = []
    for i, ((h, w), prompt) in enumerate(zip([(70, 100), (64, 64), (100, 50)],
                                             ["a red cube on a wooden table", "sunset", "two cats, one asleep, "
                                              "under a blue umbrella in the rain"])):
        p = os.path.join(src, f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        rows.append({"image": p, "prompt": prompt})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers Qwen-Image folder (vae/, text_encoder/, tokenizer/)")
    ap.add_argument("--metadata", help="CSV / JSON / JSONL with image and prompt columns")
    ap.add_argument("--base-path", help="folder the image paths are relative to (default: the metadata's folder)")
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--height", type=int, default=0, help="fixed height (multiple of 16); with --width")
    ap.add_argument("--width", type=int, default=0, help="fixed width (multiple of 16); with --height")
    ap.add_argument("--max-pixels", type=int, default=1024 * 1024, help="area cap for dynamic resolution (1048576)")
    ap.add_argument("--max-text-tokens", type=int, default=1024,
                    help="prompt tokens kept after the drop (diffusers: 1024; DiffSynth: 4096)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="storage dtype of latents and prompt_emb (bf16 as DiffSynth caches; strata reads both)")
    ap.add_argument("--compute-dtype", choices=["bf16", "fp32"], default="bf16",
                    help="dtype the VAE and text encoder run in (fp32 is slow for the 7B encoder)")
    ap.add_argument("--sample-posterior", action="store_true", help="sample the VAE posterior instead of its mean")
    ap.add_argument("--drop-idx", type=int, default=None,
                    help="template tokens to drop (default 34, checked against the tokenizer); only for a tokenizer "
                         "other than Qwen-Image's, e.g. a test model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run-random", action="store_true",
                    help="tiny random VAE + text encoder + byte tokenizer instead of --model (tests the writer)")
    ap.add_argument("--dry-hidden", type=int, default=24, help="text encoder hidden size with --dry-run-random")
    args = ap.parse_args()
    if bool(args.model) == bool(args.dry_run_random):
        ap.error("give exactly one of --model PATH and --dry-run-random")
    if bool(args.height) != bool(args.width) or args.height % 16 or args.width % 16:
        ap.error("--height and --width go together and must be multiples of 16")
    if not args.metadata and not args.dry_run_random:
        ap.error("--metadata is required (except with --dry-run-random, which generates images)")

    import torch
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    if args.dry_run_random:
        vae, te, tok = random_models(args)
        drop_idx = measured_drop(tok) if args.drop_idx is None else args.drop_idx
    else:
        vae, te, tok = load_models(args, torch.bfloat16 if args.compute_dtype == "bf16" else torch.float32)
        drop_idx = DROP_IDX if args.drop_idx is None else args.drop_idx
        got = measured_drop(tok)
        if args.drop_idx is None and got != DROP_IDX:
            raise SystemExit(f"the tokenizer in {args.model} splits the template prefix into {got} tokens, not "
                             f"{DROP_IDX}: prompt embeddings would keep or lose template tokens. Use the Qwen2.5-VL "
                             "tokenizer of Qwen-Image (or force a count with --drop-idx).")

    if args.metadata:
        rows = read_metadata(args.metadata)
        base = args.base_path or os.path.dirname(os.path.abspath(args.metadata))
    else:
        rows, base = make_random_inputs(args.out, args.seed), ""
    store = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    meta_tmp = os.path.join(args.out, "metadata.jsonl.tmp")
    n_digits = max(6, len(str(len(rows))))
    with open(meta_tmp, "w", encoding="utf-8") as meta:
        for i, row in enumerate(rows):
            img_path = row["image"] if os.path.isabs(row["image"]) else os.path.join(base, row["image"])
            try:
                x, (h, w) = load_image(img_path, args.height, args.width, args.max_pixels)
                lat = encode_image(vae, x, args.sample_posterior, gen)
                emb = encode_prompt(te, tok, row["prompt"], drop_idx, args.max_text_tokens)
            except Exception as e:  # name the row, then stop: a partial cache is still consistent
                raise SystemExit(f"{args.metadata or 'generated input'} row {i + 1} ({img_path}): {e}")
            name = f"{i:0{n_digits}d}.safetensors"
            tensors = {"latents": lat.to(store).contiguous(), "prompt_emb": emb.to(store).contiguous(),
                       "prompt_mask": torch.ones(emb.shape[0], dtype=torch.uint8)}
            tmp = os.path.join(args.out, name + ".tmp")
            save_file(tensors, tmp, metadata={"prompt": row["prompt"], "source": img_path, "height": str(h),
                                              "width": str(w), "drop_idx": str(drop_idx)})
            os.replace(tmp, os.path.join(args.out, name))
            meta.write(json.dumps({"file": name, "prompt": row["prompt"], "height": h, "width": w,
                                   "source": img_path}, ensure_ascii=False) + "\n")
            print(f"[{i + 1}/{len(rows)}] {name}: latents {list(lat.shape)}, prompt_emb {list(emb.shape)}",
                  file=sys.stderr)
    os.replace(meta_tmp, os.path.join(args.out, "metadata.jsonl"))
    print(f"wrote {len(rows)} samples and metadata.jsonl to {args.out} (drop {drop_idx} template tokens)")


if __name__ == "__main__":
    main()

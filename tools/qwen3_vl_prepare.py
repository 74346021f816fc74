#!/usr/bin/env python3
"""Qwen3-VL(-MoE) data preparation for strata: images + conversations -> pre-tokenized samples.

Runs the transformers processor of the model (Qwen3VLProcessor: image processor + tokenizer + chat
template) and writes the format the qwen3_vl_moe plugin reads (models/qwen3_vl_moe/README.md
"Data", runtime/data.h):

  OUT/<nnnnnn>.safetensors   one per input row:
      input_ids       [S] I64        the chat template rendered with the answer(s), the image
                                     placeholders expanded by the processor (t*h*w / merge^2
                                     <|image_pad|> per image)
      labels          [S] I64        input_ids on the assistant answers (the answer text, its
                                     <|im_end|> and what the template puts after it), -100 on every
                                     other token: system, user turns, image tokens, the
                                     "<|im_start|>assistant\\n" headers. strata shifts them itself.
      pixel_values    [patches, C*T*P*P] F32 (or --pixel-dtype bf16)   the processor's flattened
                                     patches in its merge-window order (only with images)
      image_grid_thw  [images, 3] I64   (t, h, w) in patches per image (only with images)
      attention_mask  [S] I64        all ones, only with --attention-mask (strata pads batches
                                     itself; a sample's own mask is optional)
  OUT/metadata.jsonl         {"file", "n_tokens", "n_labels", "images", "image_grid_thw", "row"} per
                             sample, in input order (strata reads the "file" field)
  OUT/processor.json         the ids and sizes a strata config must agree with (image_token_id,
                             tokenizer_size (the model's vocab_size must be at least that),
                             patch/merge/temporal sizes, C*T*P*P)

Train on it with
  "data": {"dataset_base_path": "OUT", "dataset_metadata_path": "OUT/metadata.jsonl"}

Input: JSONL (or a JSON array), one object per sample, in one of these forms:
  {"image": "a.jpg", "prompt": "What is shown?", "answer": "A cat."}          single turn
  {"images": ["a.jpg", "b.png"], "prompt": "...", "answer": "...", "system": "..."}
  {"images": [...], "messages": [{"role": "user", "content": "<image>\\nDescribe."},
                                 {"role": "assistant", "content": "..."}, ...]}      multi-turn
  ("conversations" with "from": human/gpt/system and "value" as in LLaVA/ShareGPT data is
  accepted too; "content" may also be a transformers content list of {"type": "image"} /
  {"type": "text", "text": ...} items.)
In the single-turn form the images come first in the user turn, then the prompt. In the
conversation forms each "<image>" in a text takes the next image of "images" (an image item of a
content list likewise, or its own "image"/"path"/"url" path); images left over are put at the
start of the first user turn. Image paths are relative to --base-path (default: the input file's
folder). Every assistant turn is a training target.

Images go through the processor as it is configured (resize to multiples of patch*merge within
its min/max pixel budget; --min-pixels / --max-pixels override it). Sequences longer than
--max-tokens are refused (a truncated image would not match its pixel_values), naming the row.
Videos are not handled.

  python3 tools/qwen3_vl_prepare.py --model PATH/TO/Qwen3-VL-30B-A3B-Instruct --input data.jsonl --out data/cache
  python3 tools/qwen3_vl_prepare.py --dry-run-random --out /tmp/vl-cache        # no weights needed

--model is a folder (or hub id when the hub is reachable) with the processor files of the
checkpoint (preprocessor_config.json, tokenizer files, chat_template); the model weights are not
loaded; when the folder has the model's config.json, its image_token_id and vision patch / merge /
temporal sizes must match the processor's (an error otherwise). --dry-run-random builds a tiny processor in memory that fits strata's `tiny` preset
(byte-level tokenizer with the Qwen special tokens at the tiny preset's ids: <|vision_start|> 1000,
<|image_pad|> 1001, <|video_pad|> 1002, <|vision_end|> 1003, vocabulary 1004 <= 1024; image
processor with patch 4, merge 2, temporal 2: C*T*P*P = 96; a chat template shaped like
Qwen3-VL-Instruct's) and runs it on a few generated images and conversations (unless --input is
given): for testing the writing path — the token ids mean nothing. --save-processor DIR also saves
that processor (for `--model DIR`).

Needs torch, transformers, safetensors, Pillow, numpy (scripts/interop-setup installs them into
.venv-interop). Optional; not part of CI.
"""
import argparse
import json
import os
import sys

IGNORE = -100
# The tiny preset's special ids (models/qwen3_vl_moe/qwen3_vl_moe.c preset "tiny").
TINY_SPECIALS = {"<|endoftext|>": 997, "<|im_start|>": 998, "<|im_end|>": 999, "<|vision_start|>": 1000,
                 "<|image_pad|>": 1001, "<|video_pad|>": 1002, "<|vision_end|>": 1003}
# Shaped like Qwen3-VL-Instruct's template (no default system prompt; an image item renders as
# <|vision_start|><|image_pad|><|vision_end|>); used only by --dry-run-random.
DRY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


# ---- input -----------------------------------------------------------------------------------
def read_rows(path):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            rows = json.load(f)
            if not isinstance(rows, list):
                raise SystemExit(f"{path}: expected a JSON array of objects")
            return rows
        return [json.loads(line) for line in f if line.strip()]


def _text_items(text, images, where):
    """a string with <image> placeholders -> content items, taking images from the queue"""
    items = []
    parts = text.split("<image>")
    for k, part in enumerate(parts):
        if k:
            if not images:
                raise ValueError(f"{where}: more <image> placeholders than images")
            items.append({"type": "image", "path": images.pop(0)})
        if part.strip("\n") or (part and not k):
            items.append({"type": "text", "text": part.lstrip("\n") if k else part})
    return items


def row_messages(row, where):
    """A row -> (messages as transformers content lists, image paths in order of appearance)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    imgs = row.get("images", row.get("image", []))
    queue = [imgs] if isinstance(imgs, str) else list(imgs)
    n_given = len(queue)
    msgs = []
    if "messages" in row or "conversations" in row:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        for turn in row.get("messages", row.get("conversations")):
            role = roles.get(turn.get("role", turn.get("from")))
            if role is None:
                raise ValueError(f"{where}: unknown role {turn.get('role', turn.get('from'))!r}")
            content = turn.get("content", turn.get("value"))
            if isinstance(content, str):
                items = _text_items(content, queue, where) if role == "user" else [{"type": "text", "text": content}]
            else:
                items = []
                for it in content:
                    if it.get("type") == "image":
                        path = it.get("image", it.get("path", it.get("url")))
                        if path is None:
                            if not queue:
                                raise ValueError(f"{where}: more image items than images")
                            path = queue.pop(0)
                        items.append({"type": "image", "path": path})
                    elif it.get("type") == "text":
                        items.append({"type": "text", "text": it["text"]})
                    else:
                        raise ValueError(f"{where}: content item of type {it.get('type')!r} (images and text only)")
            msgs.append({"role": role, "content": items})
    elif "prompt" in row and "answer" in row:
        if row.get("system"):
            msgs.append({"role": "system", "content": [{"type": "text", "text": row["system"]}]})
        prompt = _text_items(row["prompt"], queue, where)
        msgs.append({"role": "user", "content": prompt})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]})
    else:
        raise ValueError(f"{where}: needs 'prompt' and 'answer', or 'messages' / 'conversations'")
    if queue:  # images not placed by a placeholder: at the start of the first user turn
        first = next((m for m in msgs if m["role"] == "user"), None)
        if first is None:
            raise ValueError(f"{where}: images but no user turn to put them in")
        first["content"] = [{"type": "image", "path": p} for p in queue] + first["content"]
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: no assistant turn: nothing to train on")
    paths = [it["path"] for m in msgs for it in m["content"] if it["type"] == "image"]
    if len(paths) > n_given and n_given:
        raise ValueError(f"{where}: {len(paths)} images used, {n_given} given")
    return msgs, paths


# ---- processor -------------------------------------------------------------------------------
def _image_only_processor(ip, tok, chat_template):
    """Qwen3VLProcessor without its video processor (videos are not handled here, and transformers'
    video processors need torchvision, which the image side does not)."""
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None,
                                     chat_template=chat_template)


def load_processor(path):
    """The checkpoint's tokenizer, image processor and chat template (processor's chat_template.jinja /
    chat_template.json, else the tokenizer's)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    ip = AutoImageProcessor.from_pretrained(path)
    tmpl = None
    if os.path.isdir(path):
        jinja, js = os.path.join(path, "chat_template.jinja"), os.path.join(path, "chat_template.json")
        if os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                tmpl = f.read()
        elif os.path.exists(js):
            with open(js, encoding="utf-8") as f:
                tmpl = json.load(f)["chat_template"]
    tmpl = tmpl or tok.chat_template
    if not tmpl:
        raise SystemExit(f"{path}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")
    return _image_only_processor(ip, tok, tmpl)


def check_model_config(path, info):
    """the processor against the checkpoint's config.json, when the folder has one"""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    vc = cfg.get("vision_config", {})
    pairs = [("image_token_id", cfg.get("image_token_id"), info["image_token_id"]),
             ("vision_config.patch_size", vc.get("patch_size"), info["patch_size"]),
             ("vision_config.spatial_merge_size", vc.get("spatial_merge_size"), info["merge_size"]),
             ("vision_config.temporal_patch_size", vc.get("temporal_patch_size"), info["temporal_patch_size"])]
    bad = [f"{k} {a} (processor: {b})" for k, a, b in pairs if a is not None and a != b]
    if bad:
        raise SystemExit(f"{cfg_path} disagrees with the processor in the same folder: {', '.join(bad)}")


def random_processor():
    """A tiny Qwen3-VL processor fitting strata's tiny preset (writing-path tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {b: i for i, b in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # sorted: stable ids
    for i in range(len(vocab), min(TINY_SPECIALS.values())):
        vocab[f"<|unused_{i}|>"] = i  # never produced (no merges); keeps the special ids where strata wants them
    vocab.update(TINY_SPECIALS)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    specials = list(TINY_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = DRY_CHAT_TEMPLATE
    ip = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    return _image_only_processor(ip, tok, DRY_CHAT_TEMPLATE)


def make_random_inputs(out_dir, seed):
    """A few generated images (odd sizes) and conversations; returns rows with absolute paths."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    src = os.path.join(out_dir, "_dry_run_images")
    os.makedirs(src, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate([(20, 30), (32, 32), (41, 17)]):
        p = os.path.join(src, f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return [
        {"image": paths[0], "prompt": "What color is the cube?", "answer": "Red."},
        {"images": [paths[1], paths[2]], "system": "Answer briefly.",
         "prompt": "Compare <image> and <image>.", "answer": "The first is square; the second is tall."},
        {"images": [paths[2]], "conversations": [
            {"from": "human", "value": "<image>\nHow many cats?"}, {"from": "gpt", "value": "Two."},
            {"from": "human", "value": "Asleep?"}, {"from": "gpt", "value": "One of them."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    ]


def processor_info(proc):
    tok, ip = proc.tokenizer, proc.image_processor
    return {"image_token_id": proc.image_token_id, "video_token_id": proc.video_token_id,
            "vision_start_token_id": proc.vision_start_token_id, "vision_end_token_id": proc.vision_end_token_id,
            "tokenizer_size": len(tok), "patch_size": ip.patch_size, "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "patch_dim": 3 * ip.temporal_patch_size * ip.patch_size * ip.patch_size}


# ---- one sample --------------------------------------------------------------------------------
def render(proc, msgs, add_generation_prompt):
    # the paths are not handed to the template (it only needs the item types)
    clean = [{"role": m["role"], "content": [{"type": "image"} if it["type"] == "image" else it for it in m["content"]]}
             for m in msgs]
    return proc.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)


def expand(proc, text, counts):
    """text with each image placeholder replaced by as many as the processor put there"""
    parts = text.split(proc.image_token)
    if len(parts) - 1 > len(counts):
        raise ValueError(f"the template rendered {len(parts) - 1} image placeholders for {len(counts)} images")
    return "".join(p + (proc.image_token * counts[k] if k < len(parts) - 1 else "") for k, p in enumerate(parts))


def encode(proc, msgs, images, max_tokens):
    """(input_ids, labels, pixel_values or None, image_grid_thw or None) for one conversation"""
    import torch
    full = render(proc, msgs, False)
    enc = proc(text=[full], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0].long()
    if ids.shape[0] > max_tokens:
        raise ValueError(f"{ids.shape[0]} tokens, more than --max-tokens {max_tokens}")
    grid = enc.get("image_grid_thw")
    merge2 = proc.image_processor.merge_size ** 2
    counts = [int(g.prod()) // merge2 for g in grid] if grid is not None else []
    labels = torch.full_like(ids, IGNORE)
    tok = proc.tokenizer

    def n_tokens(text):
        t = tok(expand(proc, text, counts), add_special_tokens=False).input_ids
        if t != ids[:len(t)].tolist():
            raise ValueError("the chat template's rendering of the conversation up to an answer does not tokenize "
                             "to a prefix of the whole conversation's tokens: cannot place the labels")
        return len(t)

    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = n_tokens(render(proc, msgs[:k], True))
        end = n_tokens(render(proc, msgs[:k + 1], False))
        if end <= start:
            raise ValueError(f"assistant turn {k + 1} has no tokens")
        labels[start:end] = ids[start:end]
    if (labels != IGNORE).sum() == 0:
        raise ValueError("no label token")
    pix = enc.get("pixel_values")
    return ids, labels, pix, grid.long() if grid is not None else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="folder (or hub id) with the checkpoint's processor, tokenizer and chat template")
    ap.add_argument("--input", help="JSONL (or JSON array) of samples, see above")
    ap.add_argument("--base-path", help="folder the image paths are relative to (default: the input file's folder)")
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="longest sequence accepted (8192); longer rows are "
                                                                 "an error")
    ap.add_argument("--min-pixels", type=int, default=None, help="image area lower bound (processor default)")
    ap.add_argument("--max-pixels", type=int, default=None, help="image area upper bound (processor default)")
    ap.add_argument("--pixel-dtype", choices=["fp32", "bf16"], default="fp32", help="storage dtype of pixel_values")
    ap.add_argument("--attention-mask", action="store_true", help="also write attention_mask (all ones)")
    ap.add_argument("--seed", type=int, default=0, help="generated images with --dry-run-random")
    ap.add_argument("--dry-run-random", action="store_true",
                    help="tiny processor for strata's tiny preset instead of --model (tests the writer)")
    ap.add_argument("--save-processor", help="with --dry-run-random: also save_pretrained() the processor there")
    args = ap.parse_args()
    if bool(args.model) == bool(args.dry_run_random):
        ap.error("give exactly one of --model PATH and --dry-run-random")
    if not args.input and not args.dry_run_random:
        ap.error("--input is required (except with --dry-run-random, which generates images and conversations)")

    import torch
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    if args.dry_run_random:
        proc = random_processor()
        if args.save_processor:  # what --model reads back: tokenizer (+ its template), image processor
            proc.tokenizer.save_pretrained(args.save_processor)
            proc.image_processor.save_pretrained(args.save_processor)
    else:
        proc = load_processor(args.model)
    if args.min_pixels or args.max_pixels:
        size = dict(proc.image_processor.size)
        if args.min_pixels:
            size["shortest_edge"] = args.min_pixels
        if args.max_pixels:
            size["longest_edge"] = args.max_pixels
        proc.image_processor.size = size
    info = processor_info(proc)
    if args.model and os.path.isdir(args.model):
        check_model_config(args.model, info)
    if proc.image_token_id is None or proc.image_token_id == proc.tokenizer.unk_token_id:
        raise SystemExit(f"the tokenizer has no {proc.image_token} token: not a Qwen3-VL processor")

    if args.input:
        rows, src = read_rows(args.input), args.input
        base = args.base_path or os.path.dirname(os.path.abspath(args.input))
    else:
        rows, src, base = make_random_inputs(args.out, args.seed), "generated input", ""
    from PIL import Image
    store = torch.bfloat16 if args.pixel_dtype == "bf16" else torch.float32
    meta_tmp = os.path.join(args.out, "metadata.jsonl.tmp")
    n_digits = max(6, len(str(len(rows))))
    with open(meta_tmp, "w", encoding="utf-8") as meta:
        for i, row in enumerate(rows):
            where = f"{src} row {i + 1}"
            try:
                msgs, paths = row_messages(row, where)
                paths = [p if os.path.isabs(p) or "://" in p else os.path.join(base, p) for p in paths]
                images = [Image.open(p).convert("RGB") for p in paths]
                ids, labels, pix, grid = encode(proc, msgs, images, args.max_tokens)
            except (ValueError, OSError, KeyError, TypeError) as e:  # name the row, then stop
                raise SystemExit(f"{where}: {e}" if not str(e).startswith(where) else str(e))
            tensors = {"input_ids": ids.contiguous(), "labels": labels.contiguous()}
            if args.attention_mask:
                tensors["attention_mask"] = torch.ones_like(ids)
            if pix is not None:
                tensors["pixel_values"] = pix.to(store).contiguous()
                tensors["image_grid_thw"] = grid.contiguous()
            name = f"{i:0{n_digits}d}.safetensors"
            tmp = os.path.join(args.out, name + ".tmp")
            save_file(tensors, tmp, metadata={"row": str(i + 1), "source": src})
            os.replace(tmp, os.path.join(args.out, name))
            n_lab = int((labels != IGNORE).sum())
            meta.write(json.dumps({"file": name, "n_tokens": int(ids.shape[0]), "n_labels": n_lab, "images": paths,
                                   "image_grid_thw": grid.tolist() if grid is not None else [], "row": i + 1},
                                  ensure_ascii=False) + "\n")
            print(f"[{i + 1}/{len(rows)}] {name}: {ids.shape[0]} tokens ({n_lab} labelled), {len(paths)} image(s)"
                  + (f", pixel_values {list(pix.shape)}" if pix is not None else ""), file=sys.stderr)
    os.replace(meta_tmp, os.path.join(args.out, "metadata.jsonl"))
    with open(os.path.join(args.out, "processor.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"wrote {len(rows)} samples, metadata.jsonl and processor.json to {args.out} (image_token_id "
          f"{info['image_token_id']}, patch_dim {info['patch_dim']}, tokenizer size {info['tokenizer_size']})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Sample images from a Qwen-Image LoRA checkpoint while strata trains: use it as train.on_save.

    "train": {"on_save": "python3 tools/sample_qwen_image.py --base /models/Qwen-Image --prompt 'a red fox'"}

strata runs the command after every checkpoint with STRATA_CHECKPOINT (the step folder),
STRATA_STEP and STRATA_SAMPLES_DIR in the environment; every PNG written to STRATA_SAMPLES_DIR
appears in TensorBoard under samples/<file name>. This script exports the checkpoint's adapters
with `strata export --format peft`, loads the base pipeline with diffusers, applies the adapters with
`load_lora_weights`, and renders each prompt with a fixed seed (so steps are comparable).

Needs torch + diffusers (scripts/interop-setup installs them into .venv-interop; point the command
at .venv-interop/bin/python). Optional; not used by the tests. A full (non-LoRA) run: pass --full,
the transformer is then exported with --format diffusers and swapped into the pipeline."""
import argparse, os, subprocess, sys, tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="diffusers Qwen-Image pipeline folder (or hub id)")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--steps", type=int, default=30, help="denoising steps")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--cfg", type=float, default=4.0, help="true_cfg_scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the run trains the whole transformer, not LoRA")
    ap.add_argument("--strata", default=os.environ.get("STRATA", "strata"), help="the strata binary")
    ap.add_argument("--device", default="cuda" if os.path.exists("/dev/nvidia0") else "cpu")
    a = ap.parse_args()
    ckpt, out = os.environ.get("STRATA_CHECKPOINT"), os.environ.get("STRATA_SAMPLES_DIR")
    if not ckpt or not out:
        sys.exit("sample_qwen_image.py: run it as train.on_save (STRATA_CHECKPOINT / STRATA_SAMPLES_DIR unset)")
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        fmt = "diffusers" if a.full else "peft"
        subprocess.run([a.strata, "export", ckpt, "--format", fmt, "--out", os.path.join(tmp, fmt)], check=True)
        if a.full:
            transformer = QwenImageTransformer2DModel.from_pretrained(os.path.join(tmp, fmt), torch_dtype=dtype)
            pipe = QwenImagePipeline.from_pretrained(a.base, transformer=transformer, torch_dtype=dtype)
        else:
            pipe = QwenImagePipeline.from_pretrained(a.base, torch_dtype=dtype)
            pipe.load_lora_weights(os.path.join(tmp, fmt))
    pipe.to(a.device)
    for i, prompt in enumerate(a.prompt):
        g = torch.Generator(device="cpu").manual_seed(a.seed + i)
        image = pipe(prompt=prompt, negative_prompt=" ", width=a.size, height=a.size, num_inference_steps=a.steps,
                     true_cfg_scale=a.cfg, generator=g).images[0]
        path = os.path.join(out, "prompt%02d.png" % i)
        image.save(path)
        print("step %s: %s -> %s" % (os.environ.get("STRATA_STEP"), prompt, path))


if __name__ == "__main__":
    main()

"""Overhead of `finetune sample` over a bare diffusers pipeline making the same images, in one process.

Both sides use the same loaded tiny base and the same LoRA file, and make the same images: for each
prompt, one batch of all seeds with no adapter (scale 0), then the LoRA loaded and one batch per scale
with `set_adapters`. finetune sample additionally checks the LoRA against the base, writes every image
as a PNG with provenance (and the watermark), a contact sheet per prompt, index.html and gallery.json.
Rounds alternate the three variants (bare, finetune with watermark, finetune without) and the best
time of each is compared. Both wall time and this process's CPU time are shown: on a shared machine
the CPU time (with --threads 1) is the steadier measure of the work each side does.
Target: overhead <= 5%.

Run: .venv/bin/python bench/sample.py [--size 128] [--steps 10] [--seeds 4] [--prompts 2] [--rounds 3]
                                      [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a photo of ohwx person", "a portrait of ohwx person as an astronaut, oil painting",
           "ohwx person on the beach", "a close up photo of ohwx person smiling"]
SCALES = [0.0, 0.5, 1.0]


def make_lora(folder: Path) -> Path:
    """A random, non-zero rank-8 LoRA for the tiny UNet in the diffusers layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from finetune import runs
    from finetune.models import load_base

    pipe = load_base("tiny").pipe
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    return folder / runs.WEIGHT_NAME


def bare(pipe, lora: Path, prompts: list[str], seeds: list[int], size: int, steps: int) -> int:
    """The same images with diffusers alone, kept in memory."""
    import torch
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def batch(prompt):
        return pipe([prompt] * len(seeds), num_inference_steps=steps, width=size, height=size,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    images = []
    with torch.no_grad():
        for prompt in prompts:
            images += batch(prompt)
        pipe.load_lora_weights(str(lora), adapter_name="bench")
        for scale in SCALES[1:]:
            pipe.set_adapters(["bench"], adapter_weights=[scale])
            for prompt in prompts:
                images += batch(prompt)
        pipe.unload_lora_weights()
    return len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda when there is one)")
    args = ap.parse_args()

    import diffusers
    import torch

    from finetune.models import load_base
    from finetune.sample import LoraFile, SheetSettings, sample

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder", on both sides
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base("tiny")
    base.pipe.to(device)
    original_scheduler = base.pipe.scheduler
    prompts, seeds = PROMPTS[: args.prompts], list(range(1, args.seeds + 1))
    n = len(prompts) * len(seeds) * len(SCALES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora = make_lora(tmp / "lora")

        def finetune(watermark: bool, k: int) -> None:
            sample(loras=[LoraFile(lora, name="bench")], base=base, prompts=prompts, progress=False,
                   settings=SheetSettings(seeds=seeds, scales=SCALES, steps=args.steps, width=args.size,
                                          height=args.size, scheduler="ddim", watermark=watermark),
                   out=tmp / f"gallery-{watermark}-{k}")

        variants = {"bare diffusers": lambda k: bare(base.pipe, lora, prompts, seeds, args.size, args.steps),
                    "finetune sample": lambda k: finetune(True, k),
                    "finetune sample --no-watermark": lambda k: finetune(False, k)}
        variants["bare diffusers"](-1)  # warm-up: first calls allocate and pick kernels
        base.pipe.scheduler = original_scheduler
        wall = {name: float("inf") for name in variants}
        cpu = dict(wall)
        for k in range(args.rounds):
            for name, run in variants.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t, c = time.perf_counter(), time.process_time()
                run(k)
                if device == "cuda":
                    torch.cuda.synchronize()
                wall[name] = min(wall[name], time.perf_counter() - t)
                cpu[name] = min(cpu[name], time.process_time() - c)
                base.pipe.scheduler = original_scheduler

    print(f"{n} images ({len(prompts)} prompts x {len(seeds)} seeds x scales {', '.join(f'{s:g}' for s in SCALES)}), "
          f"tiny base, {args.size}x{args.size}, {args.steps} DDIM steps, {device}, {torch.get_num_threads()} torch "
          f"threads, best of {args.rounds} rounds")
    print(f"  {'':32s} {'wall':>9s} {'ms/image':>9s} {'overhead':>9s}   {'CPU':>9s} {'overhead':>9s}")
    for name in variants:
        ow = "" if name == "bare diffusers" else f"{100 * (wall[name] / wall['bare diffusers'] - 1):+8.1f}%"
        oc = "" if name == "bare diffusers" else f"{100 * (cpu[name] / cpu['bare diffusers'] - 1):+8.1f}%"
        print(f"  {name:32s} {wall[name]:8.2f}s {wall[name] / n * 1000:9.1f} {ow:>9s}   {cpu[name]:8.2f}s {oc:>9s}")
    print("target: overhead <= 5%")


if __name__ == "__main__":
    main()

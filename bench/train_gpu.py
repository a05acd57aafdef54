"""Peak VRAM and speed of `finetune train` on a CUDA GPU with an SD 1.5-sized model.

Builds a pipeline with SD 1.5's shapes from config (UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder,
the 4-level VAE; random weights, fp16 on disk), prepares the example photos at 512 px, and runs the
recipe with the 8 GB preset's memory settings: batch 1, fp16 mixed precision, 8-bit AdamW, SDPA (or
xformers where installed), gradient checkpointing, cached latents and captions, LoRA rank 16.
Prints it/s (median over the steps after the first 5) and peak VRAM: over the whole run (loading,
VAE caching and training) and over the training loop alone. Target: peak <= 5 GiB.

Not part of the tests. Run on a machine with a CUDA build of torch:
    .venv/bin/python bench/train_gpu.py [--steps 50] [--prior]
(--prior: prior preservation on, with 8 class images generated first, as the preset trains.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "datasets" / "example-photos"
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
GiB = 2**30


def build_base(folder: Path, device: str) -> None:
    """An SD 1.5-shaped pipeline with random weights, saved as a diffusers folder in fp16."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from finetune.models.tiny import SCHEDULER_CONFIG, write_tokenizer

    write_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    with torch.device(device):  # initialising ~1.1 B random weights is much faster on the GPU
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder / "base", safe_serialization=True)
    del pipe, unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prior", action="store_true", help="prior preservation on (8 class images)")
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit(f"bench/train_gpu.py measures VRAM on a CUDA GPU, and this machine has none "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it where a GPU and a CUDA "
                 "build of torch are installed (make install TORCH=\"torch==2.13.0 --index-url "
                 "https://download.pytorch.org/whl/cu128\"); bench/train.py is the CPU benchmark.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetune.config import load_config
    from finetune.data.prepare import prepare
    from finetune.train.lora import check_attention, finish, fit, setup

    work = args.keep or Path(tempfile.mkdtemp(prefix="finetune-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        if not (work / "base" / "model_index.json").is_file():
            build_base(work, "cuda")
        dataset = work / "dataset"
        if not (dataset / "manifest.jsonl").is_file():
            prepare(EXAMPLES, dataset, load_config("person-sd15-lora-8gb").data, progress=False)
        print(f"built the SD 1.5-shaped base and the 512 px dataset in {time.perf_counter() - t:.0f} s")

        prior = ["train.prior_preservation=true", "train.num_class_images=8", "sample.steps=20"] if args.prior \
            else ["train.prior_preservation=false"]
        cfg = load_config("person-sd15-lora-8gb", [
            f"model.base={work / 'base'}", "train.batch_size=1", f"train.max_steps={args.steps}",
            "train.log_every=1", "train.save_every=0", "sample.every=0", "sample.prompts=[]", "lora.rank=16",
            *prior])
        torch.cuda.reset_peak_memory_stats()
        run_dir = work / f"run-{time.strftime('%H%M%S')}"
        run = setup(cfg, dataset, run_dir)
        setup_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fit(run)
        loop_peak, loop_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        finish(run)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["it_s"] for r in rows[5:]] or [r["it_s"] for r in rows]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    peak = max(setup_peak, loop_peak)
    attention = check_attention(cfg.train.attention, torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {attention} attention, fp16, 8-bit AdamW, "
          f"gradient checkpointing, batch 1{' + 1 class image' if args.prior else ''}, 512 px")
    print(f"it/s (median of {len(rates)} steps):   {statistics.median(rates):.2f}")
    print(f"peak VRAM, training loop:       {loop_peak / GiB:.2f} GiB allocated ({loop_reserved / GiB:.2f} GiB reserved)")
    print(f"peak VRAM, setup (load, cache): {setup_peak / GiB:.2f} GiB allocated")
    verdict = "met" if peak <= 5 * GiB else "MISSED"
    print(f"peak VRAM, whole run:           {peak / GiB:.2f} GiB  (target <= 5 GiB: {verdict})")


if __name__ == "__main__":
    main()

"""Peak VRAM and speed of `finetune train` on a CUDA GPU with an SD 1.5- or SDXL-sized model.

--arch sd15 (default): a pipeline with SD 1.5's shapes (UNet 320/640/1280/1280, CLIP ViT-L/14 text
encoder, the 4-level VAE), the example photos prepared at 512 px, and the person-sd15-lora-8gb preset's
memory settings: batch 1, fp16 mixed precision, 8-bit AdamW, SDPA (or xformers where installed),
gradient checkpointing, cached latents and captions, LoRA rank 16. Target: peak <= 5 GiB.

--arch sdxl: SDXL 1.0 base's shapes (UNet 320/640/1280 with 1/2/10 transformer layers, 2.57 B
parameters, conditioned on both encoders' 2048-wide hidden states and text_time micro-conditioning;
CLIP ViT-L/14 plus OpenCLIP ViT-bigG/14 with its 1280 projection; SDXL's VAE, kept fp32 by the recipe),
the photos prepared at 1024 px, and the person-sdxl-lora-8gb preset as it is: batch 1, fp16, 8-bit
AdamW, gradient checkpointing, cached latents and both encoders' embeddings, UNet-only LoRA rank 8.
Target: peak <= 10 GiB.

Random weights, fp16 on disk; the text encoders have CLIP's vocabulary size (49408) so their embedding
tables weigh what the real ones do. Prints it/s (median over the steps after the first 5) and peak
VRAM: over the whole run (loading, VAE caching and training) and over the training loop alone.

Not part of the tests. Run on a machine with a CUDA build of torch:
    .venv/bin/python bench/train_gpu.py [--arch sd15|sdxl] [--steps 50] [--prior]
(--prior: prior preservation on, with 8 class images generated first, as the SD 1.5 preset trains.)
    .venv/bin/python bench/train_gpu.py --arch sdxl --dry-run
builds the models on PyTorch's meta device (no memory, no GPU needed) and prints their sizes.
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
GiB = 2**30
CLIP_VOCAB = 49408

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

# SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0), from its unet/, vae/ and text_encoder_2/ configs.
UNET_XL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
               cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816, norm_num_groups=32)
VAE_XL = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

ARCHS = {
    "sd15": dict(name="SD 1.5", preset="person-sd15-lora-8gb", overrides=["lora.rank=16"], target_gib=5),
    "sdxl": dict(name="SDXL", preset="person-sdxl-lora-8gb", overrides=[], target_gib=10),
}


def build_models(arch: str, tokenizer_dir: Path) -> dict:
    """The pipeline's components with random weights, on the current default device (see `torch.device`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from finetune.models.tiny import write_tokenizer

    write_tokenizer(tokenizer_dir)

    def tokenizer(**kwargs):
        return CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77,
                             **kwargs)

    def text_config(shape: dict, tok) -> CLIPTextConfig:
        return CLIPTextConfig(**shape, vocab_size=CLIP_VOCAB, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    tok = tokenizer()
    if arch == "sd15":
        return dict(tokenizer=tok, text_encoder=CLIPTextModel(text_config(TEXT, tok)),
                    unet=UNet2DConditionModel(**UNET), vae=AutoencoderKL(**VAE))
    tok_2 = tokenizer(pad_token="!")  # OpenCLIP pads with token 0, as SDXL's tokenizer_2 says
    return dict(tokenizer=tok, tokenizer_2=tok_2, text_encoder=CLIPTextModel(text_config(TEXT, tok)),
                text_encoder_2=CLIPTextModelWithProjection(text_config(TEXT_G, tok_2)),
                unet=UNet2DConditionModel(**UNET_XL), vae=AutoencoderKL(**VAE_XL))


def build_base(folder: Path, device: str, arch: str) -> None:
    """A pipeline of `arch`'s shapes with random weights, saved as a diffusers folder in fp16."""
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from finetune.models import tiny
    from finetune.models.families import sdxl_tiny as tiny_sdxl

    torch.manual_seed(0)
    with torch.device(device):  # initialising billions of random weights is much faster on the GPU
        parts = build_models(arch, folder / "tok")
    if arch == "sd15":
        pipe = StableDiffusionPipeline(**parts, scheduler=DDIMScheduler(**tiny.SCHEDULER_CONFIG), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, scheduler=EulerDiscreteScheduler(**tiny_sdxl.SCHEDULER_CONFIG),
                                         add_watermarker=False)
    pipe.to(torch.float16).save_pretrained(folder / "base", safe_serialization=True)
    del pipe, parts
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_config(arch: str, base: Path, steps: int, prior: bool):
    """The arch's 8 GB preset with the bench's base, length and no sampling (prior preservation as asked)."""
    from finetune.config import load_config

    spec = ARCHS[arch]
    prior_sets = (["train.prior_preservation=true", "train.num_class_images=8", "sample.steps=20"] if prior
                  else ["train.prior_preservation=false"])
    return load_config(spec["preset"], [
        f"model.base={base}", "train.batch_size=1", f"train.max_steps={steps}", "train.log_every=1",
        "train.save_every=0", "sample.every=0", "sample.prompts=[]", *spec["overrides"], *prior_sets])


def dry_run(arch: str) -> None:
    """Build the models on the meta device (shapes only) and print their sizes and the run's settings."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        parts = build_models(arch, Path(tmp))
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            print(f"{name:15s} {sum(p.numel() for p in part.parameters()) / 1e6:8.1f} M parameters")
    cfg = bench_config(arch, Path("BASE"), 50, prior=False)
    t = cfg.train
    print(f"preset {ARCHS[arch]['preset']}: {cfg.data.resolution} px, batch {t.batch_size}, {t.mixed_precision}, "
          f"{t.optimizer}, gradient checkpointing {t.gradient_checkpointing}, cache latents {t.cache_latents}, "
          f"cache text {t.cache_text}, LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}, "
          f"text-encoder LoRA {cfg.lora.train_text_encoder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd15", help="model size to measure (default: sd15)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prior", action="store_true", help="prior preservation on (8 class images)")
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the models on the meta device and print their sizes; needs no GPU")
    args = ap.parse_args()
    spec = ARCHS[args.arch]
    if args.dry_run:
        return dry_run(args.arch)

    import torch

    if not torch.cuda.is_available():
        sys.exit(f"bench/train_gpu.py measures VRAM on a CUDA GPU, and this machine has none "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it where a GPU and a CUDA "
                 "build of torch are installed (make install TORCH=\"torch==2.13.0 --index-url "
                 "https://download.pytorch.org/whl/cu128\"); bench/train.py is the CPU benchmark, and --dry-run "
                 "checks the model shapes here.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetune.config import load_config
    from finetune.data.prepare import prepare
    from finetune.train.lora import check_attention, finish, fit, setup

    work = args.keep or Path(tempfile.mkdtemp(prefix=f"finetune-bench-gpu-{args.arch}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        if not (work / "base" / "model_index.json").is_file():
            build_base(work, "cuda", args.arch)
        cfg = bench_config(args.arch, work / "base", args.steps, args.prior)
        dataset = work / "dataset"
        if not (dataset / "manifest.jsonl").is_file():
            prepare(EXAMPLES, dataset, load_config(spec["preset"]).data, progress=False)
        print(f"built the {spec['name']}-shaped base and the {cfg.data.resolution} px dataset in "
              f"{time.perf_counter() - t:.0f} s")

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

    peak, target = max(setup_peak, loop_peak), spec["target_gib"]
    attention = check_attention(cfg.train.attention, torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {spec['name']}, {attention} attention, "
          f"{cfg.train.mixed_precision}, {cfg.train.optimizer}, gradient checkpointing, LoRA rank {cfg.lora.rank}, "
          f"batch 1{' + 1 class image' if args.prior else ''}, {cfg.data.resolution} px")
    print(f"it/s (median of {len(rates)} steps):   {statistics.median(rates):.2f}")
    print(f"peak VRAM, training loop:       {loop_peak / GiB:.2f} GiB allocated ({loop_reserved / GiB:.2f} GiB reserved)")
    print(f"peak VRAM, setup (load, cache): {setup_peak / GiB:.2f} GiB allocated")
    verdict = "met" if peak <= target * GiB else "MISSED"
    print(f"peak VRAM, whole run:           {peak / GiB:.2f} GiB  (target <= {target} GiB: {verdict})")


if __name__ == "__main__":
    main()

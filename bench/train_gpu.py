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

--arch flux: FLUX.1-dev's shapes (a FluxTransformer2DModel of 19 double- and 38 single-stream blocks,
3072 wide, 11.9 B parameters, with the guidance embedding; CLIP ViT-L/14; T5-XXL v1.1's encoder, 4.8 B;
the 16-channel VAE), saved in bf16, the photos prepared at 512 and at 1024 px, and LoRA training under
each Flux preset as it is (person-flux-dev-lora-24gb: 8-bit base; -16gb: NF4; -12gb: NF4 with its
blocks offloaded to CPU memory; person-flux-schnell-lora-16gb on schnell's shapes, no guidance input).
Prints it/s and peak VRAM of each preset x resolution against the card size its name gives.

Not part of the tests. Run on a machine with a CUDA build of torch:
    .venv/bin/python bench/train_gpu.py [--arch sd15|sdxl] [--steps 50] [--prior]
(--prior: prior preservation on, with 8 class images generated first, as the SD 1.5 preset trains.)
    .venv/bin/python bench/train_gpu.py --arch sd15 --before-after
trains twice, one run after the other: as the recipe does (text encoders and VAE parked once cached) and with them kept
on the GPU as before, and prints both peaks and their ratio.
    .venv/bin/python bench/train_gpu.py --arch sdxl --dry-run
builds the models on PyTorch's meta device (no memory, no GPU needed) and prints their sizes (--arch flux
also what it would run, and the memory each preset's weights and LoRA state take before activations).
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

# FLUX.1-dev (black-forest-labs/FLUX.1-dev), from its transformer/, text_encoder_2/ and vae/ configs.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        axes_dims_rope=(16, 56, 56))
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
              is_gated_act=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
              vocab_size=32128)
FLUX_VAE = dict(VAE, block_out_channels=(128, 256, 512, 512), latent_channels=16, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_PRESETS = ("person-flux-dev-lora-24gb", "person-flux-dev-lora-16gb", "person-flux-dev-lora-12gb",
                "person-flux-schnell-lora-16gb")
FLUX_RESOLUTIONS = (512, 1024)
# Bytes per weight of a quantized Linear (NF4 with double quantization: 4.13 bits; int8: 8 bits + row scales).
WEIGHT_BYTES = {"none": 2.0, "int8": 1.0, "nf4": 0.516}
# A LoRA parameter: its fp32 weight and gradient, and 8-bit AdamW's two states.
LORA_STATE_BYTES = 4 + 4 + 2

ARCHS = {
    "sd15": dict(name="SD 1.5", preset="person-sd15-lora-8gb", overrides=["lora.rank=16"], target_gib=5),
    "sdxl": dict(name="SDXL", preset="person-sdxl-lora-8gb", overrides=[], target_gib=10),
    "flux": dict(name="FLUX.1-dev", preset=FLUX_PRESETS[0], overrides=[], target_gib=24),
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


# ---------------------------------------------------------------- FLUX.1
def card_gib(preset: str) -> int:
    """The card size a preset's name gives (person-flux-dev-lora-16gb: 16)."""
    return int(preset.rsplit("-", 1)[1].removesuffix("gb"))


def build_flux_models(tokenizer_dir: Path, variant: str = "dev") -> dict:
    """FLUX.1's components with random weights, on the current default device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from finetune.models.families.flux_tiny import write_t5_tokenizer
    from finetune.models.tiny import write_tokenizer

    write_tokenizer(tokenizer_dir / "clip")
    tok = CLIPTokenizer(str(tokenizer_dir / "clip" / "vocab.json"), str(tokenizer_dir / "clip" / "merges.txt"),
                        model_max_length=77)
    tok_2 = write_t5_tokenizer(tokenizer_dir / "t5")
    tok_2.model_max_length = 512  # FLUX.1-dev's max_sequence_length
    clip = CLIPTextConfig(**TEXT, vocab_size=CLIP_VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    return dict(tokenizer=tok, tokenizer_2=tok_2, text_encoder=CLIPTextModel(clip),
                text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)),
                transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=variant == "dev"),
                vae=AutoencoderKL(**FLUX_VAE))


def build_flux_base(folder: Path, variant: str) -> None:
    """A FLUX.1-shaped diffusers folder in bf16. The schnell base replaces the dev base's transformer and
    scheduler in place (the two would not fit the disk side by side)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from finetune.models.families.flux_tiny import SCHEDULER_CONFIGS

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant])
    torch.manual_seed(0)
    if (folder / "base" / "model_index.json").is_file():
        with torch.device("cuda"):
            t = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=variant == "dev")
        shutil.rmtree(folder / "base" / "transformer")
        t.to(torch.bfloat16).save_pretrained(folder / "base" / "transformer", safe_serialization=True)
        scheduler.save_pretrained(folder / "base" / "scheduler")
    else:
        with torch.device("cuda"):  # initialising billions of random weights is much faster on the GPU
            parts = build_flux_models(folder / "tok", variant)
        FluxPipeline(**parts, scheduler=scheduler).to(torch.bfloat16).save_pretrained(folder / "base",
                                                                                    safe_serialization=True)
        del parts
    torch.cuda.empty_cache()


def lora_parameters(transformer, cfg) -> int:
    """The LoRA's parameter count on `transformer` for `cfg` (lora.targets, else FLUX.1's defaults)."""
    import torch

    from finetune.models.families import flux

    targets = cfg.lora.targets or flux.LORA_TARGETS
    exclude = () if cfg.lora.targets else flux.LORA_EXCLUDE
    return sum(cfg.lora.rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and name not in exclude
               and any(name == t or name.endswith("." + t) for t in targets))


def resident_weight_bytes(transformer, cfg) -> float:
    """The frozen transformer's weights on the GPU: Linear weights at the preset's quantization, the rest
    bf16; with block offloading, two blocks (the one running and the one being copied in)."""
    import torch

    def size(module) -> float:
        linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
        return linear * WEIGHT_BYTES[cfg.model.quantize] + (sum(p.numel() for p in module.parameters()) - linear) * 2

    if cfg.model.offload == "none":
        return size(transformer)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    rest = size(transformer) - sum(size(b) for b in blocks)
    return rest + 2 * max(size(b) for b in blocks)


def flux_config(preset: str, base: Path, resolution: int, steps: int):
    from finetune.config import load_config

    return load_config(preset, [f"model.base={base}", f"data.resolution={resolution}", f"data.min_side={resolution}",
                                f"train.max_steps={steps}", "train.log_every=1", "train.save_every=0",
                                "sample.every=0", "sample.prompts=[]"])


def flux_dry_run(steps: int) -> None:
    """The FLUX.1 shapes on the meta device, what the bench would run, and each preset's resident weights
    and LoRA state (activations come on top: the real run measures them)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        parts = build_flux_models(Path(tmp))
        schnell = build_flux_models(Path(tmp) / "s", "schnell")["transformer"]
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            print(f"{name:15s} {sum(p.numel() for p in part.parameters()) / 1e6:8.1f} M parameters")
    print(f"transformer (schnell: no guidance embedding) {sum(p.numel() for p in schnell.parameters()) / 1e6:.1f} M")
    print(f"\nwould run on a CUDA GPU, for each preset at {' and '.join(map(str, FLUX_RESOLUTIONS))} px: build the "
          f"FLUX.1-shaped base in bf16 (random weights), prepare the example photos, then finetune train's setup + "
          f"{steps} steps, printing it/s and peak VRAM against the card size\n")
    print(f"{'preset':32s} {'card':>5s} {'px':>5s} {'quantize':>8s} {'offload':>7s} {'LoRA':>8s} "
          f"{'weights':>8s} {'LoRA state':>10s}  settings")
    for preset in FLUX_PRESETS:
        for resolution in FLUX_RESOLUTIONS:
            cfg = flux_config(preset, Path("BASE"), resolution, steps)
            t = schnell if "schnell" in preset else parts["transformer"]
            n = lora_parameters(t, cfg)
            weights = resident_weight_bytes(t, cfg)
            tr = cfg.train
            print(f"{preset:32s} {card_gib(preset):>3d}GB {resolution:>5d} {cfg.model.quantize:>8s} "
                  f"{cfg.model.offload:>7s} {n / 1e6:>7.1f}M {weights / GiB:>7.2f}G {n * LORA_STATE_BYTES / GiB:>9.2f}G  "
                  f"rank {cfg.lora.rank}, {tr.mixed_precision}, {tr.optimizer}, "
                  f"checkpointing {str(tr.gradient_checkpointing).lower()}, guidance "
                  f"{cfg.flow.guidance if 'dev' in preset else 'none'}, {cfg.flow.timestep_sampler}")


def flux_bench(work: Path, steps: int) -> None:
    """Train under each Flux preset at each resolution and print peak VRAM and it/s against its card."""
    import torch

    from finetune.config import load_config
    from finetune.data.prepare import prepare
    from finetune.train.lora import finish, fit, setup

    results = []
    for variant in ("dev", "schnell"):
        t = time.perf_counter()
        build_flux_base(work, variant)
        print(f"built the FLUX.1-{variant}-shaped base in {time.perf_counter() - t:.0f} s", flush=True)
        for preset in [p for p in FLUX_PRESETS if variant in p]:
            for resolution in FLUX_RESOLUTIONS:
                cfg = flux_config(preset, work / "base", resolution, steps)
                dataset = work / f"dataset-{resolution}"
                if not (dataset / "manifest.jsonl").is_file():
                    prepare(EXAMPLES, dataset, load_config(preset, [f"data.resolution={resolution}"]).data,
                            progress=False)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                run_dir = work / f"run-{preset}-{resolution}"
                try:
                    run = setup(cfg, dataset, run_dir)
                    fit(run)
                    peak = torch.cuda.max_memory_allocated()
                    finish(run)
                    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                    rates = [r["it_s"] for r in rows[5:]] or [r["it_s"] for r in rows]
                    results.append((preset, resolution, statistics.median(rates), peak, ""))
                    del run
                except Exception as e:  # an out-of-memory preset is a result, not the end of the bench
                    results.append((preset, resolution, 0.0, torch.cuda.max_memory_allocated(),
                                    f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                shutil.rmtree(run_dir, ignore_errors=True)
                print(results[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, FLUX.1 shapes, {steps} steps")
    print(f"{'preset':32s} {'px':>5s} {'it/s':>6s} {'peak VRAM':>10s} {'card':>5s}  verdict")
    for preset, resolution, rate, peak, error in results:
        card = card_gib(preset)
        verdict = error or ("fits" if peak <= card * GiB else "DOES NOT FIT")
        print(f"{preset:32s} {resolution:>5d} {rate:>6.2f} {peak / GiB:>8.2f}G {card:>3d}GB  {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd15", help="model size to measure (default: sd15)")
    ap.add_argument("--steps", type=int, default=50, help="training steps per run (flux: per preset x resolution)")
    ap.add_argument("--prior", action="store_true", help="prior preservation on (8 class images)")
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--before-after", action="store_true",
                    help="sd15/sdxl: also train with the text encoders and VAE kept loaded (as before parking)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the models on the meta device and print their sizes; needs no GPU")
    args = ap.parse_args()
    spec = ARCHS[args.arch]
    if args.dry_run:
        return flux_dry_run(args.steps) if args.arch == "flux" else dry_run(args.arch)

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
    from finetune.train.lora import check_attention

    work = args.keep or Path(tempfile.mkdtemp(prefix=f"finetune-bench-gpu-{args.arch}-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.arch == "flux":
        try:
            return flux_bench(work, args.steps)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
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

        results = {}
        for label, parked in (("parked", True), *((("kept loaded", False),) if args.before_after else ())):
            run_dir = work / f"run-{label.replace(' ', '-')}-{time.strftime('%H%M%S')}"
            results[label] = measure(cfg, dataset, run_dir, parked)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    target = spec["target_gib"]
    attention = check_attention(cfg.train.attention, torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {spec['name']}, {attention} attention, "
          f"{cfg.train.mixed_precision}, {cfg.train.optimizer}, gradient checkpointing, LoRA rank {cfg.lora.rank}, "
          f"batch 1{' + 1 class image' if args.prior else ''}, {cfg.data.resolution} px")
    for label, (setup_peak, loop_peak, loop_reserved, rates) in results.items():
        peak = max(setup_peak, loop_peak)
        if len(results) > 1:
            print(f"-- text encoders and VAE {label} once cached" + (" (the recipe)" if label == "parked" else
                                                                     " (before parking existed)"))
        print(f"it/s (median of {len(rates)} steps):   {statistics.median(rates):.2f}")
        print(f"peak VRAM, training loop:       {loop_peak / GiB:.2f} GiB allocated ({loop_reserved / GiB:.2f} GiB "
              "reserved)")
        print(f"peak VRAM, setup (load, cache): {setup_peak / GiB:.2f} GiB allocated")
        verdict = "met" if peak <= target * GiB else "MISSED"
        print(f"peak VRAM, whole run:           {peak / GiB:.2f} GiB  (target <= {target} GiB: {verdict})")
    if len(results) > 1:
        print(f"training loop peak, parked / kept loaded: {results['parked'][1] / results['kept loaded'][1]:.2f}")


def measure(cfg, dataset: Path, run_dir: Path, parked: bool) -> tuple[int, int, int, list[float]]:
    """Train one run; (setup peak, loop peak allocated, loop peak reserved, it/s of the steps after the
    first 5). `parked=False` keeps the text encoders and VAE on the GPU, as the recipe did before."""
    import gc

    import torch

    from finetune.train import lora

    idle = lora.Run.idle_components
    if not parked:
        lora.Run.idle_components = lambda self: []
    try:
        torch.cuda.reset_peak_memory_stats()
        run = lora.setup(cfg, dataset, run_dir)
        setup_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        lora.fit(run)
        loop_peak, loop_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        lora.finish(run)
    finally:
        lora.Run.idle_components = idle
    del run
    gc.collect()
    torch.cuda.empty_cache()  # the next run starts from an empty card
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["it_s"] for r in rows[5:]] or [r["it_s"] for r in rows]
    return setup_peak, loop_peak, loop_reserved, rates


if __name__ == "__main__":
    main()

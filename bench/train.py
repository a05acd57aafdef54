"""Speed and memory of `finetune train` against the same loop without caches and against the floor.

A mid-size SD 1.x-shaped model built from config (random weights): UNet channels 64/128/256 with 2
layers per block and cross-attention in the first two levels; a 4-level VAE sized so that encoding a
batch takes about a third of an uncached step, as SD 1.5's VAE does at 512 px. The example photos are
prepared at 128 px (repeated so every batch is full); batch 4, LoRA rank 16 on to_q/k/v/out.

Variants:
  finetune        `finetune train` (the person preset at 128 px, fp32 on CPU): latents and captions
                  cached, torch AdamW
  uncached        the same with train.cache_latents=false and train.cache_text=false: the VAE and the
                  text encoder run every step
  floor           a bare UNet forward + backward with the same LoRA on precomputed latents and text
                  embeddings: no data, no optimizer, no logging
  finetune-8bit   `finetune train` with the preset's own optimizer, bitsandbytes' 8-bit AdamW. It is
                  there for VRAM on a GPU (fused CUDA kernels); on a CPU its kernels cost far more than
                  the optimizer step is worth, so the targets are measured on the torch AdamW rows
                  and this row shows that cost.
Speed: all variants are set up in one process and stepped in turns (one step of each, again and
again), so a shared machine's changing load hits them alike; s/step is the median over the turns.
The recipe's own loop (`fit`) runs each step. Memory: each variant then trains a few steps in a fresh
process of its own, which reports its peak RSS (setup and caching included).
Targets: finetune >= 1.5x uncached, and within 1.15x of the floor.

Run: .venv/bin/python bench/train.py [--steps 12] [--warmup 3]

--model sd15: lean steps on SD 1.5's shapes (UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder with
CLIP's vocabulary, the 4-level VAE; random weights, fp32 on disk), the photos at 128 px, batch 1,
LoRA rank 4, torch AdamW, cached latents and captions. Each variant trains in a fresh process of its
own (peak RSS is per process: loading, caching and training included), `--rounds` times, the order
turned each round; s/step is the best measured step over the rounds (a shared machine only slows a
step down), peak RSS the highest. The load average is printed with every result. Variants:
  today       fp32, the VAE and text encoder kept loaded, glibc's allocator as it comes: every new switch
              off (the recipe before issue 17)
  park        fp32, the VAE and text encoder parked once their outputs are cached
  reuse       fp32, freed memory kept for the next step (`residency.reuse_freed_memory`; without it
              each step faults some 0.8 GB back in), not parked
  auto        train.mixed_precision = "auto" (bf16 on a CPU with AMX/AVX512-BF16: the frozen weights
              cast to bf16 tensor by tensor, `residency.move_frozen`), not parked
  lean-fp32   park + reuse at fp32 (the recipe with train.mixed_precision = "no")
  all         auto + park + reuse (what the presets do)
  channels-last  fp32, the UNet in channels-last memory format alone (no gain in speed that pays for
              its memory: not kept)
  compile     fp32 + train.compile = "denoiser" alone (with --compile: compiling takes minutes;
              `--compile-limit` bounds it)
  floor       a bare fp32 UNet forward + backward with the LoRA on fixed inputs, freed memory reused
              as the recipe does
  floor-default  the same bare step with glibc's allocator as it comes
Targets: lean-fp32 <= 0.85x today's peak; all <= 0.6x today's peak; lean-fp32 <= 1.0x the floor's step
(fp32, the same allocator setting); all >= 1.5x faster than today.
    .venv/bin/python bench/train.py --model sd15 [--rounds 2] [--turns 3] [--warmup 1] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "datasets" / "example-photos"
RESOLUTION, BATCH, RANK = 128, 4, 16
UNET = dict(sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(64, 128, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
            attention_head_dim=8, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=RESOLUTION, scaling_factor=0.18215)
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=256)


def build_base(folder: Path) -> None:
    """The mid-size SD 1.x pipeline as a diffusers folder (what `--base DIR` loads)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from finetune.models.tiny import SCHEDULER_CONFIG, write_tokenizer

    write_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**UNET), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "base", safe_serialization=True)


def config(base: Path, steps: int, *extra: str):
    from finetune.config import load_config

    return load_config("person-sd15-lora", [
        f"model.base={base}", f"data.resolution={RESOLUTION}", "data.repeats=2", f"train.batch_size={BATCH}",
        f"lora.rank={RANK}", f"lora.alpha={RANK}", f"train.max_steps={steps}", "train.log_every=10",
        "train.mixed_precision=no", "train.prior_preservation=false", "train.save_every=0", "sample.every=0",
        "sample.prompts=[]", *extra])


# ---------------------------------------------------------------- the variants
EXTRA = {"finetune": ("train.optimizer=adamw",),
         "uncached": ("train.optimizer=adamw", "train.cache_latents=false", "train.cache_text=false"),
         "finetune-8bit": ("train.optimizer=adamw8bit",)}


def recipe_stepper(name: str, work: Path):
    """One step of `finetune train`'s loop per call (the recipe's setup, then its `fit` one step at a time)."""
    from finetune.train.lora import fit, setup

    run = setup(config(work / "base", 10**6, *EXTRA[name]), work / "dataset", work / f"run-{name}")

    def step():
        run.cfg.train.max_steps = run.step + 1
        fit(run)

    return step


def floor_stepper(work: Path):
    """UNet forward + backward with the same LoRA on fixed latents and text embeddings."""
    import torch

    from finetune.config import LoraConfig
    from finetune.models import load_base
    from finetune.train.adapters import add_lora

    pipe = load_base(str(work / "base")).pipe
    unet = pipe.unet
    add_lora(unet, pipe.text_encoder, LoraConfig(rank=RANK, alpha=RANK))
    unet.train()
    latents = torch.randn(BATCH, 4, RESOLUTION // 8, RESOLUTION // 8)
    hidden = torch.randn(BATCH, 77, TEXT["hidden_size"])
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (BATCH,))

    def step():
        pred = unet(latents, timesteps, hidden).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        unet.zero_grad(set_to_none=True)

    return step


def vae_stepper(work: Path):
    """VAE-encode one batch (what an uncached step pays that a cached one does not, with the text encoder)."""
    import torch

    from finetune.models import load_base

    vae = load_base(str(work / "base")).pipe.vae
    pixels = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION)

    def step():
        with torch.no_grad():
            vae.encode(pixels).latent_dist.sample()

    return step


def timing(work: Path, turns: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, stepped in turns."""
    import torch

    torch.manual_seed(0)
    steppers = {name: recipe_stepper(name, work) for name in ("finetune", "uncached")}
    steppers["floor"] = floor_stepper(work)
    steppers["finetune-8bit"] = recipe_stepper("finetune-8bit", work)
    steppers["vae-encode"] = vae_stepper(work)
    times = {name: [] for name in steppers}
    for turn in range(warmup + turns):
        for name, step in steppers.items():
            t = time.perf_counter()
            step()
            if turn >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB) since it started its program: Linux's VmHWM. Not
    `ru_maxrss`: a child keeps its parent's peak across fork + exec (a child of this bench, which built a
    4.5 GB model, reported 4.5 GB whatever it did)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(name: str, work: Path, steps: int = 3) -> float:
    """Peak RSS (MB) of this process after `steps` steps of the variant, setup and caching included."""
    import torch

    torch.manual_seed(0)
    if name == "floor":
        step = floor_stepper(work)
        for _ in range(steps):
            step()
    else:
        from finetune.train.lora import train

        train(config(work / "base", steps, *EXTRA[name]), work / "dataset", work / f"rss-{name}")
    return peak_rss_mb()


# ---------------------------------------------------------------- driver
def child(args) -> None:
    if args.variant == "timing":
        result = timing(args.work, args.turns, args.warmup)
    else:
        result = peak_rss(args.variant, args.work)
    print("RESULT " + json.dumps(result), flush=True)


def in_child(variant: str, work: Path, args) -> object:
    cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--turns", str(args.turns),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[0][7:])


# ---------------------------------------------------------------- SD 1.5 shapes: lean steps
LEAN = {"today": ("train.mixed_precision=no",), "park": ("train.mixed_precision=no",),
        "reuse": ("train.mixed_precision=no",), "auto": ("train.mixed_precision=auto",),
        "lean-fp32": ("train.mixed_precision=no",), "all": ("train.mixed_precision=auto",),
        "compile": ("train.mixed_precision=no", "train.compile=denoiser"),
        "channels-last": ("train.mixed_precision=no",)}
UNPARKED = ("today", "reuse", "auto", "compile", "channels-last")
DEFAULT_ALLOCATOR = ("today", "park", "auto", "compile", "channels-last", "floor-default")


def build_sd15(folder: Path) -> None:
    """SD 1.5's shapes with random weights as a diffusers folder (fp32 on disk, as the hub's main files)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from train_gpu import CLIP_VOCAB, TEXT as TEXT15, UNET as UNET15, VAE as VAE15  # this folder: on sys.path
    from finetune.models.tiny import SCHEDULER_CONFIG, write_tokenizer

    write_tokenizer(folder / "tok")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TEXT15, vocab_size=CLIP_VOCAB, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**dict(VAE15, sample_size=RESOLUTION)), text_encoder=te,
                                   tokenizer=tok, unet=UNet2DConditionModel(**dict(UNET15, sample_size=RESOLUTION // 8)),
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "base", safe_serialization=True)


def lean_child(variant: str, work: Path, steps: int) -> dict:
    """Train `steps` steps of the variant; per-step seconds and this process's peak RSS (MB)."""
    import torch

    torch.manual_seed(0)
    times, faults = [], []
    if variant.startswith("floor"):
        from finetune.config import LoraConfig
        from finetune.models import load_base
        from finetune.train.adapters import add_lora
        from finetune.train.residency import reuse_freed_memory

        if variant not in DEFAULT_ALLOCATOR:
            reuse_freed_memory()

        unet = load_base(str(work / "base")).pipe.unet
        add_lora(unet, [], LoraConfig(rank=4, alpha=4))
        unet.train()
        latents, hidden = torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8), torch.randn(1, 77, 768)
        for _ in range(steps):
            t, f = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            pred = unet(latents, torch.randint(0, 1000, (1,)), hidden).sample
            torch.nn.functional.mse_loss(pred, latents).backward()
            unet.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    else:
        from finetune.config import load_config
        from finetune.train import common, lora

        if variant in UNPARKED:  # the recipe as it was before parking
            lora.Run.idle_components = lambda self: []
        if variant in DEFAULT_ALLOCATOR:
            common.reuse_freed_memory = lambda: False
        cfg = load_config("person-sd15-lora", [
            f"model.base={work / 'base'}", f"data.resolution={RESOLUTION}", "train.batch_size=1", "lora.rank=4",
            "lora.alpha=4", f"train.max_steps={10**6}", "train.log_every=1000", "train.optimizer=adamw",
            "train.prior_preservation=false", "train.save_every=0", "sample.every=0", "sample.prompts=[]",
            *LEAN[variant]])
        out = work / f"run-{variant}"
        shutil.rmtree(out, ignore_errors=True)  # the last round's
        run = lora.setup(cfg, work / "dataset", out)
        if variant == "channels-last":
            run.denoiser.to(memory_format=torch.channels_last)
        # one call of the recipe's loop; a step lasts from one batch drawn to the next (the one step
        # more at the end, which also saves the final checkpoint, is not counted)
        starts, faults, draw = [], [], run.sampler.next

        def timed_draw():
            starts.append(time.perf_counter())
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            return draw()

        run.sampler.next = timed_draw
        run.cfg.train.max_steps = steps + 1
        lora.fit(run)
        times = [b - a for a, b in zip(starts, starts[1:])]
        faults = [b - a for a, b in zip(faults, faults[1:])]
    return {"times": times, "rss": peak_rss_mb(), "faults": faults}


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def lean_main(args) -> None:
    import torch

    from finetune.train.precision import resolve_precision

    work = Path(tempfile.mkdtemp(prefix="finetune-bench-lean-"))
    auto = resolve_precision("auto", torch.device("cpu"))
    variants = ["today", "park", "reuse", "auto", "lean-fp32", "all", "channels-last",
                *(["compile"] if args.compile else []), "floor", "floor-default"]
    steps = args.warmup + args.turns
    times = {v: [] for v in variants}
    rss = {v: [] for v in variants}
    first = {v: [] for v in variants}
    faults = {v: [] for v in variants}
    skipped = {}
    try:
        from finetune.config import load_config
        from finetune.data.prepare import prepare

        build_sd15(work)
        data = load_config("person-sd15-lora", [f"data.resolution={RESOLUTION}", "data.blur_threshold=0"]).data
        kept = prepare(EXAMPLES, work / "dataset", data, progress=False).kept
        print(f"SD 1.5 shapes (random weights, fp32 on disk) at {RESOLUTION} px, batch 1, LoRA rank 4, AdamW; {kept} "
              f"photos; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
              f"{args.rounds} rounds, each running every variant in a fresh process of its own ({args.warmup} "
              f"warm-up + {args.turns} measured steps), the order turned every round; \"auto\" here: "
              f"{auto.describe()}", flush=True)
        print(f"start: {load()}", flush=True)
        for r in range(args.rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                if v in skipped or (v == "compile" and r):  # compiling is measured once (minutes)
                    continue
                cmd = [sys.executable, __file__, "--model", "sd15", "--variant", v, "--work", str(work), "--turns",
                       str(args.turns), "--warmup", str(args.warmup)]
                limit = args.compile_limit if v == "compile" else None
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                                          env={**os.environ, "TQDM_DISABLE": "1"})
                except subprocess.TimeoutExpired:
                    skipped[v] = f"did not finish {steps} steps in {limit} s"
                    print(f"  round {r + 1} {v}: {skipped[v]}", flush=True)
                    continue
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{v} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                result = json.loads(line[0][7:])
                times[v] += result["times"][args.warmup:]
                first[v].append(result["times"][0])
                rss[v].append(result["rss"])
                faults[v] += result["faults"][args.warmup:]
                print(f"  round {r + 1} {v}: steps {' '.join(f'{x:.2f}' for x in result['times'])} s, "
                      f"peak RSS {result['rss']:.0f} MB, page faults per step "
                      f"{' '.join(str(f) for f in result['faults'])}   ({load()})", flush=True)
        print(f"end: {load()}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Best of the measured steps (a shared machine only ever slows a step down); peak RSS: the highest.
    best = {v: min(t) for v, t in times.items() if t}
    peak = {v: max(m) for v, m in rss.items() if m}
    today_t, today_m, floor_t = best["today"], peak["today"], best["floor"]
    print()
    print(f"{'variant':<14} {'best s/step':>11} {'median':>7} {'x today':>8} {'x floor':>8} {'peak RSS':>9} "
          f"{'x today':>8} {'faults/step':>12}")
    for v in best:
        t, m = best[v], peak[v]
        print(f"{v:<14} {t:>11.2f} {statistics.median(times[v]):>7.2f} {t / today_t:>8.2f} {t / floor_t:>8.2f} "
              f"{m:>6.0f} MB {m / today_m:>8.2f} {statistics.median(faults[v]):>12.0f}")
    for v, why in skipped.items():
        print(f"{v:<14} {why}")
    print()

    def check(label, value, ok):
        print(f"{label:<56} {value:.2f}   ({'met' if ok else 'MISSED'})")

    lean_m, lean_t = peak["lean-fp32"], best["lean-fp32"]
    check("peak memory, lean-fp32 / today (target <= 0.85)", lean_m / today_m, lean_m / today_m <= 0.85)
    check("step, lean-fp32 / floor (target <= 1.0)", lean_t / floor_t, lean_t / floor_t <= 1.0)
    if auto.mode == "bf16":
        check("peak memory, all (auto) / today (target <= 0.6)", peak["all"] / today_m, peak["all"] / today_m <= 0.6)
        check("speed, all (auto) vs today's fp32 step (target >= 1.5x)", today_t / best["all"],
              today_t / best["all"] >= 1.5)
    else:  # bf16 without those instructions is emulated: minutes for one VAE encode at 128 px
        print(f"auto targets (memory <= 0.6x, speed >= 1.5x): not measurable on this CPU, \"auto\" is "
              f"{auto.describe()}")
    cl_t, cl_m = best["channels-last"] / today_t, peak["channels-last"] / today_m
    print(f"channels-last: {cl_t:.2f}x today's step, {cl_m:.2f}x its peak memory -> "
          f"{'a gain' if cl_t < 1 and cl_m <= 1 else 'no gain: not kept'}")
    if "compile" in best:
        compile_s = statistics.median(first["compile"]) - best["compile"]
        verdict = (f"{today_t / best['compile']:.2f}x today's speed, paid back after "
                   f"{compile_s / (today_t - best['compile']):.0f} steps" if best["compile"] < today_t
                   else "no faster than eager: the presets leave it off")
        print(f"compile (denoiser): {compile_s:.0f} s of compiling on the first step, then {best['compile']:.2f} "
              f"s/step: {verdict}")
    elif "compile" in skipped:
        print(f"compile (denoiser): {skipped['compile']}: it does not pay here; the presets leave it off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="turns not measured")
    ap.add_argument("--model", choices=("mid", "sd15"), default="mid",
                    help="mid: the cache/floor comparison; sd15: lean steps on SD 1.5's shapes (see above)")
    ap.add_argument("--compile", action="store_true", help="sd15: add the train.compile = denoiser variant")
    ap.add_argument("--compile-limit", type=int, default=1200,
                    help="sd15: seconds the compile variant may take (compiling and its steps) before it is dropped")
    ap.add_argument("--rounds", type=int, default=2, help="sd15: rounds of all variants (best step kept)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model == "sd15":
        if args.variant:
            print("RESULT " + json.dumps(lean_child(args.variant, args.work, args.warmup + args.turns)), flush=True)
            return
        return lean_main(args)
    if args.variant:
        return child(args)

    import torch

    work = Path(tempfile.mkdtemp(prefix="finetune-bench-train-"))
    try:
        from finetune.config import load_config
        from finetune.data.prepare import prepare

        build_base(work)
        data = load_config("person-sd15-lora", [f"data.resolution={RESOLUTION}", "data.blur_threshold=0"]).data
        kept = prepare(EXAMPLES, work / "dataset", data, progress=False).kept
        print(f"mid-size SD 1.x (UNet 64/128/256 x2, VAE 32/64/128/128 x2) at {RESOLUTION} px, batch {BATCH}, "
              f"LoRA rank {RANK}; {kept} photos x2 repeats; torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, {os.cpu_count()} cores")
        times = in_child("timing", work, args)
        encode = statistics.median(times.pop("vae-encode"))
        rss = {name: in_child(name, work, args) for name in times}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_step = {n: statistics.median(t) for n, t in times.items()}
    print(f"VAE encode of a batch: {encode:.3f} s = {encode / per_step['uncached']:.0%} of an uncached step")
    print()
    print(f"{'variant':<14} {'steps/s':>8} {'s/step':>7} {'peak RSS':>9}   (median of {args.turns} turns)")
    for n, t in per_step.items():
        print(f"{n:<14} {1 / t:>8.3f} {t:>7.3f} {rss[n]:>6.0f} MB")
    vs_uncached = per_step["uncached"] / per_step["finetune"]
    vs_floor = per_step["finetune"] / per_step["floor"]
    print()
    print(f"finetune vs uncached: {vs_uncached:.2f}x faster   (target >= 1.5x: {'met' if vs_uncached >= 1.5 else 'MISSED'})")
    print(f"finetune vs floor:    {vs_floor:.2f}x slower   (target <= 1.15x: {'met' if vs_floor <= 1.15 else 'MISSED'})")
    print(f"8-bit AdamW on CPU:   {per_step['finetune-8bit'] / per_step['finetune']:.2f}x the step time of torch AdamW "
          f"({per_step['finetune-8bit'] / per_step['floor']:.2f}x the floor)")


if __name__ == "__main__":
    main()

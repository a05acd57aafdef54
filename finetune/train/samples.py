"""Sample images every `sample.every` steps: fixed prompts and seeds, written with provenance (any
family's pipeline), and after each step an overview of all of them: the run's samples.png (a
contact sheet, a row per step) and samples/index.html."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from finetune.config import RunConfig
from finetune.provenance import GenerationInfo, save_generated_png
from finetune.train.data import substitute

SAMPLERS = {"ddim": ("DDIMScheduler", {}, "DDIM"),
            "euler": ("EulerDiscreteScheduler", {}, "Euler"),
            "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
            "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
            # rectified-flow bases (FLUX.1): their own Euler, with the base's shift settings
            "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler")}
FLOW_SAMPLERS = ("flow-euler",)


def check_sampler(pipe, sampler: str) -> None:
    """A flow-matching base samples only with a flow sampler, a noise-prediction base never with one."""
    from finetune.errors import FinetuneError

    flow = "FlowMatch" in type(pipe.scheduler).__name__
    if (sampler in FLOW_SAMPLERS) != flow:
        fits = ", ".join(FLOW_SAMPLERS) if flow else ", ".join(n for n in SAMPLERS if n not in FLOW_SAMPLERS)
        raise FinetuneError(f"sampler {sampler!r} does not fit this base, which samples with "
                            f"{type(pipe.scheduler).__name__}: use {fits} (sample.scheduler / --scheduler)")


def pipeline_with_sampler(pipe, sampler: str):
    """A pipeline sharing `pipe`'s modules with the named sampler (the base pipeline is left alone)."""
    import diffusers

    check_sampler(pipe, sampler)
    cls_name, extra, _ = SAMPLERS[sampler]
    scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    from finetune.models import families

    extra = families.of_pipeline(pipe).sampling_kwargs(pipe)
    new = type(pipe)(**{**pipe.components, "scheduler": scheduler}, **extra)
    new.set_progress_bar_config(disable=True)
    return new


def pipeline_device(pipe):
    """Where the pipeline's denoiser is (what generators and inputs follow)."""
    from finetune.models import families

    return getattr(pipe, families.of_pipeline(pipe).denoiser).device


def prompts(cfg: RunConfig) -> list[str]:
    return [substitute(p, cfg.data.trigger, cfg.data.class_word) for p in cfg.sample.prompts]


@torch.no_grad()
def write_samples(pipe, cfg: RunConfig, step: int, folder: Path, *, model_name: str, model_hash: str,
                  lora_name: str, autocast) -> list[Path]:
    """One image per prompt x seed into `folder`/<prompt index>-<seed>.png, with provenance."""
    s = cfg.sample
    gen_pipe = pipeline_with_sampler(pipe, s.scheduler)
    device = pipeline_device(pipe)
    paths = []
    for i, prompt in enumerate(prompts(cfg)):
        for seed in s.seeds:
            with autocast():
                image = gen_pipe(prompt, negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
                                 guidance_scale=s.guidance, width=s.width, height=s.height,
                                 generator=torch.Generator(device).manual_seed(seed)).images[0]
            info = GenerationInfo(prompt=prompt, negative_prompt=s.negative_prompt, steps=s.steps,
                                  sampler=SAMPLERS[s.scheduler][2], cfg_scale=s.guidance, seed=seed, width=s.width,
                                  height=s.height, model_name=model_name, model_hash=model_hash,
                                  loras=[(lora_name, 1.0)], extra={"Training step": str(step)})
            paths.append(save_generated_png(image, Path(folder) / f"{i}-{seed}.png", info, watermark=s.watermark))
    if paths:
        write_overview(Path(folder).parent, cfg, title=lora_name, model_name=model_name, model_hash=model_hash)
    return paths


SHEET_TILE = 160
"""The longer side of each image on the run's contact sheet (a row per sample step can make many rows)."""


def write_overview(samples: Path, cfg: RunConfig, *, title: str, model_name: str = "",
                   model_hash: str = "") -> tuple[Path, Path]:
    """The contact sheet `samples/../samples.png` (a row per step, a column per prompt x seed) and the page
    `samples/index.html` (the prompts, the sheet, every image by step), from the step-NNNNNN/ folders.

    The sheet sits beside loss.png, outside samples/, so that `finetune review` (which rates every PNG
    under samples/) does not meet it."""
    from PIL import Image

    from finetune.gallery import BACKGROUND, contact_sheet, samples_html

    s = cfg.sample
    texts = prompts(cfg)
    columns = [(i, seed) for i in range(len(texts)) for seed in s.seeds]
    steps = []
    for folder in samples.iterdir():
        m = re.fullmatch(r"step-(\d+)", folder.name)
        if m and folder.is_dir():
            files = [folder / f"{i}-{seed}.png" for i, seed in columns]
            if any(f.is_file() for f in files):
                steps.append((int(m.group(1)), [f if f.is_file() else None for f in files]))
    steps.sort(key=lambda sf: sf[0])

    scale = SHEET_TILE / max(s.width, s.height)
    tile = (max(1, round(s.width * scale)), max(1, round(s.height * scale)))
    resample = Image.NEAREST if scale > 1 else Image.LANCZOS
    grid = []
    for _, files in steps:
        row = []
        for f in files:
            if f is None:
                row.append(Image.new("RGB", tile, BACKGROUND))
                continue
            with Image.open(f) as im:
                row.append(im.convert("RGB").resize(tile, resample))
        grid.append(row)
    sheet, layout = contact_sheet(grid, [f"step {step}" for step, _ in steps],
                                  [f"prompt {i + 1}, seed {seed}" for i, seed in columns],
                                  f"{title}: " + "   ".join(f"{n}. {t}" for n, t in enumerate(texts, 1)))
    info = GenerationInfo(prompt=" | ".join(texts), negative_prompt=s.negative_prompt, steps=s.steps,
                          sampler=SAMPLERS[s.scheduler][2], cfg_scale=s.guidance, seed=s.seeds[0], width=s.width,
                          height=s.height, model_name=model_name, model_hash=model_hash,
                          extra={"Sheet rows": "steps " + " ".join(str(step) for step, _ in steps),
                                 "Sheet columns": "; ".join(f"prompt {i + 1} seed {seed}" for i, seed in columns)})
    sheet_path = save_generated_png(sheet, samples.parent / "samples.png", info,
                                    watermark=s.watermark)
    page = samples_html(f"{title}: training samples", texts, list(s.seeds),
                        [(step, [f"{f.parent.name}/{f.name}" if f else None for f in files]) for step, files in steps],
                        f"../{sheet_path.name}", s.width, sheet_width=layout.width)
    page_path = samples / "index.html"
    tmp = page_path.with_name(f".{page_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, page_path)
    return sheet_path, page_path

"""Sample images every `sample.every` steps: fixed prompts and seeds, written with provenance (SD 1.x/2.x
and SDXL pipelines alike)."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.config import RunConfig
from finetune.provenance import GenerationInfo, save_generated_png
from finetune.train.data import substitute

SAMPLERS = {"ddim": ("DDIMScheduler", {}, "DDIM"),
            "euler": ("EulerDiscreteScheduler", {}, "Euler"),
            "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
            "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M")}


def pipeline_with_sampler(pipe, sampler: str):
    """A pipeline sharing `pipe`'s modules with the named sampler (the base pipeline is left alone)."""
    import diffusers

    cls_name, extra, _ = SAMPLERS[sampler]
    scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    extra = {"requires_safety_checker": False} if "safety_checker" in pipe.components else {}
    if "text_encoder_2" in pipe.components:  # SDXL: keep its empty-prompt setting; our provenance marks images
        extra = {"force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True),
                 "add_watermarker": False}
    new = type(pipe)(**{**pipe.components, "scheduler": scheduler}, **extra)
    new.set_progress_bar_config(disable=True)
    return new


def prompts(cfg: RunConfig) -> list[str]:
    return [substitute(p, cfg.data.trigger, cfg.data.class_word) for p in cfg.sample.prompts]


@torch.no_grad()
def write_samples(pipe, cfg: RunConfig, step: int, folder: Path, *, model_name: str, model_hash: str,
                  lora_name: str, autocast) -> list[Path]:
    """One image per prompt x seed into `folder`/<prompt index>-<seed>.png, with provenance."""
    s = cfg.sample
    gen_pipe = pipeline_with_sampler(pipe, s.scheduler)
    device = pipe.unet.device
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
    return paths

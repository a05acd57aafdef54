"""Optimizer and learning-rate schedule for the LoRA parameters."""

from __future__ import annotations

import torch

from finetune.config import TrainConfig
from finetune.errors import FinetuneError


FUSED_ADAMW_DEVICES = {"cpu", "cuda"}
"""Where torch's fused AdamW kernel runs (elsewhere AdamW picks its own implementation)."""


def make_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """8-bit AdamW (bitsandbytes) or torch AdamW over `param_groups` (each with its own lr)."""
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # Fused: one kernel over all the LoRA tensors, not a Python loop over hundreds of small ones
        # (SD 1.5's rank-4 LoRA on a CPU: 5 ms a step instead of 28, the most of what a step spends
        # beyond the UNet's forward and backward; bench/train.py, variant lean-fp32 against floor).
        devices = {p.device.type for group in param_groups for p in group["params"]}
        return torch.optim.AdamW(param_groups, fused=devices <= FUSED_ADAMW_DEVICES or None, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise FinetuneError("train.optimizer = 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, "
                            "or use --set train.optimizer=adamw") from None
    # min_8bit_size defaults to 4096 elements: most LoRA matrices are smaller and would silently keep
    # 32-bit state. Block-wise quantization (absmax per block) is accurate for small tensors too.
    return bnb.optim.AdamW8bit(param_groups, min_8bit_size=0, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """constant | constant_with_warmup | cosine | linear over `max_steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    warmup = cfg.warmup_steps if cfg.lr_scheduler != "constant" else 0
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)

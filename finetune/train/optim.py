"""Optimizer and learning-rate schedule for the LoRA parameters."""

from __future__ import annotations

import torch

from finetune.config import TrainConfig
from finetune.errors import FinetuneError


def make_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """8-bit AdamW (bitsandbytes) or torch AdamW over `param_groups` (each with its own lr)."""
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, **kwargs)
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

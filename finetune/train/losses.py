"""The diffusion training objective: noise, targets, min-SNR-gamma weights, per-sample MSE."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from finetune.errors import FinetuneError


def make_noise(latents: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; with an offset, plus a per-sample, per-channel constant
    (lets the model learn to shift overall brightness, which plain noise never teaches it)."""
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                             dtype=latents.dtype)
    return noise


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity, as the base's scheduler says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise FinetuneError(f"the base model's scheduler predicts {kind!r}; finetune trains epsilon or v_prediction models")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction),
    from Hang et al. 2023; ones when gamma is 0 (off)."""
    if not gamma:
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def dreambooth_loss(per_sample: torch.Tensor, n_instance: int, prior_weight: float) -> torch.Tensor:
    """Mean loss of the instance samples (the first `n_instance`) plus `prior_weight` times the mean
    loss of the class images after them (DreamBooth's prior-preservation loss)."""
    loss = per_sample[:n_instance].mean()
    if n_instance < len(per_sample):
        loss = loss + prior_weight * per_sample[n_instance:].mean()
    return loss

"""FLUX.1's training objective: rectified flow with a velocity target, on packed latents.

A noisy input at noise level sigma in [0, 1] is the straight line `(1 - sigma) * latents + sigma * noise`;
the transformer predicts its velocity `noise - latents` (so an Euler step of FlowMatchEulerDiscreteScheduler
follows the line). Where sigma is drawn decides what the LoRA learns most, and users choose among the
samplers the other trainers offer (kohya sd-scripts' `--timestep_sampling` names):

- `uniform`: sigma ~ U(0, 1);
- `sigmoid`: sigma = sigmoid(N(mean, scale)), logit-normal, weighting the middle (SD3's choice);
- `shift`: a sigmoid draw pushed toward noise by a fixed shift s: s*sigma / (1 + (s-1)*sigma);
- `flux_shift`: the same push with FLUX.1's resolution-dependent shift, exp(mu) with mu linear in the
  number of latent patches (0.5 at 256 patches = 512 px, 1.15 at 4096 = 1024 px), as FluxPipeline
  shifts its sampling schedule.

The transformer reads latents as a sequence of 2x2 patches (B, h/2 * w/2, 4C) with a 3-axis position id
per patch (0, row, column) and per text token (zeros); FLUX.1-dev also takes the distilled guidance
scale as an input, schnell does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finetune.vocab import TIMESTEP_SAMPLERS as SAMPLERS


@dataclass(frozen=True)
class FlowSampling:
    """How training draws noise levels (see the module docstring)."""

    sampler: str = "flux_shift"
    """uniform | sigmoid | shift | flux_shift"""
    sigmoid_mean: float = 0.0
    """Mean of the normal draw under the sigmoid (sigmoid, shift, flux_shift)."""
    sigmoid_scale: float = 1.0
    """Standard deviation of the normal draw under the sigmoid."""
    shift: float = 3.0
    """The fixed shift of `shift` (FLUX.1's scheduler: 3.0)."""
    base_shift: float = 0.5
    """flux_shift: mu at `base_seq_len` patches (FLUX.1's scheduler_config.json)."""
    max_shift: float = 1.15
    """flux_shift: mu at `max_seq_len` patches."""
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"timestep sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.sigmoid_scale <= 0 or self.shift <= 0:
            raise ValueError(f"sigmoid_scale ({self.sigmoid_scale}) and shift ({self.shift}) must be positive")


def resolution_mu(seq_len: int, s: FlowSampling) -> float:
    """FLUX.1's log-shift for an image of `seq_len` patches (FluxPipeline's calculate_shift)."""
    slope = (s.max_shift - s.base_shift) / (s.max_seq_len - s.base_seq_len)
    return s.base_shift + slope * (seq_len - s.base_seq_len)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Push noise levels toward 1 by `shift` (1 leaves them as they are)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_uniform(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random part of a draw, U(0, 1) per example: `sigmas` turns it into noise levels. Kept apart
    so that the draw is one call on the global (checkpointed) RNG whatever the sampler."""
    return torch.rand(batch, generator=generator, device=device)


def sigmas(u: torch.Tensor, seq_len: int, s: FlowSampling) -> torch.Tensor:
    """Noise levels in (0, 1) from uniform draws `u`, for latents of `seq_len` 2x2 patches."""
    if s.sampler == "uniform":
        return u
    # the normal quantile of u: a normal draw from the same uniform one
    normal = math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1)
    sig = torch.sigmoid(s.sigmoid_mean + s.sigmoid_scale * normal)
    if s.sampler == "shift":
        return shift_sigmas(sig, s.shift)
    if s.sampler == "flux_shift":
        return shift_sigmas(sig, math.exp(resolution_mu(seq_len, s)))
    return sig


def seq_len(latents: torch.Tensor) -> int:
    """The number of 2x2 patches of (B, C, h, w) latents."""
    return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)


def noisy(latents: torch.Tensor, noise: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    s = sig.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The target: the velocity of the straight path from the latents to the noise."""
    return noise - latents


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches in row-major order, channels then patch rows
    then patch columns within a patch (FluxPipeline's packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents of {h}x{w} cannot be cut into 2x2 patches: image sides must be multiples of 16 px")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of height `h` and width `w`."""
    b, _, d = packed.shape
    x = packed.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the patches of (h, w) latents: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, 3) position ids of the text tokens: all zeros (T5 has its own relative positions)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def predict(transformer, noisy_latents: torch.Tensor, sig: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
            guidance: float | None) -> torch.Tensor:
    """The transformer's velocity for (B, C, h, w) noisy latents at noise levels `sig`, unpacked to
    (B, C, h, w). `guidance` is FLUX.1-dev's embedded guidance scale; None for schnell."""
    has_guidance = bool(transformer.config.guidance_embeds)
    if has_guidance and guidance is None:
        raise ValueError("this transformer embeds a guidance scale (FLUX.1-dev): give the training guidance")
    if not has_guidance and guidance is not None:
        raise ValueError("this transformer has no guidance embedding (FLUX.1-schnell): training guidance must be unset")
    b, _, h, w = noisy_latents.shape
    dtype = transformer.dtype if transformer.dtype.is_floating_point else noisy_latents.dtype
    device = noisy_latents.device
    g = torch.full((b,), float(guidance), device=device, dtype=torch.float32) if has_guidance else None
    out = transformer(
        hidden_states=pack(noisy_latents).to(dtype),
        encoder_hidden_states=hidden.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=sig.to(device, dtype),  # the transformer scales it by 1000 itself
        img_ids=image_ids(h, w, device, dtype),
        txt_ids=text_ids(hidden.shape[1], device, dtype),
        guidance=g,
        return_dict=False,
    )[0]
    return unpack(out, h, w)

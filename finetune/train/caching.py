"""Latent and text-embedding caches, kept beside the dataset and reused across runs.

Latents: each training image is VAE-encoded once. We store the encoder's Gaussian (mean and
log-variance, diffusers' `latent_dist.parameters`), not one sample of it: every step then draws a fresh
latent from it exactly as `vae.encode(x).latent_dist.sample()` does, so a cached run trains on the same
distribution (bit for bit, given the same RNG) as an uncached one, at the cost of storing 2x channels.
The key covers everything the result depends on: the image file's sha256, the VAE (config + weights),
the dtype it ran in, the bucket and the crop.

Text: while the text encoder is frozen, each distinct caption's hidden states are computed once,
keyed by caption, text encoders (config + weights), tokenizer vocabularies and dtype. An entry holds
what the family's `encode_text` returns for the caption (hidden states; SDXL: also a pooled embedding).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from finetune.filemode import follow_umask
from finetune.train.data import Example, load_pixels

CACHE_DIR = ".cache"


def module_hash(module: torch.nn.Module) -> str:
    """sha256 of a model's config and weights: the identity a cache entry depends on."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        skip = ("transformers_version", "dtype", "torch_dtype")  # not identity: the dtype is keyed apart
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in skip}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()  # dtype-independent: the dtype is keyed apart
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy())  # the buffer itself: no second copy of the largest tensor
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{vocab}|{tokenizer.model_max_length}".encode()).hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _save_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    follow_umask(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent Gaussian for a batch of images: (B, 2*C, h, w) = mean and log-variance."""
    # contiguous: the VAE may hand back a channels-last view, and `randn_like` on such a tensor draws
    # its numbers in another order, so cached and uncached runs would see different noise.
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.contiguous()


def sample_latents(vae, params: torch.Tensor) -> torch.Tensor:
    """One draw from the stored Gaussians, shifted and scaled as the denoiser expects (what training consumes)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return scale_latents(vae, DiagonalGaussianDistribution(params).sample())


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the denoiser sees them: `(x - shift_factor) * scaling_factor` (SD's VAEs have no shift)."""
    shift = getattr(vae.config, "shift_factor", None)
    return (latents - shift if shift else latents) * vae.config.scaling_factor


def latent_path(dataset: Path, ex: Example, vae_id: str, dtype: torch.dtype) -> Path:
    key = _key(ex.sha256, vae_id, dtype, ex.bucket, ex.crop_box)
    return Path(dataset) / CACHE_DIR / "latents" / key[:2] / f"{key}.safetensors"


def cached_latents(examples: list[Example], dataset: Path, vae, vae_id: str, *, write: bool = True,
                   show_progress: bool = True) -> list[torch.Tensor]:
    """Each example's latent Gaussian (2*C, h, w) on CPU: read from the cache, or encoded and stored."""
    out, todo = [None] * len(examples), []
    for i, ex in enumerate(examples):
        path = latent_path(dataset, ex, vae_id, vae.dtype)
        if path.is_file():
            out[i] = load_file(str(path))["params"]
        else:
            todo.append((i, path))
    for i, path in tqdm(todo, desc="caching latents", unit="img", disable=not todo or not show_progress):
        params = encode_pixels(vae, load_pixels(examples[i].image)[None])[0].to("cpu")
        if write:
            _save_atomic({"params": params}, path, {"image": str(examples[i].image), "vae": vae_id})
        out[i] = params
    return out


def text_path(dataset: Path, caption: str, te_id: str, dtype: torch.dtype) -> Path:
    key = _key(caption, te_id, dtype)
    return Path(dataset) / CACHE_DIR / "text" / key[:2] / f"{key}.safetensors"


def _cached(captions: list[str], dataset: Path, te_id: str, dtype: torch.dtype, encode, *, write: bool,
            show_progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """caption -> {name: tensor} on CPU, from the cache or `encode(caption)` and stored."""
    out, todo = {}, []
    for caption in dict.fromkeys(captions):
        path = text_path(dataset, caption, te_id, dtype)
        if path.is_file():
            out[caption] = load_file(str(path))
        else:
            todo.append((caption, path))
    for caption, path in tqdm(todo, desc="caching captions", unit="caption", disable=not todo or not show_progress):
        tensors = {k: v.to("cpu") for k, v in encode(caption).items()}
        if write:
            _save_atomic(tensors, path, {"caption": caption, "text_encoder": te_id})
        out[caption] = tensors
    return out


@torch.no_grad()
def cached_text(captions: list[str], dataset: Path, encode_text, components, te_id: str, *, write: bool = True,
                show_progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """caption -> the family's text conditioning ({"hidden": (77, D), ...}: `encode_text(components,
    [caption])` without its batch dimension) on CPU, from the cache or encoded and stored."""
    first = next(m for m in components.values() if isinstance(m, torch.nn.Module))

    def encode(caption):
        return {k: v[0] for k, v in encode_text(components, [caption]).items()}

    return _cached(captions, dataset, te_id, first.dtype, encode, write=write, show_progress=show_progress)

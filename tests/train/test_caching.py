"""Latent and text caches: reused across runs, keyed by what they depend on, and exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from finetune.models import families
from finetune.train import caching
from finetune.train.data import Example
from finetune.train.lora import train
from finetune.train.metrics import read_metrics

from train_helpers import tiny_config


def cache_files(dataset, kind):
    return sorted((dataset / ".cache" / kind).rglob("*.safetensors"))


def test_second_run_encodes_nothing(dataset, tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=1")
    train(cfg, dataset, tmp_path / "a")
    latents, texts = cache_files(dataset, "latents"), cache_files(dataset, "text")
    assert len(latents) == 6 and len(texts) == 2  # six images; their caption and the empty (dropout) caption

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds it")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    sd1 = families.get("sd1")
    monkeypatch.setitem(families._REGISTRY, "sd1", dataclasses.replace(sd1, encode_text=refuse))
    train(cfg, dataset, tmp_path / "b")
    assert cache_files(dataset, "latents") == latents and cache_files(dataset, "text") == texts


def test_a_changed_image_is_encoded_again(dataset, tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=1")
    train(cfg, dataset, tmp_path / "a")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(dataset / "images" / "0001.png")  # the user replaced a crop
    calls = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(x.shape) or real(self, x, *a, **k))
    train(cfg, dataset, tmp_path / "b")
    assert calls == [(1, 3, 64, 64)]
    assert len(cache_files(dataset, "latents")) == 7


def test_cache_key_covers_image_vae_dtype_bucket_and_crop(tmp_path):
    ex = Example(image=tmp_path / "a.png", caption="", bucket=(64, 64), sha256="a" * 64, crop_box=(0, 0, 10, 10))
    key = caching.latent_path(tmp_path, ex, "vae1", torch.float32)
    variants = [
        caching.latent_path(tmp_path, Example(ex.image, "", (64, 64), "b" * 64, ex.crop_box), "vae1", torch.float32),
        caching.latent_path(tmp_path, ex, "vae2", torch.float32),
        caching.latent_path(tmp_path, ex, "vae1", torch.float16),
        caching.latent_path(tmp_path, Example(ex.image, "", (64, 48), ex.sha256, ex.crop_box), "vae1", torch.float32),
        caching.latent_path(tmp_path, Example(ex.image, "", (64, 64), ex.sha256, (1, 0, 11, 10)), "vae1", torch.float32),
    ]
    assert len({key, *variants}) == 6
    assert key.is_relative_to(tmp_path / ".cache" / "latents")
    assert caching.text_path(tmp_path, "a", "te", torch.float32) != caching.text_path(tmp_path, "b", "te", torch.float32)


def test_vae_identity_follows_its_weights(tiny_pipe):
    vae = tiny_pipe.vae
    before = caching.module_hash(vae)
    assert caching.module_hash(vae) == before
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] += 1e-3
    assert caching.module_hash(vae) != before


def test_cache_stores_the_latent_distribution_and_trains_exactly_like_no_cache(dataset, tmp_path):
    """The cache holds mean and log-variance, so cached and uncached runs draw the same latents."""
    common = ("train.max_steps=3", "train.optimizer=adamw", "train.caption_dropout=0.5")
    cached = train(tiny_config(*common), dataset, tmp_path / "cached")
    uncached = train(tiny_config(*common, "train.cache_latents=false", "train.cache_text=false"), dataset,
                     tmp_path / "uncached")
    params = load_file(str(cache_files(dataset, "latents")[0]))["params"]
    assert params.shape == (8, 8, 8)  # 4 mean + 4 log-variance channels at 64 px / 8
    a = [r["loss"] for r in read_metrics(cached / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(uncached / "metrics.jsonl")]
    # the same losses at every step (steps 2 and 3 after updates): same latents, noise and timesteps
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-4)

"""The seam: a family registered by a test alone trains, exports and samples through the stages.

The test family is an SD 1.x variant with what a new base changes: its own arch id, an 8-channel latent
space (VAE and UNet) and v-prediction, its own embedded base and kohya metadata. Nothing outside this
file knows about it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from finetune import lora_io
from finetune.export import export
from finetune.models import families
from finetune.sample import sample
from finetune.train.lora import train

from train_helpers import tiny_config

SPEC = "tiny-v8"
SHAPES = []


def build_tiny_v8():
    """The tiny SD 1.x with 8 latent channels and a v-prediction schedule."""
    from finetune.models import tiny

    def build():
        tiny_v8 = dict(tiny.UNET_CONFIG, in_channels=8, out_channels=8)
        old = tiny.UNET_CONFIG, tiny.VAE_CONFIG, tiny.SCHEDULER_CONFIG
        try:
            tiny.UNET_CONFIG = tiny_v8
            tiny.VAE_CONFIG = dict(tiny.VAE_CONFIG, latent_channels=8)
            tiny.SCHEDULER_CONFIG = dict(tiny.SCHEDULER_CONFIG, prediction_type="v_prediction")
            return tiny.build_tiny_pipeline(seed=3)
        finally:
            tiny.UNET_CONFIG, tiny.VAE_CONFIG, tiny.SCHEDULER_CONFIG = old

    return tiny.cached_build("test-tiny-v8", ["test-tiny-v8", 1], build)


@pytest.fixture()
def family():
    sd1 = families.get("sd1")

    def predict(scheduler, unet, noisy, timesteps, cond):
        SHAPES.append(tuple(noisy.shape))
        return sd1.predict(scheduler, unet, noisy, timesteps, cond)

    fam = dataclasses.replace(
        sd1, name="test-v8", tiny={SPEC: build_tiny_v8}, predict=predict,
        variants=(families.Variant(arch="sd1v8", title="SD 1.x (8 channels, v)", resolution=64, resolution_text="64",
                                   kohya_version="test_v8", modelspec="test-v8", declared_as=("test_v8",),
                                   hub_tag="test-v8"),),
        detect_folder=lambda folder, index: None, detect_single_file=lambda shapes: None,
        detect_lora=lambda layers, metadata: None)
    families.register(fam)
    yield fam
    families.unregister(fam.name)


def test_a_registered_family_trains_exports_and_samples(family, dataset, tmp_path):
    cfg = tiny_config("train.max_steps=2", "train.min_snr_gamma=5")
    cfg.model.base = SPEC
    run = train(cfg, dataset, tmp_path / "run")
    assert SHAPES and all(s[1] == 8 for s in SHAPES)  # the family's own latents reached its denoiser
    info = json.loads((run / "run.json").read_text())
    assert info["arch"] == "sd1v8" and info["base"] == SPEC

    kohya = export(run, "kohya", echo=lambda *_: None)
    _, meta = lora_io.read_header(kohya)
    assert meta["ss_base_model_version"] == "test_v8" and meta["modelspec.architecture"] == "test-v8/lora"
    assert meta["finetune.arch"] == "sd1v8"
    merged = export(run, "merged", echo=lambda *_: None)
    keys, meta = lora_io.read_header(merged)
    assert keys["model.diffusion_model.input_blocks.0.0.weight"][1][1] == 8
    assert meta["modelspec.architecture"] == "test-v8"

    gallery = sample(run, prompts=["a photo of [trigger] person"], out=tmp_path / "g", progress=False)
    record = json.loads((gallery / "gallery.json").read_text())
    images = record["prompts"][0]["images"]
    assert record["base"] == SPEC and len(images) == len(record["rows"]) * len(record["settings"]["seeds"]) >= 2
    assert [r["key"] for r in record["rows"]][0] == "base" and len(record["rows"]) >= 2  # base and tuned rows
    assert all((gallery / i["file"]).is_file() for i in images)

"""The tiny SDXL: SDXL's structure, and the same image from memory, its folder and its single file."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.models import load_base
from finetune.models.single_file import detect_architecture
from finetune.models.tiny import tiny_base_dir
from finetune.models.families.sdxl_tiny import build_tiny_sdxl_pipeline, is_tiny_sdxl, tiny_sdxl_base_dir


def image(pipe, seed=0):
    out = pipe("a photo of ohwx person", num_inference_steps=4, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def assert_same_model(got, want_pipe, want_image):
    """Bit-identical weights in every component, and the same image. The image is held to 1e-5, not to
    equality: identical weights in a freshly loaded model can round differently in CPU kernels (seen
    on the tiny SD 1.x with one thread: 5e-5), and a wrong mapping moves pixels by far more."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sd, want = getattr(got, name).state_dict(), getattr(want_pipe, name).state_dict()
        assert sd.keys() == want.keys(), name
        assert all(torch.equal(sd[k], want[k]) for k in want), name
    assert np.abs(image(got) - want_image).max() <= 1e-5


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def reference(pipe):
    """The image of the tiny SDXL built in memory, never saved."""
    return image(pipe)


def test_has_sdxl_structure(pipe, reference):
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert unet.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert len(set(unet.transformer_layers_per_block)) == 3  # a depth of its own per level, as SDXL's (1, 2, 10)
    # the UNet reads both encoders' hidden states side by side, and bigG's pooled projection + 6 sizes
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert te1.hidden_size != te2.hidden_size  # diffusers' single-file loader tells them apart by width
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae_scale_factor == 8
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.tokenize("a photo of ohwx") == ["a</w>", "photo</w>", "of</w>", "ohwx</w>"]
    assert reference.shape == (64, 64, 3) and reference.std() > 0.01


def test_build_is_deterministic(reference):
    np.testing.assert_array_equal(image(build_tiny_sdxl_pipeline()), reference)


def test_tiny_sdxl_base_loads_from_its_cached_folder(pipe, reference):
    base = load_base("tiny-sdxl")
    assert (base.kind, base.arch, base.name) == ("tiny", "sdxl", "tiny-sdxl")
    assert base.config_dir == tiny_sdxl_base_dir()
    assert json.loads((base.config_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert_same_model(base.pipe, pipe, reference)


def test_single_file_through_diffusers_and_load_base(tmp_path, pipe, reference, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, single = tmp_path / "tiny-sdxl", tmp_path / "tiny-sdxl.safetensors"
    r = CliRunner().invoke(cli, ["base", "tiny-sdxl", "--out", str(folder), "--single-file", str(single)])
    assert r.exit_code == 0, r.output
    with safe_open(str(single), "pt") as f:
        assert detect_architecture(f.keys()) == "sdxl"
        assert is_tiny_sdxl({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        assert f.metadata() == {"finetune.base": "tiny-sdxl", "finetune.arch": "sdxl"}

    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert_same_model(loaded, pipe, reference)

    explicit = load_base(str(single), config=str(folder))
    assert (explicit.kind, explicit.arch) == ("single-file", "sdxl")
    assert_same_model(explicit.pipe, pipe, reference)
    # without a config the tiny SDXL's shapes are recognised and its cached configs used, offline
    detected = load_base(str(single))
    assert detected.config_dir == tiny_sdxl_base_dir()
    assert_same_model(detected.pipe, pipe, reference)


def test_single_file_with_the_other_architectures_config_is_refused(tmp_path):
    single = tmp_path / "tiny-sdxl.safetensors"
    assert CliRunner().invoke(cli, ["base", "tiny-sdxl", "--single-file", str(single)]).exit_code == 0
    with pytest.raises(FinetuneError, match=r"SDXL checkpoint .* holds an SD 1\.x model"):
        load_base(str(single), config=str(tiny_base_dir()))
    r = CliRunner().invoke(cli, ["base", "tiny-sdxl", "--single-file", str(single)])
    assert r.exit_code == 1 and "already exists" in r.output

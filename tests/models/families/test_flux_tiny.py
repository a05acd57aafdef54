"""The tiny FLUX.1 bases: Flux's structure, deterministic, and the same model from its diffusers
folder and from its split single files."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from finetune.errors import FinetuneError
from finetune.models.families import flux_files
from finetune.models.families.flux_tiny import (build_tiny_flux_pipeline, tiny_flux_base_dir,
                                                 tiny_flux_split_dir)


def image(pipe, **kw):
    out = pipe("a photo of ohwx person", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    return out.images[0]


@pytest.fixture(scope="module")
def folder_pipe():
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_base_dir("dev")), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_has_flux_structure(folder_pipe):
    t = folder_pipe.transformer
    assert len(t.transformer_blocks) == 2 and len(t.single_transformer_blocks) == 2
    assert t.config.in_channels == 4 * folder_pipe.vae.config.latent_channels == 64  # packed 2x2 patches
    assert sum(t.config.axes_dims_rope) == t.config.attention_head_dim  # 3-axis RoPE over each head
    assert hasattr(t.time_text_embed, "guidance_embedder")  # dev: distilled guidance as an input
    assert t.config.joint_attention_dim == folder_pipe.text_encoder_2.config.d_model
    assert t.config.pooled_projection_dim == folder_pipe.text_encoder.config.hidden_size
    assert type(folder_pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(folder_pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert folder_pipe.text_encoder_2.config.is_gated_act  # T5 v1.1, as FLUX.1's t5xxl
    vae = folder_pipe.vae.config
    assert (vae.latent_channels, vae.use_quant_conv, vae.shift_factor) == (16, False, 0.1159)
    assert folder_pipe.scheduler.config.use_dynamic_shifting  # dev shifts with resolution
    # the T5 tokenizer is a real Unigram one: known words whole, others in pieces, </s> at the end
    tok = folder_pipe.tokenizer_2
    assert type(tok.backend_tokenizer.model).__name__ == "Unigram"
    pieces = tok.convert_ids_to_tokens(tok("a photo of ohwx").input_ids)
    assert pieces[:3] == ["▁a", "▁photo", "▁of"] and pieces[-1] == "</s>" and "".join(pieces[3:-1]) == "▁ohwx"


def test_schnell_has_no_guidance_and_no_shift():
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_base_dir("schnell")), local_files_only=True)
    assert not pipe.transformer.config.guidance_embeds
    assert not hasattr(pipe.transformer.time_text_embed, "guidance_embedder")
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0


def test_deterministic_and_cached(folder_pipe):
    assert tiny_flux_base_dir("dev") == tiny_flux_base_dir("dev")
    fresh = build_tiny_flux_pipeline("dev")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(folder_pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_split_files_are_the_same_model(folder_pipe):
    folder = tiny_flux_split_dir("dev")
    assert {p.name for p in folder.glob("*.safetensors")} == {"flux1-dev-tiny.safetensors", "clip_l.safetensors",
                                                             "t5xxl_tiny.safetensors", "ae.safetensors"}
    pipe = flux_files.load_split_files(flux_files.read_spec(folder / "base.toml"))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(folder_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert np.abs(image(pipe) - image(folder_pipe)).max() <= 1e-5


def test_spec_refusals(tmp_path):
    files = tiny_flux_split_dir("dev")
    spec = (files / "base.toml").read_text().replace('= "', f'= "{files}/')  # absolute paths
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.replace("clip_l =", "clipl =") + "t5 = 1\n")
    with pytest.raises(FinetuneError, match=r"unknown key 'clipl'.*unknown key 't5'.*missing key 'clip_l'"):
        flux_files.read_spec(bad)
    bad.write_text(spec.replace("ae.safetensors", "nope.safetensors"))
    with pytest.raises(FinetuneError, match="no such file: ae = .*nope.safetensors"):
        flux_files.read_spec(bad)
    # a dev transformer with schnell's configs: named, not loaded wrongly
    schnell = str(tiny_flux_base_dir("schnell"))
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("\n".join(line if not line.startswith("config") else f'config = "{schnell}"'
                               for line in spec.splitlines()))
    with pytest.raises(FinetuneError, match="FLUX.1-dev transformer but the config .* FLUX.1-schnell"):
        flux_files.load_split_files(flux_files.read_spec(mixed))


def test_a_transformer_file_alone_takes_its_other_parts_from_a_folder(folder_pipe, tmp_path):
    files = tiny_flux_split_dir("dev")
    # the tiny's own file finds the tiny's folder; a spec and a folder given as config load the same model
    for path, config in ((files / "flux1-dev-tiny.safetensors", ""),
                         (files / "flux1-dev-tiny.safetensors", str(tiny_flux_base_dir("dev"))),
                         (files / "base.toml", "")):
        pipe, weights, folder = flux_files.load_base_file(path, config)
        assert folder == tiny_flux_base_dir("dev")
        assert path in weights if path.suffix == ".safetensors" else len(weights) == 4
        want, got = folder_pipe.transformer.state_dict(), pipe.transformer.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert flux_files.load_base_file(files / "clip_l.safetensors", "") is None  # not a transformer
    # a transformer of another width with no config: told what to give
    from safetensors.torch import load_file, save_file

    other = {k: v for k, v in load_file(files / "flux1-dev-tiny.safetensors").items()}
    other["img_in.weight"] = torch.zeros(48, 64)
    save_file(other, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(FinetuneError, match="a FLUX.1 transformer alone: give its other parts with a base spec"):
        flux_files.load_base_file(tmp_path / "flux1-dev.safetensors", "")

"""diffusers -> single-file layout: round trips through diffusers' own reverse conversion and loader."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open

from finetune.models.ldm_layout import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from finetune.models.single_file import detect_architecture, pipeline_to_ldm, save_single_file
from finetune.models.tiny import build_tiny_pipeline, tiny_base_dir


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def _image(pipe):
    out = pipe("a photo of ohwx person", height=64, width=64, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


def test_save_and_load_single_file_round_trip(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_single_file(pipe, tmp_path / "tiny.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # the temporary file is gone

    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_base_dir()), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_tensors(getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict())
    assert abs(_image(loaded) - _image(pipe)).max() < 1e-6


def test_every_tensor_used_once(pipe):
    ldm = pipeline_to_ldm(pipe)
    sources = [pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()]
    # No structural extras either way: transformers 5 keeps CLIP's position_ids as a non-persistent
    # buffer, so it is neither in the text encoder's state dict nor written (loaders rebuild it).
    assert len(ldm) == sum(len(sd) for sd in sources)
    assert {t.data_ptr() for t in ldm.values()} == {t.data_ptr() for sd in sources for t in sd.values()}
    assert not [k for k in ldm if k.endswith("position_ids")]
    assert detect_architecture(ldm) == "sd1"


def test_layout_matches_the_original_names(pipe):
    ldm = pipeline_to_ldm(pipe)
    # SD 1.5's own names for the pieces whose position depends on the topology (the shortcuts sit where
    # the tiny model's channels change, 32 -> 64 at level 2).
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.input_blocks.7.0.skip_connection.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.2.norm1.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in ldm, key
    for side in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert ldm[f"first_stage_model.{side}.mid.attn_1.{name}.weight"].shape == (64, 64, 1, 1)


@pytest.mark.parametrize("down, up, channels, layers", [
    (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
     (32, 64, 64, 64), 1),
    # attention only on the deep levels, so the upsampler slot moves between .1 and .2
    (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
     ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), (32, 64, 96), 3),
])
def test_other_unet_topologies_round_trip(down, up, channels, layers):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=channels, layers_per_block=layers,
                                down_block_types=down, up_block_types=up, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    sd = unet.state_dict()
    ldm = unet_to_ldm(sd, unet.config)
    assert len(ldm) == len(sd)
    _assert_same_tensors(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), sd)


def test_other_vae_topology_round_trips():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    sd = vae.state_dict()
    ldm = vae_to_ldm(sd, vae.config)
    assert len(ldm) == len(sd)
    _assert_same_tensors(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), sd)


def test_text_encoder_keys_nested_or_flat(pipe):
    flat = pipe.text_encoder.state_dict()
    nested = {f"text_model.{k}": v for k, v in flat.items()}
    assert text_encoder_to_ldm(flat).keys() == text_encoder_to_ldm(nested).keys()
    with pytest.raises(ValueError, match="text_projection"):
        text_encoder_to_ldm({**flat, "text_projection.weight": torch.zeros(1)})


def test_cast_and_metadata(pipe, tmp_path):
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16,
                            metadata={"finetune.trigger": "ohwx"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"finetune.trigger": "ohwx"}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    with pytest.raises(TypeError, match="steps"):
        save_single_file(pipe, tmp_path / "bad.safetensors", metadata={"steps": 100})


def test_mismatched_config_or_unmerged_lora_is_refused(pipe):
    sd = pipe.unet.state_dict()
    three_levels = dict(pipe.unet.config, down_block_types=pipe.unet.config.down_block_types[:3],
                        up_block_types=pipe.unet.config.up_block_types[1:])
    with pytest.raises(ValueError, match="no place"):
        unet_to_ldm(sd, three_levels)
    lora = {**sd, "conv_in.lora_A.default.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="fuse_lora"):
        unet_to_ldm(lora, pipe.unet.config)


def test_detect_architecture():
    assert detect_architecture(["conditioner.embedders.0.transformer.text_model.x",
                                "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_architecture(["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    assert detect_architecture(["cond_stage_model.transformer.text_model.x"]) == "sd1"
    with pytest.raises(ValueError, match="unknown"):
        detect_architecture(["model.diffusion_model.double_blocks.0.x"])

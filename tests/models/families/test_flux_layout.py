"""FLUX.1 transformer: diffusers <-> original (BFL) layout, checked against diffusers' own converter."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from finetune.models.families import flux_layout
from finetune.models.families.flux_tiny import TRANSFORMER_CONFIG


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=True).eval()


def thin_flux1_state(config):
    """FLUX.1's real key set and output widths, each tensor 2 columns wide: the layouts only cut and
    join along the output dimension, so this checks order and placement at the real width in kB."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn((v.shape[0], 2) if v.ndim > 1 else v.shape, generator=g)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_original_layout_is_what_diffusers_converter_reads_at_flux1_width(guidance):
    config = dict(flux_layout.FLUX1_CONFIG, guidance_embeds=guidance)
    state = thin_flux1_state(config)
    original = flux_layout.to_original(state, config)
    # BFL's names, fused where BFL fuses: 19 double blocks x (2 qkv ...), 38 single blocks' linear1
    assert original["double_blocks.18.img_attn.qkv.weight"].shape[0] == 3 * 3072
    assert original["single_blocks.37.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    assert original["double_blocks.0.img_attn.norm.query_norm.scale"].shape == (128,)
    assert ("guidance_in.in_layer.weight" in original) == guidance
    ckpt = {flux_layout.ORIGINAL_PREFIX + k: v for k, v in original.items()}  # ComfyUI's full-checkpoint prefix
    back = convert_flux_transformer_checkpoint_to_diffusers(ckpt)
    assert not ckpt  # diffusers' converter consumed every key
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # and our reader agrees with diffusers' at that width
    ours = flux_layout.to_diffusers(original, config)
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)


def test_round_trip_on_tiny_width_is_exact(tiny):
    state = tiny.state_dict()
    original = flux_layout.to_original(state, tiny.config)
    assert flux_layout.is_original_flux(original)
    assert original["single_blocks.1.linear1.weight"].shape == (7 * 32, 32)
    back = flux_layout.to_diffusers({flux_layout.ORIGINAL_PREFIX + k: v for k, v in original.items()}, tiny.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_diffusers_own_single_file_loader_only_knows_flux1_width(tiny, tmp_path):
    """Why the reader is ours: diffusers cuts linear1 at FLUX.1's 3072 whatever the model's width. If
    this starts passing, diffusers learned other widths and its loader can read our files directly."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in flux_layout.to_original(tiny.state_dict(), tiny.config).items()}, path)
    with pytest.raises(Exception, match="split|size|shape"):
        convert_flux_transformer_checkpoint_to_diffusers(load_file(path))


def test_from_single_file_loads_our_conversion(tiny, tmp_path):
    tiny.save_config(tmp_path / "transformer")
    state = flux_layout.to_diffusers(flux_layout.to_original(tiny.state_dict(), tiny.config), tiny.config)
    loaded = FluxTransformer2DModel.from_single_file(state, config=str(tmp_path), subfolder="transformer",
                                                     local_files_only=True)
    want = tiny.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)


def test_refusals_name_the_key(tiny):
    state = dict(tiny.state_dict())
    with pytest.raises(ValueError, match="unmerged LoRA"):
        flux_layout.to_original({**state, "proj_out.lora_A.default.weight": torch.zeros(1)}, tiny.config)
    with pytest.raises(ValueError, match="extra.weight"):
        flux_layout.to_original({**state, "extra.weight": torch.zeros(1)}, tiny.config)
    original = flux_layout.to_original(state, tiny.config)
    with pytest.raises(ValueError, match="single_blocks.0.linear2.weight"):
        flux_layout.to_diffusers({k: v for k, v in original.items() if k != "single_blocks.0.linear2.weight"},
                                 tiny.config)
    wider = dict(tiny.config, num_attention_heads=3)
    with pytest.raises(ValueError, match="rows"):
        flux_layout.to_diffusers(original, wider)
    with pytest.raises(ValueError, match="not part of"):
        flux_layout.to_diffusers({**original, "double_blocks.9.img_mod.lin.weight": torch.zeros(1)}, tiny.config)

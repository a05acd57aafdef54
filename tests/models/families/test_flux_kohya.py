"""FLUX.1 LoRAs in the kohya/ComfyUI layout, read back by diffusers' own kohya-Flux converter."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from finetune.lora_io import LoraLayer
from finetune.models.families import flux_kohya, flux_layout
from finetune.models.families.flux_tiny import tiny_flux_base_dir

DOUBLE = [f"attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                "to_add_out")] + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Some thousand small products: on a busy machine one thread is 50x faster than a pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flux1_layers(rank=2, alpha=1.0, seed=0):
    """A LoRA on every attention and MLP Linear of FLUX.1-dev's real shapes (no base weights needed)."""
    cfg = flux_layout.FLUX1_CONFIG
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    g = torch.Generator().manual_seed(seed)
    names = [f"transformer_blocks.{i}.{m}" for i in range(cfg["num_layers"]) for m in DOUBLE]
    names += [f"single_transformer_blocks.{i}.{m}" for i in range(cfg["num_single_layers"]) for m in SINGLE]
    layers = []
    for n in names:
        lin = model.get_submodule(n)
        layers.append(LoraLayer("transformer", n, torch.randn(rank, lin.in_features, generator=g) / 30,
                                torch.randn(lin.out_features, rank, generator=g), alpha))
    return layers


def check_diffusers_reads(kohya: dict, layers) -> None:
    """diffusers' kohya-Flux converter gives, for every module and nothing else, the same update."""
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
    want = {layer.module: layer for layer in layers}
    assert modules == set(want), sorted(modules ^ set(want))[:4]
    g = torch.Generator().manual_seed(1)
    for m, layer in want.items():
        a, b = converted[f"transformer.{m}.lora_A.weight"], converted[f"transformer.{m}.lora_B.weight"]
        probe = torch.randn(layer.down.shape[1], 3, generator=g)
        got, expect = b @ (a @ probe), layer.scale * (layer.up @ (layer.down @ probe))
        assert torch.allclose(got, expect, atol=1e-5 * expect.abs().max().item() + 1e-7), m


@pytest.fixture(scope="module")
def flux1_kohya():
    layers = flux1_layers()
    return flux_kohya.state_dict(flux_kohya.fuse(layers, flux_layout.FLUX1_CONFIG)), layers


def test_names_and_fusing_at_flux1_width(flux1_kohya):
    kohya, layers = flux1_kohya
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 3072, 6)
    assert kohya["lora_unet_double_blocks_18_txt_attn_qkv.lora_down.weight"].shape == (6, 3072)
    assert kohya["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (7 * 3072, 8)
    assert "lora_unet_single_blocks_0_linear2.lora_down.weight" in kohya
    # the real alpha: rank 2, alpha 1 per module -> rank 8, alpha 4 on linear1 (same scale 1/2)
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 4.0
    assert kohya["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == 1.0
    assert flux_kohya.is_flux_kohya(kohya)


def test_diffusers_kohya_converter_reads_every_key(flux1_kohya):
    kohya, layers = flux1_kohya
    check_diffusers_reads(kohya, layers)


@pytest.mark.parametrize("mutation", ["rename", "drop_alpha", "drop_module", "drop_up"])
def test_a_damaged_file_is_caught(flux1_kohya, mutation):
    """The check has teeth: a renamed key, a lost alpha, a lost module or half a LoRA is not read as the same."""
    kohya, layers = flux1_kohya
    bad = dict(kohya)
    name = "lora_unet_double_blocks_3_img_attn_qkv"
    if mutation == "rename":
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            bad[name + "x" + suffix] = bad.pop(name + suffix)
    elif mutation == "drop_alpha":
        del bad["lora_unet_single_blocks_5_linear1.alpha"]
    elif mutation == "drop_module":
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            del bad["lora_unet_double_blocks_7_txt_mlp_2" + suffix]
    else:
        del bad[name + ".lora_up.weight"]
    with pytest.raises((AssertionError, ValueError, KeyError)):
        check_diffusers_reads(bad, layers)


def test_unfuse_is_exact_and_handles_unequal_ranks():
    cfg = dict(flux_layout.FLUX1_CONFIG, num_layers=1, num_single_layers=1)
    layers = [layer for layer in flux1_layers() if ".0." in layer.module or layer.module.startswith("single")]
    layers = [layer for layer in layers if layer.module.split(".")[1] == "0"]
    back = {lay.module: lay for lay in flux_kohya.unfuse(flux_kohya.fuse(layers, cfg), cfg)}
    for layer in layers:
        got = back[layer.module]
        assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
        assert got.scale == pytest.approx(layer.scale)
    # q with rank 4 and alpha 8 beside k, v of rank 2 and alpha 1: no equal split, still the same update
    q = layers[0]
    odd = [LoraLayer("transformer", q.module, torch.randn(4, 3072), torch.randn(3072, 4), 8.0)] + layers[1:3]
    back = {lay.module: lay for lay in flux_kohya.unfuse(flux_kohya.fuse(odd, cfg), cfg)}
    probe = torch.randn(3072, 2)
    for layer in odd:
        got = back[layer.module]
        assert torch.allclose(got.scale * got.up @ (got.down @ probe), layer.scale * layer.up @ (layer.down @ probe),
                              rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="img_attn_qkvx"):
        flux_kohya.unfuse([LoraLayer("transformer", "double_blocks_0_img_attn_qkvx", q.down, q.up, 1.0)], cfg)
    with pytest.raises(ValueError, match="no kohya LoRA name"):
        flux_kohya.kohya_names(["transformer_blocks.0.attn.norm_q"], cfg)


# diffusers' converter splits a single block's linear1 at FLUX.1's widths (3072, 3072, 3072, 12288)
# whatever the model: on the tiny width the image check covers the rest, the test above linear1.
TINY_TARGETS = (r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
                r"|ff(_context)?\.net\.(0\.proj|2))|single_transformer_blocks\.\d+\.proj_out")


def image(pipe):
    return pipe("a photo of ohwx person", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_tiny_kohya_file_gives_the_trained_image_in_diffusers():
    folder = str(tiny_flux_base_dir("dev"))
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base = image(pipe)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=TINY_TARGETS))
    torch.manual_seed(0)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    trained = image(pipe)
    assert np.abs(trained - base).max() > 1e-2  # the LoRA changes the image
    sd = get_peft_model_state_dict(pipe.transformer)
    layers = [LoraLayer("transformer", k.removesuffix(".lora_A.weight"), v, sd[k.replace("lora_A", "lora_B")], 2.0)
              for k, v in sd.items() if k.endswith("lora_A.weight")]
    kohya = flux_kohya.state_dict(flux_kohya.fuse(layers, pipe.transformer.config))
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight" in kohya

    fresh = FluxPipeline.from_pretrained(folder, local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(dict(kohya))
    assert np.abs(image(fresh) - trained).max() <= 1e-5


def test_final_layer_carries_its_scale_in_the_weights():
    """diffusers' converter reads the final layer's LoRA without its alpha: written with alpha = rank and
    alpha / rank folded into `up`, every reader applies the same update."""
    cfg = dict(flux_layout.FLUX1_CONFIG, num_layers=1, num_single_layers=1)
    layer = LoraLayer("transformer", "proj_out", torch.randn(2, 3072), torch.randn(64, 2), 8.0)
    (fused,) = flux_kohya.fuse([layer], cfg)
    assert fused.module == "final_layer_linear" and fused.alpha == 2.0
    assert torch.allclose(fused.scale * fused.up @ fused.down, layer.scale * layer.up @ layer.down)
    converted = _convert_kohya_flux_lora_to_diffusers(flux_kohya.state_dict([fused]))
    (a,) = [v for k, v in converted.items() if k.endswith("lora_A.weight")]
    (b,) = [v for k, v in converted.items() if k.endswith("lora_B.weight")]
    assert torch.allclose(b @ a, layer.scale * layer.up @ layer.down, atol=1e-5)

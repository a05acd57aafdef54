"""kohya LoRA names: the original SDXL module naming, and a kohya file through diffusers' own loader."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from finetune.models import load_base
from finetune.models.kohya_names import kohya_lora_name, kohya_lora_names

# SDXL 1.0 base's UNet topology (its unet/config.json, the keys the layout depends on)
SDXL_UNET = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                 mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[1, 2, 10])


@pytest.mark.parametrize("module, name", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
     "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"),
    ("mid_block.attentions.0.proj_in", "lora_unet_middle_block_1_proj_in"),
    ("up_blocks.0.attentions.2.transformer_blocks.3.ff.net.0.proj",
     "lora_unet_output_blocks_2_1_transformer_blocks_3_ff_net_0_proj"),
    ("up_blocks.1.attentions.0.proj_out", "lora_unet_output_blocks_3_1_proj_out"),
    # kohya's conv LoRA (ResnetBlock2D, Downsample2D, Upsample2D) in the original block numbering
    ("down_blocks.1.resnets.0.conv1", "lora_unet_input_blocks_4_0_in_layers_2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("up_blocks.2.resnets.2.time_emb_proj", "lora_unet_output_blocks_8_0_emb_layers_1"),
    ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv"),
    ("add_embedding.linear_1", "lora_unet_label_emb_0_0"),
    ("conv_in", "lora_unet_input_blocks_0_0"),
])
def test_sdxl_unet_names(module, name):
    assert kohya_lora_name("unet", module, "sdxl", SDXL_UNET) == name


def test_text_encoder_and_sd1_names():
    # transformers >= 5.6 has no text_model. level in CLIPTextModel; CLIPTextModelWithProjection keeps it
    assert kohya_lora_name("text_encoder", "encoder.layers.3.self_attn.q_proj", "sdxl") == \
        "lora_te1_text_model_encoder_layers_3_self_attn_q_proj"
    assert kohya_lora_name("text_encoder_2", "text_model.encoder.layers.31.mlp.fc2", "sdxl") == \
        "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    assert kohya_lora_name("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj", "sd1") == \
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    # kohya trains SD 1.x on diffusers' UNet, so its names stay diffusers'
    assert kohya_lora_names("unet", ["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"], "sd1") == \
        {"down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k":
         "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"}


def test_names_loaders_would_not_apply_are_refused():
    with pytest.raises(ValueError, match="text_projection"):
        kohya_lora_name("text_encoder_2", "text_projection", "sdxl")
    with pytest.raises(ValueError, match="no kohya LoRA prefix"):
        kohya_lora_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "sd1")
    with pytest.raises(ValueError, match="config"):
        kohya_lora_name("unet", "conv_in", "sdxl")
    with pytest.raises(ValueError, match="no place"):
        kohya_lora_name("unet", "down_blocks.0.attentions.0.proj_in", "sdxl", SDXL_UNET)  # level 0 has no attention


def image(pipe):
    # 2 steps are enough to compare; ~370 unmerged LoRA layers double the cost of each
    return pipe("a photo of ohwx person", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_kohya_sdxl_lora_loads_in_diffusers_like_the_peft_one(tmp_path):
    """A random LoRA (alpha != rank) on every kind of layer kohya trains, both text encoders included:
    written under our kohya names, diffusers' own kohya converter applies exactly the same model."""
    rank, alpha = 4, 2.0
    pipe = load_base("tiny-sdxl").pipe
    base_image = image(pipe)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    torch.manual_seed(0)
    for component, targets in (("unet", unet_targets), ("text_encoder", te_targets), ("text_encoder_2", te_targets)):
        # init_lora_weights=False: random up matrices too, so every layer changes the image
        getattr(pipe, component).add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                        init_lora_weights=False))
    want = image(pipe)
    assert np.abs(want - base_image).max() > 0.05

    kohya = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        sd = get_peft_model_state_dict(getattr(pipe, component))
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
        for module, name in kohya_lora_names(component, modules, "sdxl", pipe.unet.config).items():
            kohya[f"{name}.lora_down.weight"] = sd[f"{module}.lora_A.weight"]
            kohya[f"{name}.lora_up.weight"] = sd[f"{module}.lora_B.weight"]
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    save_file(kohya, tmp_path / "kohya.safetensors")

    fresh = load_base("tiny-sdxl").pipe
    fresh.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    loaded = {c: get_peft_model_state_dict(getattr(fresh, c), adapter_name=getattr(fresh, c).active_adapters()[0])
              for c in ("unet", "text_encoder", "text_encoder_2")}
    assert sum(len(sd) for sd in loaded.values()) * 3 == len(kohya) * 2  # every module found its place
    assert np.abs(image(fresh) - want).max() <= 1e-5

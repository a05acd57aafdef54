"""diffusers -> original (LDM, "single file") state-dict layout of SD's UNet, VAE and CLIP text encoder.

The single-file layout is what AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` read: one
safetensors file with the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and
the CLIP text encoder under `cond_stage_model.transformer.`. diffusers only converts the other way, so
the name maps here are built from the model configs (number of levels, layers per level, which levels
have attention) rather than from SD 1.5's sizes.

Each map goes from a diffusers *module* path to an LDM module path; a parameter keeps whatever
follows the longest mapped module (`...attentions.0` covers the whole transformer under it, whose
inner names are the same in both layouts). A key no map covers is an error, never silently dropped.
The families (finetune.models.families) assemble whole pipelines from these maps; `single_file`
writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only in annotations: detecting a file's architecture needs no torch import
    import torch

from finetune.words import plural

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# LDM's ResBlock is Sequential-based, hence the numbered slots (the gaps are SiLU / dropout).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TEXT_MODULES = ("embeddings", "encoder", "final_layer_norm")


def _per_level(layers_per_block: int | Iterable[int], levels: int) -> list[int]:
    layers = [layers_per_block] * levels if isinstance(layers_per_block, int) else list(layers_per_block)
    if len(layers) != levels:
        raise ValueError(f"layers_per_block {layers_per_block!r} does not match {levels} levels")
    return layers


def _add_block(modules: dict[str, str], diffusers: str, ldm: str, inner: Mapping[str, str]) -> None:
    for name, ldm_name in inner.items():
        modules[f"{diffusers}.{name}"] = f"{ldm}.{ldm_name}"


def unet_modules(config: Mapping) -> dict[str, str]:
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down_types)
    if len(up_types) != levels:
        raise ValueError(f"down_block_types {down_types} and up_block_types {up_types} differ in length")
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type {mid_type!r} is not SD 1.x's UNetMidBlock2DCrossAttn")
    per_level = _per_level(config["layers_per_block"], levels)

    modules = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    # LDM numbers the encoder as one flat list: conv_in, then per level its (resnet, attention)
    # layers and, on all but the deepest level, a downsampler in a slot of its own.
    slot = 1
    for level, block_type in enumerate(down_types):
        for layer in range(per_level[level]):
            _add_block(modules, f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{slot}.0", _UNET_RESNET)
            if "CrossAttn" in block_type:
                modules[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{slot}.1"
            slot += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{slot}.0.op"
            slot += 1

    # resnet, transformer, resnet: the only middle block UNet2DConditionModel builds for SD 1.x.
    _add_block(modules, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    modules["mid_block.attentions.0"] = "middle_block.1"
    _add_block(modules, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)

    # The decoder has one more layer per level (it also eats the skip of the downsampler or conv_in);
    # the upsampler sits inside the level's last slot, after the attention when there is one.
    slot = 0
    for level, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for layer in range(per_level[levels - 1 - level] + 1):
            _add_block(modules, f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{slot}.0", _UNET_RESNET)
            if has_attention:
                modules[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{slot}.1"
            slot += 1
        if level < levels - 1:
            modules[f"up_blocks.{level}.upsamplers.0"] = f"output_blocks.{slot - 1}.{2 if has_attention else 1}"
    return modules


def _vae_modules(config: Mapping) -> dict[str, str]:
    levels = len(config["down_block_types"])
    per_level = _per_level(config["layers_per_block"], levels)
    modules = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        modules.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                        f"{side}.conv_norm_out": f"{side}.norm_out"})
        _add_block(modules, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET)
        _add_block(modules, f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION)
        _add_block(modules, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET)
    for level in range(levels):
        for layer in range(per_level[level]):
            _add_block(modules, f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}",
                       _VAE_RESNET)
        if level < levels - 1:
            modules[f"encoder.down_blocks.{level}.downsamplers.0"] = f"encoder.down.{level}.downsample"
    # LDM indexes decoder levels by resolution (up.0 is the full-size one); diffusers by execution order.
    for level in range(levels):
        ldm_level = levels - 1 - level
        for layer in range(per_level[ldm_level] + 1):
            _add_block(modules, f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{ldm_level}.block.{layer}",
                       _VAE_RESNET)
        if level < levels - 1:
            modules[f"decoder.up_blocks.{level}.upsamplers.0"] = f"decoder.up.{ldm_level}.upsample"
    return modules


def rename_keys(keys: Iterable[str], modules: Mapping[str, str], prefix: str, what: str) -> dict[str, str]:
    """diffusers key -> prefixed LDM key, for every key; raises listing the keys no module covers."""
    renamed, unknown = {}, []
    for key in keys:
        if ".base_layer." in key or ".lora_" in key:
            raise ValueError(f"{what} state dict holds unmerged LoRA layers ({key!r}): call pipe.fuse_lora() "
                             "and pipe.unload_lora_weights() before converting")
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            ldm = modules.get(".".join(parts[:cut]))
            if ldm is not None:
                renamed[key] = prefix + ".".join([ldm, *parts[cut:]])
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{plural(len(unknown), what + ' key')} have no place in the single-file layout "
                         f"(e.g. {unknown[:3]}): is the config the one this state dict belongs to?")
    return renamed


def unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """The UNet under `model.diffusion_model.`; values are the same tensors (no copies)."""
    names = rename_keys(unet_state_dict, unet_modules(unet_config), UNET_PREFIX, "UNet")
    return {names[k]: v for k, v in unet_state_dict.items()}


def vae_to_ldm(vae_state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """The VAE under `first_stage_model.`; values are the same tensors or views of them."""
    names = rename_keys(vae_state_dict, _vae_modules(vae_config), VAE_PREFIX, "VAE")
    out = {}
    for key, tensor in vae_state_dict.items():
        name = names[key]
        # The original AttnBlock computes q/k/v/proj_out with 1x1 Conv2d, diffusers with Linear: same
        # numbers, but loaders of the original layout check shapes, so store them as [C, C, 1, 1].
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


def text_encoder_to_ldm(te_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP text encoder under `cond_stage_model.transformer.text_model.`."""
    out = {}
    for key, tensor in te_state_dict.items():
        # transformers >= 5.6 flattened CLIPTextModel (keys start at `embeddings.`); older versions
        # nest everything under `text_model.`, which is what the original layout keeps.
        inner = key.removeprefix("text_model.")
        if inner.split(".", 1)[0] not in _TEXT_MODULES:
            raise ValueError(f"text encoder key {key!r} is not part of an SD 1.x CLIPTextModel "
                             f"(expected it under {', '.join(_TEXT_MODULES)})")
        out[f"{TEXT_PREFIX}text_model.{inner}"] = tensor
    return out


def unet_module_names(modules: Iterable[str], unet_config: Mapping,
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """diffusers UNet module path -> the original layout's module path, e.g.
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`;
    `extra` adds module maps (SDXL's add_embedding)."""
    table = {**unet_modules(unet_config), **(extra or {})}
    modules = list(modules)
    # The layout maps parameter keys by their longest mapped module; a module is such a key minus the
    # parameter name, so give it one and take it off again.
    renamed = rename_keys([f"{m}.weight" for m in modules], table, "", "UNet")
    return {m: renamed[f"{m}.weight"].removesuffix(".weight") for m in modules}


def unet_aliases(modules: Iterable[str], unet_config: Mapping, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """{module: its original-layout name} for a UNet whose every module has one, else {} (kohya files of
    such a UNet may use either name)."""
    try:
        return unet_module_names(modules, unet_config, extra)
    except (ValueError, KeyError, TypeError):  # a UNet topology without an original layout: no aliases
        return {}

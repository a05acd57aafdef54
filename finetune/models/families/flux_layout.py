"""FLUX.1 transformer weights: diffusers layout <-> the original (BFL) layout, both directions.

The original layout is what Black Forest Labs publish (`flux1-dev.safetensors`) and what ComfyUI,
Forge and kohya sd-scripts load and train. It differs from diffusers' `FluxTransformer2DModel` in
names and in fusing:
- a double block's image and text streams each hold q, k and v in one `qkv` Linear;
- a single block holds q, k, v and the MLP's input projection in one `linear1`, in that order;
- RMSNorm weights are called `scale`;
- the final AdaLN modulation orders its halves (shift, scale) where diffusers has (scale, shift).

diffusers converts original -> diffusers only, with FLUX.1's width (3072) written into the code, so
a narrower model (the tiny test base) cannot pass through it. Both directions here take the widths
from the model's config. `module_groups` is the one table: the weight converters and the kohya LoRA
names (`flux_kohya`) are built from it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI's full checkpoints nest the transformer here

# FLUX.1-dev's transformer/config.json (schnell: guidance_embeds false): real shapes for benches and
# for checking the layout against diffusers' own converter, which only knows this width.
FLUX1_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))

def module_groups(config: Mapping) -> dict[str, tuple[str, ...]]:
    """Original-layout module -> the diffusers modules it holds, concatenated along the output
    dimension in this order (one module where nothing is fused)."""
    groups: dict[str, tuple[str, ...]] = {
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        "final_layer.linear": ("proj_out",),
        "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    }
    if config.get("guidance_embeds"):
        groups["guidance_in.in_layer"] = ("time_text_embed.guidance_embedder.linear_1",)
        groups["guidance_in.out_layer"] = ("time_text_embed.guidance_embedder.linear_2",)
    for i in range(config["num_layers"]):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        groups.update({
            o + "img_mod.lin": (d + "norm1.linear",),
            o + "txt_mod.lin": (d + "norm1_context.linear",),
            o + "img_attn.qkv": (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"),
            o + "txt_attn.qkv": (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
            o + "img_attn.proj": (d + "attn.to_out.0",),
            o + "txt_attn.proj": (d + "attn.to_add_out",),
            o + "img_attn.norm.query_norm": (d + "attn.norm_q",),
            o + "img_attn.norm.key_norm": (d + "attn.norm_k",),
            o + "txt_attn.norm.query_norm": (d + "attn.norm_added_q",),
            o + "txt_attn.norm.key_norm": (d + "attn.norm_added_k",),
            o + "img_mlp.0": (d + "ff.net.0.proj",),
            o + "img_mlp.2": (d + "ff.net.2",),
            o + "txt_mlp.0": (d + "ff_context.net.0.proj",),
            o + "txt_mlp.2": (d + "ff_context.net.2",),
        })
    for i in range(config["num_single_layers"]):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        groups.update({
            o + "modulation.lin": (d + "norm.linear",),
            o + "linear1": (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"),
            o + "linear2": (d + "proj_out",),
            o + "norm.query_norm": (d + "attn.norm_q",),
            o + "norm.key_norm": (d + "attn.norm_k",),
        })
    return groups


def _is_norm(original_module: str) -> bool:
    return original_module.endswith(("query_norm", "key_norm"))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: the final modulation's scale/shift order differs between layouts."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _param_names(original_module: str) -> tuple[tuple[str, str], ...]:
    """(diffusers parameter, original parameter) pairs of one module."""
    return (("weight", "scale"),) if _is_norm(original_module) else (("weight", "weight"), ("bias", "bias"))


def to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in the original layout (keys under `prefix`).

    Every key must find its place: unmerged LoRA layers or a config of another model are errors, not
    silently dropped weights."""
    lora = [k for k in state_dict if ".lora_" in k or ".base_layer." in k]
    if lora:
        raise ValueError(f"the transformer state dict holds unmerged LoRA layers ({lora[0]!r}): merge them "
                         "(fuse_lora + unload_lora_weights) before converting")
    out, used = {}, set()
    for original, modules in module_groups(config).items():
        for dparam, oparam in _param_names(original):
            keys = [f"{m}.{dparam}" for m in modules]
            if not all(k in state_dict for k in keys):
                if dparam == "bias" and not any(k in state_dict for k in keys):
                    continue  # a Linear without bias
                missing = [k for k in keys if k not in state_dict]
                raise ValueError(f"transformer state dict lacks {missing[:3]}: is the config the one it belongs to?")
            tensor = torch.cat([state_dict[k] for k in keys], dim=0) if len(keys) > 1 else state_dict[keys[0]]
            if original == "final_layer.adaLN_modulation.1":
                tensor = _swap_halves(tensor)
            out[f"{prefix}{original}.{oparam}"] = tensor
            used.update(keys)
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise ValueError(f"{len(unknown)} transformer keys have no place in the original FLUX.1 layout "
                         f"(e.g. {unknown[:3]}): is the config the one this state dict belongs to?")
    return out


def split_sizes(config: Mapping) -> dict[str, int]:
    """Output width of each diffusers module that the original layout fuses, from the config."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    sizes = {"to_q": inner, "to_k": inner, "to_v": inner, "add_q_proj": inner, "add_k_proj": inner,
             "add_v_proj": inner, "proj_mlp": 4 * inner}  # diffusers' single block: mlp_ratio 4
    return sizes


def _width(module: str, config: Mapping) -> int:
    return split_sizes(config)[module.rsplit(".", 1)[-1]]


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout keys without ComfyUI's `model.diffusion_model.` (present or not)."""
    return {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state_dict.items()}


def to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """An original-layout FLUX.1 transformer state dict in diffusers' layout, for the model `config`
    describes (any width). Keys may carry `model.diffusion_model.`; a key the layout does not know,
    or a missing one, is an error naming it."""
    state = strip_prefix(state_dict)
    out, used = {}, set()
    for original, modules in module_groups(config).items():
        for dparam, oparam in _param_names(original):
            key = f"{original}.{oparam}"
            if key not in state:
                if oparam == "bias":
                    continue
                raise ValueError(f"the original-layout transformer lacks {key!r}: is it a FLUX.1 "
                                 f"{'dev' if config.get('guidance_embeds') else 'schnell'} transformer of "
                                 f"{config['num_layers']} double and {config['num_single_layers']} single blocks?")
            tensor = state[key]
            used.add(key)
            if original == "final_layer.adaLN_modulation.1":
                tensor = _swap_halves(tensor)
            if len(modules) == 1:
                out[f"{modules[0]}.{dparam}"] = tensor
                continue
            sizes = [_width(m, config) for m in modules]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{key} has {tensor.shape[0]} rows; a model of this config fuses {sizes} = "
                                 f"{sum(sizes)} there: the config does not match the file")
            for m, part in zip(modules, torch.split(tensor, sizes, dim=0)):
                out[f"{m}.{dparam}"] = part
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"{len(unknown)} keys of the original-layout file are not part of a FLUX.1 transformer "
                         f"of this config (e.g. {unknown[:3]})")
    return out


def is_original_flux(keys) -> bool:
    """Whether safetensors keys are an original-layout FLUX.1 transformer (bare or under ComfyUI's prefix)."""
    keys = {k.removeprefix(ORIGINAL_PREFIX) for k in keys}
    return "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.0.linear1.weight" in keys

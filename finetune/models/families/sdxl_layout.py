"""diffusers -> original (SGM, "single file") state-dict layout for SDXL pipelines.

SDXL's single file keeps SD's UNet and VAE layouts (`model.diffusion_model.`, `first_stage_model.`; the
UNet map in `finetune.models.ldm_layout` is derived from the config, so SDXL's 3 levels and per-level transformer depth
come out right) and adds:
- `label_emb.0.0` / `label_emb.0.2`: the MLP diffusers calls `add_embedding` (pooled text + sizes);
- `conditioner.embedders.0.transformer.`: CLIP-L in transformers' own layout (`text_model.*`);
- `conditioner.embedders.1.model.`: OpenCLIP-bigG in open_clip's layout: one fused `in_proj` for
  q/k/v, `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, `positional_embedding` and `text_projection` as bare
  tensors, the projection stored as [hidden, projection] (open_clip computes `x @ text_projection`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from finetune.models.ldm_layout import (
    TEXT_PREFIX,
    UNET_PREFIX,
    rename_keys,
    text_encoder_to_ldm,
    unet_modules,
    vae_to_ldm,
)

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

ADD_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# open_clip's residual block vs transformers' CLIPEncoderLayer (q/k/v are fused separately).
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def sdxl_unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """The SDXL UNet under `model.diffusion_model.`, add-embedding as `label_emb`; the same tensors."""
    if unet_config.get("addition_embed_type") != "text_time":
        raise ValueError(f"addition_embed_type is {unet_config.get('addition_embed_type')!r}, not SDXL's 'text_time': "
                         "this UNet is not an SDXL one")
    modules = {**unet_modules(unet_config), **ADD_EMBEDDING}
    names = rename_keys(unet_state_dict, modules, UNET_PREFIX, "UNet")
    return {names[k]: v for k, v in unet_state_dict.items()}


def clip_l_to_ldm(te_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's first text encoder under `conditioner.embedders.0.transformer.text_model.`."""
    return {CLIP_L_PREFIX + k.removeprefix(TEXT_PREFIX): v for k, v in text_encoder_to_ldm(te_state_dict).items()}


def open_clip_to_ldm(te_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (CLIPTextModelWithProjection) in open_clip's layout under
    `conditioner.embedders.1.model.`. The fused q/k/v are new tensors; the rest are the same tensors
    (text_projection a transposed view)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], list] = {}  # (layer, weight|bias) -> [q, k, v]
    unknown = []
    for key, tensor in te_state_dict.items():
        if ".base_layer." in key or ".lora_" in key:
            raise ValueError(f"text encoder 2 state dict holds unmerged LoRA layers ({key!r}): call pipe.fuse_lora() "
                             "and pipe.unload_lora_weights() before converting")
        inner = key.removeprefix("text_model.")  # CLIPTextModelWithProjection nests the encoder there
        if key == "text_projection.weight":
            out[OPEN_CLIP_PREFIX + "text_projection"] = tensor.T  # Linear's [proj, hidden] -> [hidden, proj]
        elif inner in _OPEN_CLIP_TOP:
            out[OPEN_CLIP_PREFIX + _OPEN_CLIP_TOP[inner]] = tensor
        elif (m := _LAYER_KEY.fullmatch(inner)) and (m[2] in _QKV or m[2] in _OPEN_CLIP_LAYER):
            layer, module, kind = m.groups()
            if module in _QKV:
                qkv.setdefault((layer, kind), [None] * 3)[_QKV[module]] = tensor
            else:
                out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = tensor
        else:
            unknown.append(key)
    incomplete = [f"layer {layer} {kind}" for (layer, kind), parts in qkv.items() if any(p is None for p in parts)]
    if unknown or incomplete:
        raise ValueError(f"the second text encoder's state dict does not fit open_clip's layout: unknown keys "
                         f"{unknown[:3]}, layers without all of q/k/v {incomplete[:3]}")
    for (layer, kind), parts in sorted(qkv.items()):
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
    if OPEN_CLIP_PREFIX + "text_projection" not in out:
        raise ValueError("the second text encoder has no text_projection: SDXL needs a CLIPTextModelWithProjection")
    return out


def sdxl_pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """The whole SDXL base pipeline in the single-file layout (views of the live weights, except the
    fused q/k/v of the second text encoder)."""
    if pipe.text_encoder is None:
        raise ValueError("this SDXL pipeline has no first text encoder (a refiner?): only SDXL base models "
                         "are written as single files")
    return {**sdxl_unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
            **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
            **clip_l_to_ldm(pipe.text_encoder.state_dict()),
            **open_clip_to_ldm(pipe.text_encoder_2.state_dict())}

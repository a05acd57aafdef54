"""FLUX.1 LoRAs in the kohya/ComfyUI layout: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`.

kohya sd-scripts trains Flux on the original (BFL) model, so its LoRA names are the original layout's
modules (`flux_layout.module_groups`), dots turned to underscores, behind `lora_unet_`; CLIP-L is
`lora_te1_text_model_encoder_layers_…`. Where the original layout fuses Linears (a double block's
`img_attn.qkv` / `txt_attn.qkv`, a single block's `linear1` = q, k, v and the MLP input), the LoRA
is one LoRA on the fused Linear: ComfyUI adds `up @ down` to the fused weight as it is.

Fusing LoRAs on diffusers' separate q, k, v (ranks r_i, alphas a_i) into one of rank R = sum r_i:
`down` stacks the downs, `up` is block-diagonal (block i maps only to module i's rows), and alpha is
chosen so that alpha / R = a_i / r_i: the real alpha, not alpha = rank. Where the modules' scales
differ, each block of `up` carries its own ratio. A module of a group without a LoRA gets zero rows.
Reading one back splits it the same way (diffusers' converter does the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from finetune.lora_io import LoraLayer
from finetune.models.families import flux_layout

PREFIX = "lora_unet_"
CLIP_PREFIX = "lora_te1_"
TRANSFORMER = "transformer"


def _name(original_module: str) -> str:
    return PREFIX + original_module.replace(".", "_")


def _bare(original_module: str) -> str:
    """The kohya name without its `lora_unet_` prefix, as lora_io holds kohya-named layers."""
    return original_module.replace(".", "_")


def _groups_by_module(config: Mapping) -> dict[str, tuple[str, tuple[str, ...]]]:
    """diffusers module -> (original module, the diffusers modules fused there)."""
    return {m: (o, mods) for o, mods in flux_layout.module_groups(config).items() for m in mods}


def kohya_names(modules: Iterable[str], config: Mapping) -> dict[str, str]:
    """diffusers transformer module -> its kohya LoRA name (q, k and v of a block share one).
    Raises ValueError for a module the original layout does not have as a Linear."""
    groups = _groups_by_module(config)
    out = {}
    for m in modules:
        if m not in groups or groups[m][0].endswith(("query_norm", "key_norm")):
            raise ValueError(f"transformer module {m!r} has no kohya LoRA name: it is not a Linear of the "
                             "original FLUX.1 layout")
        out[m] = _name(groups[m][0])
    return out


def fuse(layers: Iterable[LoraLayer], config: Mapping) -> list[LoraLayer]:
    """Transformer LoRA layers (diffusers modules) -> one layer per original-layout module, named by its
    kohya name without the `lora_unet_` prefix (`kohya_name=True`), fused where the original layout fuses."""
    groups = _groups_by_module(config)
    by_module = {}
    for layer in layers:
        kohya_names([layer.module], config)  # refuses what has no name
        by_module[layer.module] = layer
    sizes = flux_layout.split_sizes(config)
    out, done = [], set()
    for layer in by_module.values():
        original, members = groups[layer.module]
        if original in done:
            continue
        done.add(original)
        present = [by_module[m] for m in members if m in by_module]
        if len(members) == 1:
            if original.startswith("final_layer."):
                # diffusers' converter reads the final layer's LoRA without its alpha: keep the update
                # the same for every reader by putting alpha / rank into `up` and alpha = rank
                out.append(LoraLayer(TRANSFORMER, _bare(original), layer.down, layer.up * layer.scale,
                                     float(layer.rank), kohya_name=True))
            else:
                out.append(LoraLayer(TRANSFORMER, _bare(original), layer.down, layer.up, layer.alpha, kohya_name=True))
            continue
        rank = sum(p.rank for p in present)
        # alpha / R equal to the first module's scale; other scales ride in their block of `up`
        alpha = present[0].scale * rank
        rows = [sizes[m.rsplit(".", 1)[-1]] for m in members]
        dtype = present[0].up.dtype
        up = torch.zeros(sum(rows), rank, dtype=dtype)
        downs, col, row = [], 0, 0
        for m, n in zip(members, rows):
            if m in by_module:
                p = by_module[m]
                up[row:row + n, col:col + p.rank] = p.up * (p.scale * rank / alpha)
                downs.append(p.down)
                col += p.rank
            row += n
        out.append(LoraLayer(TRANSFORMER, _bare(original), torch.cat(downs, 0), up, alpha, kohya_name=True))
    return out


def _split(layer: LoraLayer, members: tuple[str, ...], config: Mapping) -> list[LoraLayer]:
    """One fused layer -> one per member module, exact. Block-diagonal `up` with equal ranks (what
    `fuse` writes for equal ranks) splits into rank R/k LoRAs; anything else keeps the whole `down`."""
    sizes = flux_layout.split_sizes(config)
    rows = [sizes[m.rsplit(".", 1)[-1]] for m in members]
    if layer.up.shape[0] != sum(rows):
        raise ValueError(f"{layer.module}: lora_up has {layer.up.shape[0]} rows, the model fuses {sum(rows)} there "
                         "(a LoRA for a FLUX.1 transformer of another width)")
    ups = torch.split(layer.up, rows, dim=0)
    k, rank = len(members), layer.rank
    if rank % k == 0:
        r = rank // k
        blocks = [u[:, i * r:(i + 1) * r] for i, u in enumerate(ups)]
        off = [torch.cat([u[:, :i * r], u[:, (i + 1) * r:]], 1) for i, u in enumerate(ups)]
        if all(not o.any() for o in off):
            # each module's own rank-r LoRA, with the same scale alpha / R = (alpha / k) / r
            return [LoraLayer(TRANSFORMER, m, d, b.contiguous(), layer.alpha / k)
                    for m, d, b in zip(members, layer.down.chunk(k, 0), blocks) if b.any()]
    return [LoraLayer(TRANSFORMER, m, layer.down, u.contiguous(), layer.alpha) for m, u in zip(members, ups)]


def unfuse(layers: Iterable[LoraLayer], config: Mapping) -> list[LoraLayer]:
    """kohya-named transformer layers (module = the name without `lora_unet_`, as lora_io reads it,
    or with it) -> layers on diffusers modules; an unknown name is an error naming it."""
    by_name = {_name(o): (o, mods) for o, mods in flux_layout.module_groups(config).items()}
    out, unknown = [], []
    for layer in layers:
        name = layer.module if layer.module.startswith(PREFIX) else PREFIX + layer.module
        if name not in by_name:
            unknown.append(name)
            continue
        original, members = by_name[name]
        if len(members) == 1:
            out.append(LoraLayer(TRANSFORMER, members[0], layer.down, layer.up, layer.alpha))
        else:
            out.extend(_split(layer, members, config))
    if unknown:
        raise ValueError(f"{len(unknown)} kohya LoRA names are not modules of this FLUX.1 transformer "
                         f"(e.g. {unknown[:3]})")
    return out


def state_dict(layers: Iterable[LoraLayer]) -> dict[str, torch.Tensor]:
    """kohya-named layers -> the tensors of a kohya file (down, up and the real alpha per module)."""
    out = {}
    for layer in layers:
        name = layer.module if layer.module.startswith(("lora_unet_", "lora_te")) else PREFIX + layer.module
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out


def is_flux_kohya(keys: Iterable[str]) -> bool:
    """Whether LoRA keys name FLUX.1 original-layout modules (kohya, ComfyUI, ai-toolkit's kohya export)."""
    return any(k.startswith((PREFIX + "double_blocks_", PREFIX + "single_blocks_")) for k in keys)

"""kohya-layout LoRA module names (`lora_unet_…`, `lora_te…_…`), as AUTOMATIC1111, Forge and ComfyUI read them.

A kohya LoRA file stores, per adapted module, `<name>.lora_down.weight`, `<name>.lora_up.weight` and
`<name>.alpha`; `<name>` is the module's path in the model kohya trained, dots turned to underscores,
behind a prefix naming the model part. Which model that was differs by architecture:
- SD 1.x/2.x: kohya trains diffusers' UNet, so the UNet names are diffusers' own
  (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), the text encoder `lora_te_`.
- SDXL: kohya trains its copy of the original (SGM) UNet, so the names are the single-file layout's
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; ComfyUI builds its lookup the same way
  from the original weight keys); the text encoders are `lora_te1_` (CLIP-L) and `lora_te2_` (bigG).
Text-encoder names always carry transformers' `text_model.` level, which transformers >= 5.6 dropped
from CLIPTextModel's module paths; loaders apply text-encoder LoRA only to the attention projections
and the MLP of each encoder layer, so other modules are refused rather than silently ignored there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_TE_PREFIXES = {("sd1", "text_encoder"): "lora_te", ("sd2", "text_encoder"): "lora_te",
                ("sdxl", "text_encoder"): "lora_te1", ("sdxl", "text_encoder_2"): "lora_te2"}
_TE_MODULE = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))")


def _underscored(prefix: str, name: str) -> str:
    return f"{prefix}_{name.replace('.', '_')}"


def sdxl_unet_module_to_ldm(modules: Iterable[str], unet_config: Mapping) -> dict[str, str]:
    """diffusers SDXL UNet module path -> the original (single-file) module path, e.g.
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`
    -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
    from finetune.models.ldm_layout import _rename, _unet_modules
    from finetune.models.ldm_layout_sdxl import _ADD_EMBEDDING

    table = {**_unet_modules(unet_config), **_ADD_EMBEDDING}
    modules = list(modules)
    # The layout maps parameter keys by their longest mapped module; a module is such a key minus the
    # parameter name, so give it one and take it off again.
    renamed = _rename([f"{m}.weight" for m in modules], table, "", "UNet")
    return {m: renamed[f"{m}.weight"].removesuffix(".weight") for m in modules}


def kohya_lora_names(component: str, modules: Iterable[str], arch: str,
                     unet_config: Mapping | None = None) -> dict[str, str]:
    """diffusers module path -> kohya LoRA name (the part before `.lora_down.weight` / `.alpha`).

    `component` is the pipeline attribute the modules belong to (unet | text_encoder | text_encoder_2),
    `arch` sd1 | sd2 | sdxl; an SDXL UNet needs its config (the original names depend on the topology).
    """
    modules = list(modules)
    if component == "unet":
        if arch != "sdxl":
            return {m: _underscored("lora_unet", m) for m in modules}
        if unet_config is None:
            raise ValueError("kohya names for an SDXL UNet need the UNet's config (pipe.unet.config)")
        return {m: _underscored("lora_unet", ldm) for m, ldm in sdxl_unet_module_to_ldm(modules, unet_config).items()}
    prefix = _TE_PREFIXES.get((arch, component))
    if prefix is None:
        raise ValueError(f"no kohya LoRA prefix for {component!r} of an {arch!r} model "
                         f"(known: {sorted(f'{a}/{c}' for a, c in _TE_PREFIXES)}, and unet)")
    names = {}
    for m in modules:
        match = _TE_MODULE.fullmatch(m)
        if match is None:
            raise ValueError(f"{component} module {m!r} has no kohya LoRA name that A1111/ComfyUI apply: text-encoder "
                             "LoRA there covers only encoder layers' self_attn.{q,k,v,out}_proj and mlp.fc1/fc2")
        names[m] = _underscored(prefix, f"text_model.{match[1]}")
    return names


def kohya_lora_name(component: str, module: str, arch: str, unet_config: Mapping | None = None) -> str:
    """One module's kohya LoRA name (see `kohya_lora_names`; prefer that for many modules of an SDXL UNet)."""
    return kohya_lora_names(component, [module], arch, unet_config)[module]

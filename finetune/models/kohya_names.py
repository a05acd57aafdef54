"""kohya-layout LoRA module names (`lora_unet_…`, `lora_te…_…`), as AUTOMATIC1111, Forge and ComfyUI read them.

A kohya LoRA file stores, per adapted module, `<name>.lora_down.weight`, `<name>.lora_up.weight` and
`<name>.alpha`; `<name>` is the module's path in the model kohya trained, dots turned to underscores,
behind a prefix naming the model part. Which model that was differs by architecture, so each family
names its own modules (`Family.kohya_names`, e.g. SD 1.x: diffusers' UNet paths; SDXL: the original
layout's); the helpers they share are here.
Text-encoder names always carry transformers' `text_model.` level, which transformers >= 5.6 dropped
from CLIPTextModel's module paths; loaders apply text-encoder LoRA only to the attention projections
and the MLP of each encoder layer, so other modules are refused rather than silently ignored there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_TE_MODULE = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))")


def underscored(prefix: str, name: str) -> str:
    return f"{prefix}_{name.replace('.', '_')}"


def text_encoder_names(prefix: str, component: str, modules: Iterable[str]) -> dict[str, str]:
    """CLIP text-encoder module path -> kohya name under `prefix` (lora_te, lora_te1, ...)."""
    names = {}
    for m in modules:
        match = _TE_MODULE.fullmatch(m)
        if match is None:
            raise ValueError(f"{component} module {m!r} has no kohya LoRA name that A1111/ComfyUI apply: text-encoder "
                             "LoRA there covers only encoder layers' self_attn.{q,k,v,out}_proj and mlp.fc1/fc2")
        names[m] = underscored(prefix, f"text_model.{match[1]}")
    return names


def kohya_lora_names(component: str, modules: Iterable[str], arch: str,
                     unet_config: Mapping | None = None) -> dict[str, str]:
    """diffusers module path -> kohya LoRA name (the part before `.lora_down.weight` / `.alpha`).

    `component` is the pipeline attribute the modules belong to (unet | text_encoder | ...), `arch` the
    base's (see finetune.models.families); some families need the denoiser's config (the original
    names depend on the topology).
    """
    from finetune.models import families

    return families.for_arch(arch).kohya_names(component, list(modules), unet_config)


def kohya_lora_name(component: str, module: str, arch: str, unet_config: Mapping | None = None) -> str:
    """One module's kohya LoRA name (see `kohya_lora_names`; prefer that for many modules)."""
    return kohya_lora_names(component, [module], arch, unet_config)[module]

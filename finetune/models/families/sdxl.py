"""The SDXL family: a UNet on two text encoders (CLIP-L and OpenCLIP-bigG, penultimate hidden states side
by side), conditioned also on the second encoder's pooled projection and six micro-conditioning
numbers (original size, crop top-left, target size) per image; DDPM noise as SD; a VAE that stays fp32
(it overflows in fp16). kohya names its UNet LoRA modules after the original (SGM) layout, and the
single file stores the second encoder in open_clip's layout (`sdxl_layout`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from finetune.models import kohya_names
from finetune.models.families import DENOISER, SGM, TEXT_ENCODER, VAE, Component, Family, Variant, sd1

PIPELINE = "StableDiffusionXLPipeline"
# SD 1.x/2.x have one transformer block per attention; SDXL's deeper levels have several, and an
# add_embedding (label_emb in the original layout) for its size conditioning.
_SDXL_MODULE = re.compile(r"(?:^|[._])(?:transformer_blocks[._][1-9]|add_embedding|label_emb)")


# ---------------------------------------------------------------- detection
def detect_folder(folder: Path, index: Mapping) -> str | None:
    cls = index.get("_class_name", "")
    return "sdxl" if cls.startswith("StableDiffusion") and "XL" in cls else None


def detect_single_file(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    # CLIP-L plus OpenCLIP-bigG as embedders 0 and 1
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in shapes) else None


def detect_lora(layers: list, metadata: Mapping[str, str]) -> str | None:
    from finetune.lora_io import cross_attention_width

    if any(l.component == "text_encoder_2" for l in layers) or cross_attention_width(layers) == 2048:
        return "sdxl"
    return "sdxl" if any(l.component == "unet" and _SDXL_MODULE.search(l.module) for l in layers) else None


def single_file_config(shapes: Mapping[str, tuple[int, ...]]) -> Path | None:
    from finetune.models.families import sdxl_tiny

    return sdxl_tiny.tiny_sdxl_base_dir() if sdxl_tiny.is_tiny_sdxl(shapes) else None


# ---------------------------------------------------------------- conditioning and objective
def encode_text(components: Mapping, captions: list[str]) -> dict:
    """SDXL's conditioning, as `StableDiffusionXLPipeline.encode_prompt` builds it: both encoders'
    penultimate hidden states side by side (B, 77, D1 + D2), and the second encoder's pooled
    projection (B, P) (`text_embeds`)."""
    import torch

    hidden = []
    for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        encoder = components[name]
        out = encoder(sd1.tokenize(components[tok], captions).to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return {"hidden": torch.cat(hidden, dim=-1), "pooled": out.text_embeds}


def example_conditioning(examples: list) -> dict:
    """The micro-conditioning `time_ids` (B, 6) of a batch, from what `prepare` recorded
    (see finetune.train.data.micro_conditioning)."""
    import torch

    from finetune.train.data import micro_conditioning

    return {"time_ids": torch.tensor([micro_conditioning(ex) for ex in examples], dtype=torch.float32)}


def predict(scheduler, unet, noisy, timesteps, cond: Mapping):
    hidden = cond["hidden"]
    added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"].to(hidden.device, hidden.dtype)}
    return unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample


# ---------------------------------------------------------------- names and layouts
def kohya_lora_names(component: str, modules: list[str], unet_config: Mapping | None = None) -> dict[str, str]:
    """kohya trains its copy of the original (SGM) UNet, so the UNet names are the single-file layout's
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; ComfyUI builds its lookup the same
    way); the text encoders are `lora_te1_` (CLIP-L) and `lora_te2_` (bigG)."""
    if component == "unet":
        if unet_config is None:
            raise ValueError("kohya names for an SDXL UNet need the UNet's config (pipe.unet.config)")
        return {m: kohya_names.underscored("lora_unet", ldm) for m, ldm in unet_module_names(modules, unet_config).items()}
    prefix = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}.get(component)
    if prefix is None:
        raise ValueError(f"no kohya LoRA prefix for {component!r} of an SDXL model "
                         "(known: unet, text_encoder, text_encoder_2)")
    return kohya_names.text_encoder_names(prefix, component, modules)


def unet_module_names(modules: list[str], unet_config: Mapping) -> dict[str, str]:
    """diffusers SDXL UNet module path -> the original (single-file) module path."""
    from finetune.models import ldm_layout
    from finetune.models.families.sdxl_layout import ADD_EMBEDDING

    return ldm_layout.unet_module_names(modules, unet_config, ADD_EMBEDDING)


def ldm_aliases(unet, modules: list[str]) -> dict[str, str]:
    from finetune.models import ldm_layout
    from finetune.models.families.sdxl_layout import ADD_EMBEDDING

    return ldm_layout.unet_aliases(modules, unet.config, ADD_EMBEDDING)


def to_single_file(pipe) -> dict:
    from finetune.models.families.sdxl_layout import sdxl_pipeline_to_ldm

    return sdxl_pipeline_to_ldm(pipe)


def sampling_kwargs(pipe) -> dict:
    # keep its empty-prompt setting; our provenance marks images, not SDXL's watermark
    return {"force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True),
            "add_watermarker": False}


def _tiny_dir() -> Path:
    from finetune.models.families.sdxl_tiny import tiny_sdxl_base_dir

    return tiny_sdxl_base_dir()


FAMILY = Family(
    name="sdxl",
    variants=(Variant(arch="sdxl", title="SDXL", resolution=1024, resolution_text="1024", kohya_version="sdxl_base_v1-0",
                      modelspec="stable-diffusion-xl-v1-base", declared_as=("sdxl", "stable-diffusion-xl-"),
                      hub_tag="stable-diffusion-xl", kohya_extra={"ss_v2": "False"}),),
    pipeline_class=PIPELINE,
    components=(
        Component("unet", DENOISER, kohya_prefix="lora_unet"),
        Component("text_encoder", TEXT_ENCODER, tokenizer="tokenizer", kohya_prefix="lora_te1"),
        Component("text_encoder_2", TEXT_ENCODER, tokenizer="tokenizer_2", kohya_prefix="lora_te2"),
        Component("vae", VAE, keep_fp32=True),
    ),
    pipeline_kwargs={},
    tiny={"tiny-sdxl": _tiny_dir},
    detect_folder=detect_folder,
    detect_single_file=detect_single_file,
    detect_lora=detect_lora,
    single_file_config=single_file_config,
    load_file=sd1.diffusers_loads_files,
    encode_text=encode_text,
    example_conditioning=example_conditioning,
    training_scheduler=sd1.ddpm_scheduler,
    sample_timesteps=sd1.sample_timesteps,
    spread_timesteps=sd1.spread_timesteps,
    add_noise=sd1.add_noise,
    predict=predict,
    target=sd1.target,
    loss_weights=sd1.loss_weights,
    set_attention=sd1.set_attention,
    lora_targets=sd1.LORA_TARGETS,
    text_encoder_lora_targets=sd1.TEXT_ENCODER_LORA_TARGETS,
    kohya_names=kohya_lora_names,
    kohya_needs_config=True,
    kohya_aliases=ldm_aliases,
    kohya_fuse=sd1.kohya_as_is,
    kohya_unfuse=sd1.kohya_as_is,
    lora_implementation=SGM,
    to_single_file=to_single_file,
    sampling_kwargs=sampling_kwargs,
)

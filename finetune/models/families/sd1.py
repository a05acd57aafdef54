"""The SD 1.x / 2.x family: a UNet on one CLIP text encoder's last hidden states, DDPM noise, epsilon or
v-prediction (as the base's scheduler says), a 4-channel VAE.

SD 2.x is the same code with other data: OpenCLIP-H (1024 wide) in place of CLIP-L (768), 512 or
768 px, and no writer for its original single file (its text encoder is stored in open_clip's layout).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from finetune.models import kohya_names
from finetune.models.families import DENOISER, TEXT_ENCODER, VAE, Component, Family, Variant

PIPELINE = "StableDiffusionPipeline"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2"}  # CLIP-L, OpenCLIP-H


# ---------------------------------------------------------------- detection
def detect_folder(folder: Path, index: Mapping) -> str | None:
    cls = index.get("_class_name", "")
    if not cls.startswith("StableDiffusion") or "XL" in cls:
        return None
    try:  # 2.x has the same pipeline class as 1.x; its text encoder (OpenCLIP-H) is 1024 wide
        width = json.loads((Path(folder) / "text_encoder" / "config.json").read_text()).get("hidden_size")
    except (OSError, json.JSONDecodeError):
        width = None
    return "sd2" if width == 1024 else "sd1"


def detect_single_file(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"  # OpenCLIP-H stored in open_clip's own layout
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"  # transformers' CLIPTextModel (CLIP-L)
    return None


def detect_lora(layers: list, metadata: Mapping[str, str]) -> str | None:
    from finetune.lora_io import cross_attention_width

    if any(l.component == "text_encoder_2" for l in layers):
        return None
    return CROSS_ATTENTION_WIDTH.get(cross_attention_width(layers))


def diffusers_loads_files(path: Path, config: str, dtype, quantization_config=None) -> None:
    """SD single files load through diffusers' `from_single_file`."""
    return None


def single_file_config(shapes: Mapping[str, tuple[int, ...]]) -> Path | None:
    """The tiny base's folder for its own single file (told by its first conv's width)."""
    from finetune.models import tiny

    first = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if detect_single_file(shapes) == "sd1" and first and first[0] == tiny.UNET_CONFIG["block_out_channels"][0]:
        return tiny.tiny_base_dir()
    return None


# ---------------------------------------------------------------- conditioning and objective
def tokenize(tokenizer, captions: list[str]):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(components: Mapping, captions: list[str]) -> dict:
    """CLIP's last hidden states (B, 77, D), as SD 1.x/2.x condition on them."""
    encoder = components["text_encoder"]
    return {"hidden": encoder(tokenize(components["tokenizer"], captions).to(encoder.device))[0]}


def no_example_conditioning(examples: list) -> dict:
    return {}


def ddpm_scheduler(pipe, flow=None):
    """DDPM's noise schedule from the base's scheduler config; `flow` (config.FlowConfig) is for
    flow-matching bases, and a setting other than its defaults is refused rather than ignored."""
    from diffusers import DDPMScheduler

    if flow is not None:
        from dataclasses import fields

        from finetune.errors import FinetuneError

        changed = [f"flow.{f.name}" for f in fields(flow) if getattr(flow, f.name) != f.default]
        if changed:
            raise FinetuneError(f"{', '.join(changed)} set, but this base trains with DDPM noise, not flow matching: "
                                "remove the [flow] settings (they are for FLUX.1 bases)")

    return DDPMScheduler.from_config(pipe.scheduler.config)


def sample_timesteps(scheduler, n: int, device):
    import torch

    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=device)


def spread_timesteps(scheduler, count: int):
    """The middle of each of `count` equal bands of the schedule."""
    import torch

    return ((torch.arange(count) + 0.5) * scheduler.config.num_train_timesteps / count).long()


def add_noise(scheduler, latents, noise, timesteps):
    return scheduler.add_noise(latents, noise, timesteps)


def predict(scheduler, unet, noisy, timesteps, cond: Mapping):
    return unet(noisy, timesteps, cond["hidden"]).sample


def target(scheduler, latents, noise, timesteps):
    from finetune.train.losses import target_for

    return target_for(scheduler, latents, noise, timesteps)


def loss_weights(scheduler, timesteps, gamma: float):
    from finetune.train.losses import min_snr_weights

    return min_snr_weights(scheduler, timesteps, gamma)


def set_attention(unet, xformers: bool) -> None:
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


# ---------------------------------------------------------------- names and layouts
def kohya_lora_names(component: str, modules: list[str], unet_config: Mapping | None = None) -> dict[str, str]:
    """kohya trains diffusers' UNet for SD 1.x/2.x, so its UNet names are diffusers' own."""
    if component == "unet":
        return {m: kohya_names.underscored("lora_unet", m) for m in modules}
    if component == "text_encoder":
        return kohya_names.text_encoder_names("lora_te", component, modules)
    raise ValueError(f"no kohya LoRA prefix for {component!r} of an SD 1.x/2.x model (known: unet, text_encoder)")


def ldm_aliases(unet, modules: list[str]) -> dict[str, str]:
    """Some SD 1.x converters name UNet modules as the original layout does (`input_blocks_1_1_...`)."""
    from finetune.models import ldm_layout

    return ldm_layout.unet_aliases(modules, unet.config)


def kohya_as_is(layers: list, config: Mapping | None = None) -> list:
    """kohya names SD modules one to one: nothing to fuse or split."""
    return list(layers)


def to_single_file(pipe) -> dict:
    from finetune.models import ldm_layout

    return {**ldm_layout.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
            **ldm_layout.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
            **ldm_layout.text_encoder_to_ldm(pipe.text_encoder.state_dict())}


def sampling_kwargs(pipe) -> dict:
    return {"requires_safety_checker": False} if "safety_checker" in pipe.components else {}


def _tiny_dir() -> Path:
    from finetune.models.tiny import tiny_base_dir

    return tiny_base_dir()


FAMILY = Family(
    name="sd1",
    variants=(
        Variant(arch="sd1", title="SD 1.x", resolution=512, resolution_text="512", kohya_version="sd_v1",
                modelspec="stable-diffusion-v1", declared_as=("sd_v1", "stable-diffusion-v1"),
                hub_tag="stable-diffusion", kohya_extra={"ss_v2": "False"}),
        Variant(arch="sd2", title="SD 2.x", resolution=512, resolution_text="512 or 768", kohya_version="sd_v2",
                modelspec="stable-diffusion-v2-512", declared_as=("sd_v2", "stable-diffusion-v2"),
                hub_tag="stable-diffusion", single_file=False, kohya_extra={"ss_v2": "True"}),
    ),
    pipeline_class=PIPELINE,
    components=(
        Component("unet", DENOISER, kohya_prefix="lora_unet"),
        Component("text_encoder", TEXT_ENCODER, tokenizer="tokenizer", kohya_prefix="lora_te"),
        Component("vae", VAE),
    ),
    pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},
    tiny={"tiny": _tiny_dir},
    detect_folder=detect_folder,
    detect_single_file=detect_single_file,
    detect_lora=detect_lora,
    single_file_config=single_file_config,
    load_file=diffusers_loads_files,
    encode_text=encode_text,
    example_conditioning=no_example_conditioning,
    training_scheduler=ddpm_scheduler,
    sample_timesteps=sample_timesteps,
    spread_timesteps=spread_timesteps,
    add_noise=add_noise,
    predict=predict,
    target=target,
    loss_weights=loss_weights,
    set_attention=set_attention,
    lora_targets=LORA_TARGETS,
    text_encoder_lora_targets=TEXT_ENCODER_LORA_TARGETS,
    kohya_names=kohya_lora_names,
    kohya_needs_config=False,
    kohya_aliases=ldm_aliases,
    kohya_fuse=kohya_as_is,
    kohya_unfuse=kohya_as_is,
    lora_implementation="diffusers",
    to_single_file=to_single_file,
    sampling_kwargs=sampling_kwargs,
)

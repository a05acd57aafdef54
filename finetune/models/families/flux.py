"""The FLUX.1 family (dev and schnell): a rectified-flow transformer of double- and single-stream blocks
on packed 2x2 latent patches, conditioned on T5-XXL's hidden states (the text tokens) and CLIP-L's
pooled output (the modulation), with the distilled guidance scale as an input on dev; a 16-channel VAE
with a latent shift. The objective is flow matching (`flux_flow`); the original (BFL) layout fuses
q/k/v (`flux_layout`), so kohya LoRA files fuse them too (`flux_kohya`). ComfyUI users have FLUX.1 as
split files: a base spec names them (`flux_files`). The embedded tiny bases are in `flux_tiny`.

Only CLIP-L may carry a LoRA among the text encoders (as kohya and ComfyUI apply them); T5-XXL is
encoded once into the cache and released.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from finetune.models.families import DENOISER, TEXT_ENCODER, VAE, Component, Family, Variant

PIPELINE = "FluxPipeline"
BFL = "https://github.com/black-forest-labs/flux"
"""modelspec.implementation of weights and LoRAs in the original (Black Forest Labs) layout."""
DEV, SCHNELL = "flux1-dev", "flux1-schnell"
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length (the most T5 tokens FLUX.1 was trained on)
# Attention and MLP of both kinds of blocks (a single block's proj_out is its attention and MLP output).
# peft matches these as name suffixes, so `proj_out` would also adapt the final layer: LORA_EXCLUDE.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp", "proj_out")
LORA_EXCLUDE = ("proj_out",)
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ORIGINAL_PREFIX = "model.diffusion_model."
# diffusers/peft and ai-toolkit: diffusers' names; kohya: original names underscored; ComfyUI's saver:
# original names under diffusion_model.
_LORA_MODULE = re.compile(r"^(?:single_transformer_blocks|transformer_blocks)\.\d+\.")
_ORIGINAL_LORA_MODULE = re.compile(r"^(?:diffusion_model\.)?(?:double|single)_blocks[._]\d+[._]")


# ---------------------------------------------------------------- detection (no torch)
def _variant(guidance: bool) -> str:
    return DEV if guidance else SCHNELL


def detect_folder(folder: Path, index: Mapping) -> str | None:
    if index.get("_class_name") != PIPELINE:
        return None
    try:
        config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    return _variant(bool(config.get("guidance_embeds")))


def _bare(shapes: Mapping) -> dict:
    return {k.removeprefix(_ORIGINAL_PREFIX): v for k, v in shapes.items()}


def detect_single_file(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """An original-layout FLUX.1 transformer (flux1-dev.safetensors, or a full checkpoint with it under
    model.diffusion_model.); dev has the guidance embedding."""
    bare = _bare(shapes)
    if "double_blocks.0.img_attn.qkv.weight" not in bare or "single_blocks.0.linear1.weight" not in bare:
        return None
    return _variant("guidance_in.in_layer.weight" in bare)


def detect_lora(layers: list, metadata: Mapping[str, str]) -> str | None:
    """Flux LoRAs as diffusers/peft and ai-toolkit save them (transformer.transformer_blocks.N...,
    transformer.single_transformer_blocks.N...) or as kohya/ComfyUI do (lora_unet_double_blocks_N_...,
    lora_unet_single_blocks_N_...). Dev and schnell LoRAs look alike: dev unless the header says schnell."""
    ours = [layer for layer in layers if layer.component == "transformer" and _LORA_MODULE.match(layer.module)]
    # kohya's lora_unet_ and bare keys read as the "unet" component
    original = [layer for layer in layers if layer.component == "unet" and _ORIGINAL_LORA_MODULE.match(layer.module)]
    if not ours and not original:
        return None
    declared = metadata.get("modelspec.architecture", "")
    return SCHNELL if "schnell" in declared else DEV


def single_file_config(shapes: Mapping[str, tuple[int, ...]]) -> Path | None:
    """The tiny bases' own folders for their original-layout files (told by the input width)."""
    from finetune.models.families import flux_tiny

    return flux_tiny.config_for(shapes) if detect_single_file(shapes) else None


def load_file(path: Path, config: str, dtype, quantization_config=None):
    """A base spec .toml (ComfyUI's split files) or an original-layout transformer file; the transformer
    quantized with `quantization_config` (diffusers' BitsAndBytesConfig) when given."""
    from finetune.models.families import flux_files

    return flux_files.load_base_file(path, config, dtype, quantization_config)


# ---------------------------------------------------------------- conditioning
def encode_text(components: Mapping, captions: list[str]) -> dict:
    """FLUX.1's conditioning, as `FluxPipeline.encode_prompt` builds it: T5's last hidden states
    (B, S, 4096) as the text tokens and CLIP-L's pooled output (B, 768) for the modulation."""
    clip, t5 = components["text_encoder"], components["text_encoder_2"]
    tok = components["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
    tok2 = components["tokenizer_2"]
    length = min(tok2.model_max_length, T5_MAX_LENGTH)
    ids2 = tok2(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    hidden = t5(ids2.to(t5.device), output_hidden_states=False)[0]
    return {"hidden": hidden, "pooled": pooled}


def no_example_conditioning(examples: list) -> dict:
    return {}


# ---------------------------------------------------------------- the training objective
@dataclass(frozen=True)
class Objective:
    """What the flow-matching functions below need: how noise levels are drawn, and the training
    guidance (FLUX.1-dev embeds it; None for schnell)."""

    sampling: object
    """flux_flow.FlowSampling"""
    guidance: float | None


def objective(pipe, flow=None) -> Objective:
    """The run's `flow` settings (config.FlowConfig; None: its defaults, FLUX.1's own sampling): the timestep
    sampler, with flux_shift's resolution-dependent shift read from the base's scheduler config, and on
    dev the training guidance (default 1, kohya's and ai-toolkit's); schnell embeds no guidance."""
    from finetune.config import FlowConfig
    from finetune.models.families.flux_flow import FlowSampling

    flow = flow or FlowConfig()
    cfg = pipe.scheduler.config
    sampling = FlowSampling(sampler=flow.timestep_sampler, sigmoid_mean=flow.sigmoid_mean,
                            sigmoid_scale=flow.sigmoid_scale, shift=flow.shift,
                            base_shift=cfg.get("base_shift", 0.5), max_shift=cfg.get("max_shift", 1.15),
                            base_seq_len=cfg.get("base_image_seq_len", 256),
                            max_seq_len=cfg.get("max_image_seq_len", 4096))
    return Objective(sampling, float(flow.guidance) if pipe.transformer.config.guidance_embeds else None)


def sample_timesteps(obj: Objective, n: int, device):
    """Uniform draws; `add_noise`, `predict` and `target` turn them into noise levels for the latents' size."""
    from finetune.models.families import flux_flow

    return flux_flow.draw_uniform(n, device)


def spread_timesteps(obj: Objective, count: int):
    import torch

    return (torch.arange(count) + 0.5) / count


def _sigmas(obj: Objective, latents, u):
    from finetune.models.families import flux_flow

    return flux_flow.sigmas(u.to(latents.device, dtype=latents.dtype if latents.is_floating_point() else None),
                            flux_flow.seq_len(latents), obj.sampling)


def add_noise(obj: Objective, latents, noise, u):
    from finetune.models.families import flux_flow

    return flux_flow.noisy(latents, noise, _sigmas(obj, latents, u.float()))


def predict(obj: Objective, transformer, noisy, u, cond: Mapping):
    from finetune.models.families import flux_flow

    return flux_flow.predict(transformer, noisy, _sigmas(obj, noisy, u.float()), cond["hidden"], cond["pooled"],
                             obj.guidance)


def target(obj: Objective, latents, noise, u):
    from finetune.models.families import flux_flow

    return flux_flow.velocity(latents, noise)


def loss_weights(obj: Objective, u, gamma: float):
    import torch

    if gamma:
        raise ValueError(f"train.min_snr_gamma = {gamma} weights DDPM noise levels by their SNR; FLUX.1 trains by "
                         "flow matching, where it does not apply: set train.min_snr_gamma = 0")
    return torch.ones(len(u), device=u.device)


def set_attention(transformer, xformers: bool) -> None:
    """diffusers' Flux attention runs on PyTorch SDPA unless another backend is set."""
    if xformers:
        transformer.set_attention_backend("xformers")


# ---------------------------------------------------------------- names and layouts
def kohya_lora_names(component: str, modules: list[str], config: Mapping | None = None) -> dict[str, str]:
    """kohya trains the original (BFL) model: its names are that layout's, where q, k and v of a block
    share one fused name (`flux_kohya.fuse` fuses the LoRAs); CLIP-L is lora_te1."""
    from finetune.models import kohya_names

    if component == "transformer":
        if config is None:
            raise ValueError("kohya names for a FLUX.1 transformer need its config (pipe.transformer.config)")
        from finetune.models.families import flux_kohya

        return flux_kohya.kohya_names(modules, config)
    if component == "text_encoder":
        return kohya_names.text_encoder_names("lora_te1", component, modules)
    raise ValueError(f"no kohya LoRA prefix for {component!r} of a FLUX.1 model (known: transformer, text_encoder; "
                     "kohya and ComfyUI apply no T5 LoRA)")


def kohya_fuse(layers: list, config: Mapping | None) -> list:
    from finetune.models.families import flux_kohya

    if config is None:
        raise ValueError("kohya names for a FLUX.1 transformer need its config (pipe.transformer.config)")
    return flux_kohya.fuse(layers, config)


def kohya_unfuse(layers: list, config: Mapping | None) -> list:
    from finetune.models.families import flux_kohya

    if config is None:
        raise ValueError("reading a kohya FLUX.1 LoRA onto modules needs the transformer's config")
    return flux_kohya.unfuse(layers, config)


def original_aliases(transformer, modules: list[str]) -> dict[str, str]:
    """Original-layout names of the modules the original layout does not fuse (its qkv and linear1
    are one module for several of ours)."""
    from finetune.models.families import flux_layout

    groups = {mods[0]: o for o, mods in flux_layout.module_groups(transformer.config).items() if len(mods) == 1}
    return {m: groups[m] for m in modules if m in groups}


def to_single_file(pipe) -> dict:
    """The transformer in the original layout: what ComfyUI loads from models/unet (the text encoders
    and the autoencoder stay in their own files)."""
    from finetune.models.families import flux_layout

    return flux_layout.to_original(pipe.transformer.state_dict(), pipe.transformer.config)


def sampling_kwargs(pipe) -> dict:
    return {}


def _tiny(variant: str):
    def build() -> Path:
        from finetune.models.families.flux_tiny import tiny_flux_base_dir

        return tiny_flux_base_dir(variant)

    return build


FAMILY = Family(
    name="flux",
    variants=(
        Variant(arch=DEV, title="FLUX.1-dev", resolution=1024, resolution_text="512 to 1024", kohya_version="flux1",
                modelspec="flux-1-dev", declared_as=("flux1", "flux-1-dev"), hub_tag="flux"),
        Variant(arch=SCHNELL, title="FLUX.1-schnell", resolution=1024, resolution_text="512 to 1024",
                kohya_version="flux1", modelspec="flux-1-schnell", declared_as=("flux-1-schnell",), hub_tag="flux"),
    ),
    pipeline_class=PIPELINE,
    components=(
        Component("transformer", DENOISER, kohya_prefix="lora_unet"),
        Component("text_encoder", TEXT_ENCODER, tokenizer="tokenizer", kohya_prefix="lora_te1"),
        Component("text_encoder_2", TEXT_ENCODER, tokenizer="tokenizer_2", lora=False),
        Component("vae", VAE),
    ),
    pipeline_kwargs={},
    tiny={"tiny-flux": _tiny("dev"), "tiny-flux-schnell": _tiny("schnell")},
    detect_folder=detect_folder,
    detect_single_file=detect_single_file,
    detect_lora=detect_lora,
    single_file_config=single_file_config,
    load_file=load_file,
    encode_text=encode_text,
    example_conditioning=no_example_conditioning,
    training_scheduler=objective,
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
    kohya_needs_config=True,
    kohya_aliases=original_aliases,
    kohya_fuse=kohya_fuse,
    kohya_unfuse=kohya_unfuse,
    lora_implementation=BFL,
    to_single_file=to_single_file,
    sampling_kwargs=sampling_kwargs,
    lora_exclude=LORA_EXCLUDE,
    single_file_implementation=BFL,
)

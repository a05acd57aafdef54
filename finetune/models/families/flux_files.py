"""FLUX.1 from split single files: what ComfyUI users have on disk.

A FLUX.1 install in ComfyUI is four files: the transformer in the original (BFL) layout
(`models/unet/flux1-dev.safetensors`, or a full checkpoint with it under `model.diffusion_model.`),
the CLIP-L text encoder (`clip_l.safetensors`), T5-XXL's encoder (`t5xxl_fp16.safetensors`) and the
autoencoder (`ae.safetensors`). None of them carries a config or a tokenizer, so a base spec names
the four files plus a diffusers FLUX.1 folder or hub id that supplies only configs and tokenizers
(a few MB: `*.json`, `*.txt`, `*.model`):

    # flux-dev.toml: finetune train --base flux-dev.toml ...
    transformer = "ComfyUI/models/unet/flux1-dev.safetensors"
    clip_l = "ComfyUI/models/clip/clip_l.safetensors"
    t5xxl = "ComfyUI/models/clip/t5xxl_fp16.safetensors"
    ae = "ComfyUI/models/vae/ae.safetensors"
    config = "black-forest-labs/FLUX.1-dev"

Relative paths are relative to the spec file. Weights are read from the files only.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from finetune.errors import FinetuneError

CLIP_PREFIX = "text_model."  # ComfyUI's clip_l keeps transformers' (pre-5.6) nesting
# ComfyUI's clip_l files may also carry CLIP-L's text projection (SDXL uses it); Flux conditions on the
# pooled output before the projection, so the projection has no place in FLUX.1's CLIPTextModel.
_CLIP_UNUSED = ("text_projection.weight", "logit_scale")


@dataclass
class FluxFiles:
    """A FLUX.1 base spec: the four split files and where their configs come from."""

    transformer: str
    """The transformer in the original (BFL) layout, bare or under `model.diffusion_model.`."""
    clip_l: str
    """CLIP-L's text encoder (transformers' CLIPTextModel weights)."""
    t5xxl: str
    """T5-XXL's encoder (transformers' T5EncoderModel weights; fp16, bf16 or fp8 files)."""
    ae: str
    """The 16-channel autoencoder in the original layout."""
    config: str
    """A diffusers FLUX.1 folder or hub id: only its configs and tokenizers are read."""


def read_spec(path: Path) -> FluxFiles:
    """Read a base spec, naming every unknown, missing or mistyped key at once; relative paths are
    resolved against the spec's folder and must exist."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FinetuneError(f"cannot read the base spec {path}: {e}") from None
    names = [f.name for f in fields(FluxFiles)]
    problems = [f"unknown key {k!r} (known: {', '.join(names)})" for k in data if k not in names]
    problems += [f"missing key {k!r}" for k in names if k not in data]
    problems += [f"{k} must be a string, got {type(v).__name__}" for k, v in data.items()
                 if k in names and not isinstance(v, str)]
    if problems:
        raise FinetuneError(f"base spec {path}: " + "; ".join(problems))

    def resolve(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (path.parent / p))

    spec = FluxFiles(**{k: resolve(v) if k != "config" else v for k, v in data.items()})
    missing = [f"{k} = {getattr(spec, k)}" for k in names[:4] if not Path(getattr(spec, k)).is_file()]
    if missing:
        raise FinetuneError(f"base spec {path}: no such file: {'; '.join(missing)}")
    local = Path(resolve(spec.config))
    if local.is_dir():  # a folder relative to the spec; otherwise an absolute folder or a hub id
        spec.config = str(local)
    return spec


def is_spec(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".toml"


def config_folder(config: str) -> Path:
    """The local folder holding a FLUX.1 pipeline's configs and tokenizers: `config` itself, or its
    hub snapshot in the local cache (configs only are fetched if the Hub can be reached)."""
    folder = Path(config).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model"]
        try:
            folder = Path(snapshot_download(config, local_files_only=True, allow_patterns=patterns))
        except Exception:
            try:
                if os.environ.get("HF_HUB_OFFLINE"):
                    raise OSError
                folder = Path(snapshot_download(config, allow_patterns=patterns, etag_timeout=5))
            except Exception:
                raise FinetuneError(f"the config {config!r} of a FLUX.1 base spec is neither a local diffusers folder "
                                    "nor a hub id in the local cache: download its configs and tokenizers "
                                    f"(`huggingface-cli download {config} --include '*.json' '*.txt' '*.model'`) "
                                    "where there is network") from None
    try:
        cls = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        cls = None
    if cls != "FluxPipeline":
        raise FinetuneError(f"{folder} is not a diffusers FLUX.1 folder (model_index.json names {cls!r}, not FluxPipeline)")
    return folder


def _read(path: str, what: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise FinetuneError(f"the {what} file {path} is not a readable safetensors file ({e})") from None


def _into(model_cls, config, state: dict, what: str, path: str, dtype):
    """A transformers model of `config` holding exactly `state` (cast to `dtype`), built without
    random initialisation (T5-XXL alone is 4.7 B parameters)."""
    import torch

    with torch.device("meta"):
        expected = set(model_cls(config).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FinetuneError(f"the {what} file {path} does not fit the {what} config: "
                            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                            f"(e.g. {unexpected[:2]})")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype).eval()


def load_transformer(path: str, folder: Path, dtype=None, quantization_config=None):
    """A FluxTransformer2DModel from an original-layout file, with the config in `folder`/transformer.
    diffusers' own reader assumes FLUX.1's width; ours takes it from the config, then diffusers builds
    the model (and quantizes it, given diffusers' BitsAndBytesConfig)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from finetune.models.families import flux_layout

    config = FluxTransformer2DModel.load_config(str(folder), subfolder="transformer")
    original = _read(path, "transformer")
    if not flux_layout.is_original_flux(original):
        raise FinetuneError(f"{path} is not a FLUX.1 transformer in the original layout "
                            "(no double_blocks.0.img_attn.qkv / single_blocks.0.linear1)")
    has_guidance = any(k.removeprefix(flux_layout.ORIGINAL_PREFIX).startswith("guidance_in.") for k in original)
    if has_guidance != bool(config.get("guidance_embeds")):
        raise FinetuneError(f"{path} is a FLUX.1-{'dev' if has_guidance else 'schnell'} transformer but the config "
                            f"{folder} is FLUX.1-{'dev' if config.get('guidance_embeds') else 'schnell'}'s: "
                            "use the config of the same variant")
    try:
        state = flux_layout.to_diffusers(original, config)
    except ValueError as e:
        raise FinetuneError(f"{path}: {e}") from None
    del original
    kwargs = dict(config=str(folder), subfolder="transformer", torch_dtype=dtype or torch.float32,
                  local_files_only=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return FluxTransformer2DModel.from_single_file(state, **kwargs)


def load_split_files(spec: FluxFiles, dtype=None, quantization_config=None):
    """A FluxPipeline from a base spec's split files. `quantization_config` (diffusers'
    BitsAndBytesConfig) applies to the transformer."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    dtype = dtype or torch.float32
    folder = config_folder(spec.config)
    transformer = load_transformer(spec.transformer, folder, dtype, quantization_config)
    vae = AutoencoderKL.from_single_file(spec.ae, config=str(folder), subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True)
    clip = {k.removeprefix(CLIP_PREFIX): v for k, v in _read(spec.clip_l, "clip_l").items()
            if k not in _CLIP_UNUSED}
    text_encoder = _into(CLIPTextModel, CLIPTextConfig.from_pretrained(str(folder / "text_encoder")), clip, "clip_l",
                         spec.clip_l, dtype)
    t5 = _read(spec.t5xxl, "t5xxl")
    # The encoder's token embedding is tied to `shared`; files store it once or twice.
    t5.setdefault("encoder.embed_tokens.weight", t5.get("shared.weight"))
    text_encoder_2 = _into(T5EncoderModel, T5Config.from_pretrained(str(folder / "text_encoder_2")), t5, "t5xxl",
                           spec.t5xxl, dtype)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler"),
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        text_encoder_2=text_encoder_2, tokenizer_2=T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2")),
        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base_file(path: Path, config: str, dtype=None, quantization_config=None):
    """(pipeline, weight files, config folder) for a base spec .toml, or an original-layout transformer
    file whose other parts (text encoders, autoencoder) come from a diffusers FLUX.1 folder `config`
    (the tiny bases find their own); None for any other file."""
    if is_spec(path):
        spec = read_spec(path)
        pipe = load_split_files(spec, dtype, quantization_config)
        return pipe, [Path(spec.transformer), Path(spec.clip_l), Path(spec.t5xxl), Path(spec.ae)], config_folder(spec.config)
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    from finetune.models.families import flux_layout, flux_tiny

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise FinetuneError(f"{path} is not a readable safetensors file ({e})") from None
    if not flux_layout.is_original_flux(shapes):
        return None
    if config:
        folder = config_folder(config)
    else:
        folder = flux_tiny.config_for(shapes)
        if folder is None:
            raise FinetuneError(
                f"{path} is a FLUX.1 transformer alone: give its other parts with a base spec .toml naming the "
                "clip_l, t5xxl and ae files (see README, 'FLUX.1 from ComfyUI's files'), or --config a diffusers "
                "FLUX.1 folder holding them")
    from diffusers import FluxPipeline

    transformer = load_transformer(str(path), folder, dtype, quantization_config)
    pipe = FluxPipeline.from_pretrained(str(folder), transformer=transformer, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, [path], folder


def _save(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_split_files(pipe, folder: Path, names: dict[str, str], config: str, spec_name: str = "base.toml") -> Path:
    """Write a FluxPipeline as ComfyUI's split files under `folder` (file names by part: transformer,
    clip_l, t5xxl, ae) and a base spec naming them; returns the spec's path."""
    from finetune.models.families import flux_layout
    from finetune.models.ldm_layout import VAE_PREFIX, vae_to_ldm

    folder.mkdir(parents=True, exist_ok=True)
    _save(flux_layout.to_original(pipe.transformer.state_dict(), pipe.transformer.config), folder / names["transformer"])
    _save({CLIP_PREFIX + k.removeprefix(CLIP_PREFIX): v for k, v in pipe.text_encoder.state_dict().items()},
          folder / names["clip_l"])
    t5 = dict(pipe.text_encoder_2.state_dict())
    t5.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight: stored once, as ComfyUI's files do
    _save(t5, folder / names["t5xxl"])
    _save({k.removeprefix(VAE_PREFIX): v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()},
          folder / names["ae"])
    lines = ["# A FLUX.1 base from split single files: finetune train --base THIS_FILE ..."]
    lines += [f"{part} = {json.dumps(names[part])}" for part in ("transformer", "clip_l", "t5xxl", "ae")]
    lines.append(f"config = {json.dumps(config)}")
    spec = folder / spec_name
    spec.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return spec

"""Model families: everything that differs by base architecture, behind one small interface.

A *family* is one module in this package (`sd1.py`, `sdxl.py`) that builds one `Family`: a frozen
dataclass of plain data and plain functions (no base class, nothing to inherit). The stages (load,
train, train-dpo, export, sample, inspect) ask this registry for the family of a base model, a single
file, a diffusers folder or a LoRA, and call its fields; they never compare architecture names.

An *arch* is the short id that run.json, checkpoints and LoRA headers (`finetune.arch`) record, e.g.
"sd1", "sd2", "sdxl". A family covers one or more archs (`Family.variants`) that share all code and
differ only in data (SD 1.x and 2.x: one module, two variants).

What a family holds (see the fields of `Family` for the exact contracts):
- detection: of a diffusers folder (model_index.json), a single file (its tensor names and shapes),
  a LoRA (its modules, when its header does not say);
- the embedded tiny builders (`tiny`: spec -> a cached diffusers folder, e.g. "tiny");
- the pipeline class and the components, each with its role (denoiser, text encoder with its
  tokenizer, VAE): what is trained, cached, hashed, released after caching, cast to which dtype;
- text encoding: captions -> a dict of tensors (batch first) that the text cache stores as it is and
  `predict` reads back;
- per-example conditioning (SDXL's micro-conditioning from the manifest);
- the training objective: the noise scheduler for training, timesteps, the noisy input, the model
  call and the loss target and weights. A flow-matching family (Flux: packed latents, position ids,
  guidance, velocity target) implements these differently; the recipes only call them;
- default LoRA targets, kohya module names and the kohya prefixes of its components;
- the original single-file layout, both ways (`to_single_file`; loading goes through the pipeline
  class's `from_single_file` with `pipeline_kwargs`);
- export metadata (`ss_base_model_version`, `modelspec.architecture` / `.implementation`, the
  Hugging Face tag) and the native training resolution of each variant.

How to add a base (e.g. Flux.1):
1. Write `finetune/models/families/<name>.py` with `FAMILY = Family(...)`, every field filled (helpers
   it needs, such as a tiny builder or a layout map, go in `<name>_*.py` beside it). Latents are the
   VAE's (B, C, h, w) for every family: a transformer family packs them inside `add_noise`/`predict`
   and unpacks the prediction, so caches, buckets and the loss stay as they are.
2. Add the module's name to `MODULES` below.
3. Add presets (presets/<subject>-<name>-lora.toml) and tests (tests/models/families/test_<name>.py;
   tests/models/families/test_families.py checks every registered family implements the interface,
   and test_seam.py shows a family registered from a test trains, exports and samples).
Nothing outside the module should need to change. If something does, the interface lacks a field:
add it here (with the SD implementations), never a branch on the architecture in a stage.

This module imports neither torch nor diffusers: the registry answers "which family" from files and
names, so config errors and `--help` stay fast.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

MODULES = ("sd1", "sdxl", "flux")
"""The family modules of this package, in detection order (the first that recognises a file wins)."""

DENOISER, TEXT_ENCODER, VAE = "denoiser", "text_encoder", "vae"
SGM = "https://github.com/Stability-AI/generative-models"
"""modelspec.implementation of weights in the original (Stability AI) layout."""
ROLES = (DENOISER, TEXT_ENCODER, VAE)


@dataclass(frozen=True)
class Component:
    """One model of a pipeline, as the stages treat it."""

    name: str
    """The pipeline attribute and the LoRA key prefix: unet | transformer | text_encoder | text_encoder_2 | vae."""
    role: str
    """denoiser (trained, one per family) | text_encoder (conditioning: may be trained, else cached and
    released) | vae (encodes images once: cached and released)."""
    tokenizer: str = ""
    """Text encoders: the pipeline attribute of its tokenizer."""
    kohya_prefix: str = ""
    """Trainable components: the prefix of its modules in kohya LoRA files (lora_unet, lora_te1, ...)."""
    keep_fp32: bool = False
    """Stays fp32 under mixed precision (SDXL's VAE overflows in fp16)."""
    lora: bool = True
    """Text encoders: whether `lora.train_text_encoder` gives it a LoRA (FLUX.1's T5-XXL stays frozen)."""


@dataclass(frozen=True)
class Variant:
    """One architecture of a family: the data that tells it apart from its siblings."""

    arch: str
    """The id recorded in run.json and LoRA headers (finetune.arch): sd1, sd2, sdxl, flux1..."""
    title: str
    """How people name it: "SD 1.x", "SDXL"."""
    resolution: int
    """Native training resolution in px (a square's side); the export's default modelspec.resolution."""
    resolution_text: str
    """The resolution as the refusal of a mismatched dataset says it ("512 or 768")."""
    kohya_version: str
    """kohya's ss_base_model_version (sd_v1, sdxl_base_v1-0)."""
    modelspec: str
    """modelspec.architecture (without "/lora")."""
    declared_as: tuple[str, ...]
    """Prefixes of ss_base_model_version or modelspec.architecture that mean this arch in a LoRA header
    ("sdxl", "stable-diffusion-xl-")."""
    hub_tag: str
    """The Hugging Face model-card tag of the family (stable-diffusion, stable-diffusion-xl)."""
    single_file: bool = True
    """Whether `to_single_file` writes this variant (a merged single-file export)."""
    kohya_extra: Mapping[str, str] = field(default_factory=dict)
    """Further ss_* keys kohya writes for it (ss_v2)."""


@dataclass(frozen=True)
class Family:
    """The interface a family module fills. Every field is required; tensors are torch tensors and
    `examples` are `finetune.train.data.Example`s."""

    name: str
    """The module's name: sd1, sdxl."""
    variants: tuple[Variant, ...]
    pipeline_class: str
    """The diffusers pipeline class name (StableDiffusionPipeline)."""
    components: tuple[Component, ...]
    """The models, in the order their weight files are hashed (a base's identity)."""
    pipeline_kwargs: Mapping[str, Any]
    """Extra keyword arguments for `from_pretrained` / `from_single_file` (no safety checker)."""
    tiny: Mapping[str, Callable[[], Path]]
    """Embedded test bases: spec ("tiny") -> a function returning its cached diffusers folder."""

    # -- detection (no weights loaded)
    detect_folder: Callable[[Path, Mapping], str | None]
    """(diffusers folder, its model_index.json) -> arch, or None when not this family."""
    detect_single_file: Callable[[Mapping[str, tuple[int, ...]]], str | None]
    """(single-file tensor name -> shape) -> arch, or None when not this family."""
    detect_lora: Callable[[list, Mapping[str, str]], str | None]
    """(lora_io.LoraLayers, header) -> arch from the modules when the header does not say, or None."""
    single_file_config: Callable[[Mapping[str, tuple[int, ...]]], Path | None]
    """A local diffusers folder with the configs a single file needs, when known (the tiny bases)."""
    load_file: Callable[..., tuple | None]
    """(a base file: a .safetensors of this family or a base spec .toml, a config folder or hub id or "",
    torch dtype, quantization_config=None: diffusers' BitsAndBytesConfig for the denoiser) -> (pipeline,
    the weight files it came from, its config folder) when the family reads such files itself, else None
    (diffusers' `from_single_file` then loads single files)."""

    # -- conditioning
    encode_text: Callable[[Mapping[str, Any], list[str]], dict[str, Any]]
    """(pipeline components by name, captions) -> {name: tensor (B, ...)}, e.g. {"hidden"} or
    {"hidden", "pooled"}. Cached per caption as it is; `predict` receives it back batched."""
    example_conditioning: Callable[[list], dict[str, Any]]
    """(examples of a batch) -> {name: tensor (B, ...)} of per-image conditioning ({} when none)."""

    # -- the training objective
    training_scheduler: Callable[[Any, Any], Any]
    """(pipeline, the run's `flow` config section or None for its defaults) -> the noise scheduler the
    objective uses (DDPM for SD, which refuses flow settings other than the defaults; a flow-matching
    family's timestep sampler and training guidance)."""
    sample_timesteps: Callable[[Any, int, Any], Any]
    """(scheduler, batch size, device) -> random timesteps (from the global RNG)."""
    spread_timesteps: Callable[[Any, int], Any]
    """(scheduler, count) -> `count` fixed timesteps spread over the schedule (held-out evaluation)."""
    add_noise: Callable[[Any, Any, Any, Any], Any]
    """(scheduler, latents, noise, timesteps) -> the denoiser's noisy input."""
    predict: Callable[[Any, Any, Any, Any, Mapping[str, Any]], Any]
    """(scheduler, denoiser, noisy input, timesteps, conditioning: encode_text's dict +
    example_conditioning's) -> the prediction, shaped like the latents. The scheduler is
    `training_scheduler`'s object: a flow-matching family keeps there how timesteps map to noise levels
    (FLUX.1's depend on the image size) and the training guidance."""
    target: Callable[[Any, Any, Any, Any], Any]
    """(scheduler, latents, noise, timesteps) -> what the prediction should equal."""
    loss_weights: Callable[[Any, Any, float], Any]
    """(scheduler, timesteps, min_snr_gamma) -> per-sample loss weights (B,)."""
    set_attention: Callable[[Any, bool], None]
    """(denoiser, xformers) -> use xformers, else PyTorch SDPA."""

    # -- LoRA
    lora_targets: tuple[str, ...]
    """Default denoiser LoRA targets (module names)."""
    text_encoder_lora_targets: tuple[str, ...]
    kohya_names: Callable[[str, list[str], Mapping | None], dict[str, str]]
    """(component, module paths, denoiser config) -> {module: kohya name}; raises ValueError for a
    module kohya loaders would not apply."""
    kohya_needs_config: bool
    """Whether `kohya_names` needs the denoiser's config (export then reads it from the base)."""
    kohya_aliases: Callable[[Any, list[str]], dict[str, str]]
    """(denoiser, its module paths) -> {module path: another dotted name kohya files may use for it}
    beyond the module path itself (the original layout's names); {} when there are none."""
    kohya_fuse: Callable[[list, Mapping | None], list]
    """(denoiser LoRA layers, the denoiser's config) -> the layers as a kohya file holds them: the same
    layers where kohya names modules one to one (SD), else layers on the kohya layout's own modules,
    named (`kohya_name=True`, the name after the component's prefix), e.g. q, k and v fused into one."""
    kohya_unfuse: Callable[[list, Mapping | None], list]
    """(denoiser layers read from a kohya file, the denoiser's config) -> layers on the denoiser's own
    modules where `kohya_fuse` changed them (SD: the same layers)."""
    lora_implementation: str
    """modelspec.implementation of a LoRA file ("diffusers" when its names are diffusers' own)."""

    # -- single file and sampling
    to_single_file: Callable[[Any], dict[str, Any]]
    """(pipeline) -> the original single-file state dict (views of the live weights where possible)."""
    sampling_kwargs: Callable[[Any], dict[str, Any]]
    """(pipeline) -> extra arguments to build another pipeline of its components (a new sampler)."""
    lora_exclude: tuple[str, ...] = ()
    """Full dotted names of denoiser modules the default targets leave out although a target matches
    their last names (FLUX.1's final layer `proj_out`, named like the single blocks' output projection)."""
    single_file_implementation: str = SGM
    """modelspec.implementation of a merged single file (the original layout's home: Stability AI's for SD)."""

    def variant(self, arch: str) -> Variant:
        for v in self.variants:
            if v.arch == arch:
                return v
        raise KeyError(f"{arch!r} is not an arch of the {self.name} family ({', '.join(self.archs)})")

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(v.arch for v in self.variants)

    def component(self, role: str) -> list[Component]:
        return [c for c in self.components if c.role == role]

    @property
    def denoiser(self) -> str:
        """The pipeline attribute of the denoiser (unet, transformer)."""
        return self.component(DENOISER)[0].name

    @property
    def text_encoders(self) -> list[str]:
        return [c.name for c in self.component(TEXT_ENCODER)]

    @property
    def vae(self) -> str:
        return self.component(VAE)[0].name


_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add a family (a module's FAMILY, or a test's own); its archs must be new."""
    missing = [f.name for f in fields(Family) if getattr(family, f.name, None) is None]
    if missing:
        raise TypeError(f"family {family.name!r} leaves {', '.join(missing)} unset")
    taken = {a: f.name for f in _REGISTRY.values() if f.name != family.name for a in f.archs}
    clash = [a for a in family.archs if a in taken]
    if clash:
        raise ValueError(f"family {family.name!r}: arch {clash[0]!r} belongs to {taken[clash[0]]!r}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def families() -> list[Family]:
    """Every registered family, the package's own first (in MODULES order)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in MODULES:
            register(importlib.import_module(f"{__name__}.{module}").FAMILY)
    return list(_REGISTRY.values())


def get(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise KeyError(name)


def archs() -> list[str]:
    return [a for f in families() for a in f.archs]


def for_arch(arch: str) -> Family:
    """The family of an arch id (run.json's `arch`, a LoRA header's finetune.arch)."""
    for f in families():
        if arch in f.archs:
            return f
    raise FinetuneError(f"unknown architecture {arch!r}: finetune knows {', '.join(archs())}")


def variant(arch: str) -> Variant:
    return for_arch(arch).variant(arch)


def title(arch: str | None) -> str | None:
    """The human name of an arch ("SDXL"), None for None."""
    return None if arch is None else variant(arch).title


def of_pipeline(pipe) -> Family:
    """The first family (the package's own first) whose pipeline class `pipe` is; prefer `for_arch`
    where the arch is known (a test family may share a pipeline class)."""
    name = type(pipe).__name__
    for f in families():
        if f.pipeline_class == name:
            return f
    raise FinetuneError(f"no finetune model family uses a {name}")


def tiny_specs() -> dict[str, tuple[Family, Callable[[], Path]]]:
    """Every embedded test base: spec -> (family, builder of its cached diffusers folder)."""
    return {spec: (f, build) for f in families() for spec, build in f.tiny.items()}


def read_model_index(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{folder}/model_index.json cannot be read ({e}): is this a diffusers model folder?") from None


def folder_arch(folder: Path) -> str:
    """The arch of a diffusers folder, from its configs alone."""
    index = read_model_index(folder)
    for f in families():
        arch = f.detect_folder(Path(folder), index)
        if arch:
            return arch
    titles = ", ".join(v.title for f in families() for v in f.variants)
    raise FinetuneError(f"{folder} holds a {index.get('_class_name') or 'unknown'} pipeline; finetune trains "
                        f"{titles} bases")


def single_file_arch(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The arch of a single-file checkpoint from its tensor names and shapes; ValueError when unknown."""
    for f in families():
        arch = f.detect_single_file(shapes)
        if arch:
            return arch
    keys = list(shapes)
    from finetune.words import plural

    raise ValueError(f"unknown checkpoint architecture: no {', '.join(archs())} keys among {plural(len(keys), 'key')} "
                     f"(first: {keys[:3]})")


def declared_arch(metadata: Mapping[str, str] | None) -> str | None:
    """The arch a LoRA header states: finetune.arch, kohya's ss_base_model_version or modelspec.architecture."""
    metadata = metadata or {}
    arch = metadata.get("finetune.arch", "")
    if arch in archs():
        return arch
    prefixes = sorted(((p, v.arch) for f in families() for v in f.variants for p in v.declared_as),
                      key=lambda x: -len(x[0]))  # longest first: sd_v2_768 before sd_v2
    for value in (metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")):
        for prefix, arch in prefixes:
            if value and value.startswith(prefix):
                return arch
    return None


def lora_arch(layers: list, metadata: Mapping[str, str] | None = None) -> str | None:
    """A LoRA's arch: what its header declares, else what a family recognises in its modules; None if unknown."""
    declared = declared_arch(metadata)
    if declared:
        return declared
    for f in families():
        arch = f.detect_lora(layers, metadata or {})
        if arch:
            return arch
    return None

"""Loading a base model: `tiny`, a local diffusers folder, a single-file checkpoint, or a hub id.

Weights come from safetensors. Pickle checkpoints (.ckpt/.pt/.bin/.pth) can execute code when
unpickled, so they are refused unless the user opts in, and even then they are read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models import families

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Base:
    """A loaded base model and where it came from."""

    pipe: object
    """The diffusers pipeline (the family's `pipeline_class`)."""
    spec: str
    """What the user passed (an embedded test model's name such as `tiny`, a path or a hub id)."""
    kind: str
    """tiny (an embedded test model) | folder | single-file | split-files (a base spec .toml) | hub"""
    arch: str
    """The architecture id (finetune.models.families), e.g. sd1 or sd2."""
    files: list[Path] = field(default_factory=list)
    """The weight files the model came from (hashed for provenance)."""
    config_dir: Path | None = None
    """A local diffusers folder with this model's configs (what `from_single_file(config=...)` needs)."""
    _hash: str | None = None

    @property
    def family(self) -> families.Family:
        return families.for_arch(self.arch)

    @property
    def name(self) -> str:
        return self.spec if self.kind == "tiny" else Path(self.spec.rstrip("/")).name

    def model_hash(self) -> str:
        """sha256 of the weights: of the file for a single file (as A1111 shows it), else of the
        component weight files in a fixed order."""
        if self._hash is None:
            h = hashlib.sha256()
            for f in self.files:
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
            self._hash = h.hexdigest()
        return self._hash


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[dtype]


def _pipeline_class(arch: str):
    import diffusers

    return getattr(diffusers, families.for_arch(arch).pipeline_class)


def weight_files(folder: Path, arch: str) -> list[Path]:
    """The safetensors weights of a diffusers folder, component by component in the family's order."""
    files = []
    for component in families.for_arch(arch).components:
        files += sorted((folder / component.name).glob("*.safetensors"))
    return files


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _loading():
    """Loading a model takes seconds: no per-component progress bars or advisory chatter (errors
    still get through)."""
    import diffusers
    import transformers

    dlog, tlog = diffusers.utils.logging, transformers.utils.logging
    state = dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error(), dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(state[0]), tlog.set_verbosity(state[1])
        if state[2]:
            dlog.enable_progress_bar()
        if state[3]:
            tlog.enable_progress_bar()


def load_folder(folder: Path, spec: str, kind: str, dtype=None, allow_pickle: bool = False,
                arch: str | None = None, quantize: str = "none") -> Base:
    """`arch` when the caller knows it (an embedded test base is its family's), else told by the folder's configs."""
    arch = arch or families.folder_arch(folder)
    files = weight_files(folder, arch)
    if not files and not allow_pickle:
        raise FinetuneError(
            f"{folder} has no .safetensors weights (only pickle .bin files?): convert them to safetensors, "
            "or pass --allow-pickle to load them with torch.load(weights_only=True)")
    kwargs = dict(dtype=_torch_dtype(dtype), local_files_only=True, use_safetensors=bool(files),
                  **families.for_arch(arch).pipeline_kwargs)
    if quantize != "none":
        from finetune.models.quantize import pipeline_quantization

        kwargs["quantization_config"] = pipeline_quantization(quantize, [families.for_arch(arch).denoiser])
    try:
        with _loading():
            pipe = _pipeline_class(arch).from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise FinetuneError(f"cannot load the diffusers folder {folder}: {str(e).splitlines()[0]}") from None
    return Base(pipe=_quiet(pipe), spec=spec, kind=kind, arch=arch, files=files, config_dir=folder)


def read_single_file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # shapes only; "pt" would import torch (seconds)
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise FinetuneError(f"{path} is not a readable safetensors file ({e})") from None


def _file_quantization(quantize: str):
    from finetune.models.quantize import bnb_config

    return bnb_config(quantize)


def load_single_file(path: Path, spec: str, config: str = "", dtype=None, source_files=None,
                     quantize: str = "none") -> Base:
    shapes = read_single_file_keys(path)
    try:
        arch = families.single_file_arch(shapes)
    except ValueError as e:
        raise FinetuneError(f"{spec}: {e}") from None
    family = families.for_arch(arch)
    with _loading():
        own = family.load_file(path, config, _torch_dtype(dtype), _file_quantization(quantize))
    if own is not None:
        pipe, files, config_dir = own
        return Base(pipe=_quiet(pipe), spec=spec, kind="single-file", arch=arch, files=source_files or files,
                    config_dir=config_dir)
    if quantize != "none":
        raise FinetuneError(f"model.quantize = {quantize!r} is for diffusers folders, hub ids and FLUX.1 files; {spec} is "
                            f"an {families.title(arch)} single file: set model.quantize = \"none\"")
    config = config or str(family.single_file_config(shapes) or "")
    if config and Path(config).is_dir():
        config_arch = families.folder_arch(Path(config))
        if families.for_arch(config_arch) is not family:
            raise FinetuneError(f"{spec} is an {families.title(arch)} checkpoint but the config folder {config} holds "
                                f"an {families.title(config_arch)} model: pass a config folder of the same "
                                "architecture (--config / model.config)")
    kwargs = dict(dtype=_torch_dtype(dtype), **family.pipeline_kwargs)
    if config:
        kwargs["config"] = config
    if os.environ.get("HF_HUB_OFFLINE") or config and Path(config).is_dir():
        kwargs["local_files_only"] = True
    try:
        with _loading():
            pipe = _pipeline_class(arch).from_single_file(str(path), **kwargs)
    except Exception as e:  # diffusers raises many types here; the first line says which
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ("" if config else
                f" A single file needs its {families.title(arch)} configs: pass a local diffusers folder of the same "
                "architecture with --config (model.config), or run once with Hub access.")
        raise FinetuneError(f"cannot load the single-file checkpoint {spec}: {msg}.{hint}") from None
    config_dir = Path(config) if config and Path(config).is_dir() else None
    return Base(pipe=_quiet(pipe), spec=spec, kind="single-file", arch=arch, files=source_files or [path],
                config_dir=config_dir)


def load_spec_file(path: Path, spec: str, config: str = "", dtype=None, quantize: str = "none") -> Base:
    """A base spec (.toml) naming a model's split files, read by the family that knows it."""
    quantization = _file_quantization(quantize)
    for family in families.families():
        with _loading():
            own = family.load_file(path, config, _torch_dtype(dtype), quantization)
        if own is not None:
            pipe, files, config_dir = own
            arch = families.folder_arch(config_dir)
            return Base(pipe=_quiet(pipe), spec=spec, kind="split-files", arch=arch, files=files, config_dir=config_dir)
    raise FinetuneError(f"{spec}: no model family reads this base spec (a FLUX.1 spec names transformer, clip_l, "
                        "t5xxl, ae and config)")


def load_pickle_checkpoint(path: Path, spec: str, config: str, dtype, allow_pickle: bool) -> Base:
    """A .ckpt/.pt/.bin: only with the opt-in, read as tensors only, then loaded like a single file."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    if not allow_pickle:
        raise FinetuneError(
            f"{spec} is a pickle checkpoint, and unpickling can run arbitrary code hidden in the file. "
            "Use a .safetensors version of the model, or pass --allow-pickle to load it anyway with "
            "torch.load(weights_only=True), which refuses anything but tensors.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything that is not plain tensors
        raise FinetuneError(f"{spec} was refused by torch.load(weights_only=True): it holds more than tensors "
                            f"({str(e).splitlines()[0][:200]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FinetuneError(f"{spec} does not hold a state dict of tensors")
    with tempfile.TemporaryDirectory() as tmp:
        st = Path(tmp) / (path.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(st))
        return load_single_file(st, spec, config, dtype, source_files=[path])


def load_hub(spec: str, dtype=None, revision: str = "", quantize: str = "none") -> Base:
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision or None, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"])
    try:
        folder = snapshot_download(spec, local_files_only=True, **kwargs)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE"):
            folder = None
        else:
            try:
                folder = snapshot_download(spec, etag_timeout=5, **kwargs)
            except Exception:
                folder = None
    if folder is None or not (Path(folder) / "model_index.json").is_file():
        raise FinetuneError(hub_unavailable(spec, revision))
    return load_folder(Path(folder), spec, "hub", dtype, quantize=quantize)


# Download sizes of the fp32 weights `load_hub` reads (UNet, VAE, text encoders), for the bases the presets name.
HUB_DOWNLOAD_GB = {"stable-diffusion-v1-5/stable-diffusion-v1-5": 4.3, "runwayml/stable-diffusion-v1-5": 4.3,
                   "stabilityai/stable-diffusion-2-1": 5.2, "stabilityai/stable-diffusion-2-1-base": 5.2,
                   "stabilityai/stable-diffusion-xl-base-1.0": 13.9}
# What `load_hub` reads: configs, tokenizers and the fp32 weights of each component; not the repository's
# single-file checkpoints or fp16 copies, which `--include "*.safetensors"` would add (10+ GB more).
HUB_INCLUDE = ("*.json", "*.txt", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors", "text_encoder_2/model.safetensors")


def hub_unavailable(spec: str, revision: str = "") -> str:
    """What to do when hub id `spec` is not cached and the Hub cannot be reached: the command that
    downloads it, how big it is, and which cache it goes to."""
    import shlex

    from huggingface_hub import constants

    command = ["hf", "download", spec] + (["--revision", revision] if revision else [])
    for pattern in HUB_INCLUDE:
        command += ["--include", pattern]
    size = (f"about {HUB_DOWNLOAD_GB[spec]:g} GB" if spec in HUB_DOWNLOAD_GB
            else "an SD 1.x base is about 4.3 GB, an SDXL one about 13.9 GB")
    home = os.environ.get("HF_HOME")
    where = f"HF_HOME={home}" if home else f"HF_HOME is unset, so {constants.HF_HOME}"
    return (f"base model {spec!r} is not in the local Hugging Face cache and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}; pass a local diffusers folder or "
            "a .safetensors checkpoint with --base PATH (or --base tiny for the embedded test model), or "
            f"download it ({size}) where there is network with\n"
            f"  {shlex.join(command)}\n"
            f"into the cache {constants.HF_HUB_CACHE} ({where}); copy that cache folder here, or point HF_HOME "
            "at a copy of it")


def missing_base(spec: str) -> str | None:
    """The problem with base `spec` that needs no loading: a path that does not exist ("file not found"),
    or a spec that is neither an embedded test model (`tiny`, ...), a path nor a hub id; None when it may load."""
    tiny = families.tiny_specs()
    if spec in tiny:
        return None
    path = Path(spec).expanduser()
    if path.exists():
        return None
    if is_hub_id(spec):
        return None
    if path.suffix.lower() in PICKLE_SUFFIXES | {".safetensors"} or "/" in spec or os.sep in spec:
        at = "" if str(path.absolute()) == spec else f" (nothing at {path.absolute()})"
        return (f"base model {spec}: file not found{at}; give an existing .safetensors file or diffusers folder, "
                "a hub id (org/name) or tiny")
    return (f"base model {spec!r} is neither {'/'.join(f'`{t}`' for t in tiny)}, an existing folder or file, "
            "nor a hub id (org/name)")


def is_hub_id(spec: str) -> bool:
    """org/name, and not a path or a weights file (`models/x.safetensors` is a missing file)."""
    return (bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))
            and Path(spec).suffix.lower() not in PICKLE_SUFFIXES | {".safetensors"})


def peek_architecture(spec: str, revision: str = "") -> str | None:
    """The architecture (e.g. sd1, see finetune.models.families) a base spec names, from its configs or its file header alone
    (no weights loaded, no network), or None where that cannot tell (a hub id not in the local cache, a
    pickle, an unreadable folder: `load_base` then says what is wrong)."""
    tiny = families.tiny_specs()
    if spec in tiny:
        return families.folder_arch(tiny[spec][1]())  # a family may have several tiny variants
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return families.folder_arch(path)
        if path.is_file():
            return families.single_file_arch(read_single_file_keys(path)) if path.suffix.lower() == ".safetensors" else None
        if is_hub_id(spec):
            from huggingface_hub import constants

            if not (Path(constants.HF_HUB_CACHE) / f"models--{spec.replace('/', '--')}").is_dir():
                return None  # not cached: known without importing the hub client (a tenth of a second)
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(spec, "model_index.json", revision=revision or None)
            return families.folder_arch(Path(index).parent) if isinstance(index, str) else None
    except (FinetuneError, ValueError, OSError):
        return None
    return None


def load_base(spec: str = "tiny", *, config: str = "", allow_pickle: bool = False, dtype=None,
              revision: str = "", quantize: str = "none") -> Base:
    """Load a base model from an embedded test model (`tiny`, ...), a diffusers folder, a single-file
    checkpoint or a hub id; `quantize` (nf4 | int8, model.quantize) loads its denoiser through bitsandbytes."""
    tiny = families.tiny_specs()
    if spec in tiny:
        family, build = tiny[spec]
        folder = build()
        # the family's own detector tells its variants apart (tiny-flux-schnell)
        arch = family.detect_folder(folder, families.read_model_index(folder)) or family.archs[0]
        return load_folder(folder, spec, "tiny", dtype, arch=arch, quantize=quantize)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(path, spec, "folder", dtype, allow_pickle, quantize=quantize)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if quantize != "none":
                raise FinetuneError(f"model.quantize = {quantize!r} does not load pickle checkpoints ({spec}): "
                                    "use a .safetensors file or set model.quantize = \"none\"")
            return load_pickle_checkpoint(path, spec, config, dtype, allow_pickle)
        if path.suffix.lower() == ".toml":
            return load_spec_file(path, spec, config, dtype, quantize)
        if path.suffix.lower() != ".safetensors":
            raise FinetuneError(f"{spec}: unknown checkpoint type {path.suffix!r}; expected a .safetensors "
                                "file, a base spec .toml or a diffusers folder")
        return load_single_file(path, spec, config, dtype, quantize=quantize)
    if is_hub_id(spec):
        return load_hub(spec, dtype, revision, quantize)
    raise FinetuneError(missing_base(spec))

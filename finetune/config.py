"""Typed run configuration: dataclasses, TOML presets, `--set section.key=value` overrides.

Every field has a docstring (the string right below it); `finetune presets show NAME` prints them.
Unknown keys, wrong types and out-of-range values are collected and raised together as one
`ConfigError`, each naming its dotted key, the bad value and, for typos, the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from finetune import vocab
from finetune.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent
# presets/ at the top of a checkout; installed (non-editable) they are package data, finetune/presets/.
PRESETS_DIR = _PACKAGE / "presets" if (_PACKAGE / "presets").is_dir() else _PACKAGE.parent / "presets"


def opt(default: Any, *, choices: tuple | None = None, min: float | None = None, max: float | None = None):
    """A dataclass field with validation bounds kept in its metadata."""
    meta = {"choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: list(d) if isinstance(d, list) else dict(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    base: str = opt("runwayml/stable-diffusion-v1-5")
    """Base model: `tiny`, a hub id, a local diffusers folder, or a single-file checkpoint (.safetensors)."""
    config: str = opt("")
    """For a single-file base: a local diffusers folder (or hub id) whose configs describe it; empty = detect."""
    allow_pickle: bool = opt(False)
    """Allow pickle checkpoints (.ckpt/.pt/.bin); they are still loaded with torch.load(weights_only=True)."""
    revision: str = opt("")
    """Hub revision (branch, tag or commit) when `base` is a hub id; empty = the default branch."""
    quantize: str = opt("none", choices=vocab.QUANTIZE)
    """Load the frozen denoiser quantized by bitsandbytes (QLoRA; the LoRA stays in higher precision):
    none | nf4 | int8. Needs an NVIDIA GPU with CUDA."""
    offload: str = opt("none", choices=vocab.OFFLOAD)
    """none | blocks: the denoiser's blocks stay in CPU memory and each goes to the GPU for its own pass
    (diffusers' group offloading; slower, for the smallest cards). Needs an NVIDIA GPU with CUDA."""


@dataclass
class DataConfig:
    trigger: str = opt("ohwx")
    """The rare token that names the subject in captions and prompts (`[trigger]`)."""
    class_word: str = opt("person")
    """The subject's class (`[class]`): person, man, woman, dog, cat, ..., used for captions and prior images."""
    caption_template: str = opt("a photo of [trigger] [class]")
    """Caption for every image; `[trigger]` and `[class]` are substituted."""
    captioner: str = opt("")
    """Optional transformers image-to-text model (local path or hub id) whose caption is appended."""
    captioner_prompt: str = opt("")
    """Text prompt for the captioner: empty for BLIP/GIT, a task token such as `<CAPTION>` for Florence-2."""
    resolution: int = opt(512, min=64, max=4096)
    """Training resolution in pixels (square crops are resolution x resolution); a multiple of 64."""
    crop: str = opt("face", choices=("face", "center", "none"))
    """face: square crop around the main face; center: centre square; none: whole image, aspect-ratio bucket."""
    face_share: float = opt(0.35, min=0.05, max=1.0)
    """Share of the crop's side taken by the face box (0.35 = head and shoulders)."""
    require_face: bool = opt(False)
    """In face mode, reject photos without a detectable face instead of centre-cropping them."""
    identity: bool = opt(True)
    """In face mode, give each face an identity vector to find the subject (needs finetune[identity]; ~80 ms of CPU a photo); false skips it."""
    require_subject: bool = opt(False)
    """In face mode, reject photos whose face is not the subject's (the identity most photos share); needs finetune[identity]."""
    min_side: int = opt(0, min=0)
    """Reject photos whose short side is below this many pixels; 0 = half the resolution."""
    blur_threshold: float = opt(30.0, min=0.0)
    """Reject photos whose crop region, scaled to 256 px, has a variance of the Laplacian below this; 0 = keep all."""
    near_duplicate_distance: int = opt(4, min=0, max=64)
    """Reject near-duplicates whose 64-bit perceptual hashes differ in at most this many bits; 0 = exact only."""
    max_megapixels: float = opt(150.0, min=1.0)
    """Refuse images claiming more than this many megapixels (decompression-bomb guard)."""
    repeats: int = opt(1, min=1, max=1000)
    """How many times each image appears per epoch (kohya's repeats)."""
    workers: int = opt(0, min=0, max=256)
    """Worker processes for decoding and cropping; 0 = one per CPU core."""


@dataclass
class LoraConfig:
    rank: int = opt(16, min=1, max=1024)
    """LoRA rank (r): the adapter's inner dimension."""
    alpha: float = opt(16.0, min=0.0)
    """LoRA alpha: the update is scaled by alpha / rank."""
    dropout: float = opt(0.0, min=0.0, max=1.0)
    """Dropout on the LoRA path."""
    targets: list[str] = opt([])
    """Denoiser module names to adapt (peft target_modules); empty = the base's defaults (SD: to_q, to_k, to_v,
    to_out.0; FLUX.1: attention and MLP of the double and single blocks, not the final layer proj_out).
    Add ff.net.0.proj, ff.net.2, proj_in, conv1, ... as wanted."""
    use_dora: bool = opt(False)
    """Weight-decomposed LoRA (peft use_dora)."""
    train_text_encoder: bool = opt(False)
    """Also train a LoRA on the text encoder (its embeddings are then not cached)."""
    text_encoder_rank: int = opt(8, min=1, max=1024)
    """Rank of the text-encoder LoRA."""
    text_encoder_alpha: float = opt(8.0, min=0.0)
    """Alpha of the text-encoder LoRA."""
    text_encoder_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder module names to adapt."""


@dataclass
class TrainConfig:
    seed: int = opt(42, min=0)
    """Seed for weights init, data order, noise and timesteps: same config + seed = same weights."""
    max_steps: int = opt(1500, min=1)
    """Optimizer steps to train for."""
    batch_size: int = opt(1, min=1, max=1024)
    """Instance images per step per process (prior-preservation class images are added on top)."""
    grad_accum: int = opt(1, min=1, max=1024)
    """Gradient accumulation micro-steps per optimizer step."""
    lr: float = opt(1e-4, min=0.0, max=1.0)
    """Learning rate of the UNet LoRA."""
    text_encoder_lr: float = opt(5e-5, min=0.0, max=1.0)
    """Learning rate of the text-encoder LoRA."""
    lr_scheduler: str = opt("constant", choices=("constant", "constant_with_warmup", "cosine", "linear"))
    """Learning-rate schedule."""
    warmup_steps: int = opt(0, min=0)
    """Warm-up steps for the schedules that have one."""
    optimizer: str = opt("adamw8bit", choices=("adamw8bit", "adamw"))
    """adamw8bit (bitsandbytes, 8-bit state) or adamw (torch)."""
    adam_beta1: float = opt(0.9, min=0.0, max=1.0)
    """Adam beta1."""
    adam_beta2: float = opt(0.999, min=0.0, max=1.0)
    """Adam beta2."""
    adam_eps: float = opt(1e-8, min=0.0, max=1.0)
    """Adam epsilon."""
    weight_decay: float = opt(1e-2, min=0.0, max=1.0)
    """Decoupled weight decay."""
    max_grad_norm: float = opt(1.0, min=0.0)
    """Clip gradients to this norm; 0 = no clipping."""
    mixed_precision: str = opt("auto", choices=vocab.PRECISION_MODES)
    """auto = bf16 where fast (CUDA 8.0+, CPUs with AMX/AVX512-BF16), fp16 on older CUDA, else no (fp32); LoRA: fp32."""
    attention: str = opt("auto", choices=("auto", "sdpa", "xformers"))
    """auto = xformers on CUDA when installed, else PyTorch SDPA."""
    gradient_checkpointing: bool = opt(False)
    """Recompute activations in the backward pass: less memory, ~30-40% slower steps."""
    compile: str = opt("off", choices=("off", "denoiser"))
    """denoiser = torch.compile the UNet; off in the presets: on this 2-core CPU (bench/train.py --model sd15 --compile) compiling took ~3 min and peak memory 1.48x eager's (7.3 vs 4.9 GB), with no step gain measurable under the shared load; not measured on CUDA (no GPU). A run resumes only under the compile setting it started with (refused otherwise)."""
    cache_latents: bool = opt(True)
    """VAE-encode each training image once and keep the latents on disk beside the dataset."""
    cache_text: bool = opt(True)
    """Encode each caption once while the text encoder is frozen."""
    prior_preservation: bool = opt(False)
    """DreamBooth prior preservation with class images generated by the base model."""
    class_prompt: str = opt("a photo of [class]")
    """Prompt for class images; `[class]` is substituted."""
    num_class_images: int = opt(100, min=1)
    """How many class images to generate (and reuse across runs)."""
    prior_loss_weight: float = opt(1.0, min=0.0)
    """Weight of the class-image loss."""
    feedback_weight: float = opt(1.0, min=0.0)
    """Loss weight of the favourited images `--feedback RUN` adds (1 = like a dataset photo)."""
    min_snr_gamma: float = opt(5.0, min=0.0)
    """Min-SNR-gamma loss weighting; 0 = off."""
    noise_offset: float = opt(0.0, min=0.0, max=1.0)
    """Noise offset (per-channel constant added to the noise); 0 = off."""
    caption_dropout: float = opt(0.0, min=0.0, max=1.0)
    """Probability of training a sample with an empty caption."""
    save_every: int = opt(250, min=0)
    """Write a resumable checkpoint every this many steps; 0 = only at the end."""
    keep_checkpoints: int = opt(3, min=1)
    """How many of the newest checkpoints to keep."""
    log_every: int = opt(10, min=1)
    """Write a metrics line every this many steps."""


@dataclass
class FlowConfig:
    timestep_sampler: str = opt("flux_shift", choices=vocab.TIMESTEP_SAMPLERS)
    """Flow-matching bases (FLUX.1): how noise levels are drawn. uniform; sigmoid (logit-normal); shift (a
    sigmoid draw pushed toward noise by flow.shift); flux_shift (pushed by FLUX.1's resolution-dependent
    shift, as its sampler does)."""
    sigmoid_mean: float = opt(0.0, min=-5.0, max=5.0)
    """Mean of the normal draw under the sigmoid (sigmoid, shift, flux_shift)."""
    sigmoid_scale: float = opt(1.0, min=0.01, max=10.0)
    """Standard deviation of the normal draw under the sigmoid."""
    shift: float = opt(3.0, min=0.01, max=100.0)
    """The fixed shift of timestep_sampler = "shift"."""
    guidance: float = opt(1.0, min=0.0, max=50.0)
    """FLUX.1-dev's embedded guidance scale during training (schnell has no guidance input and ignores it)."""


@dataclass
class SampleConfig:
    every: int = opt(250, min=0)
    """Write sample images every this many training steps; 0 = only at the end."""
    prompts: list[str] = opt(["a photo of [trigger] [class]", "a portrait of [trigger] [class] as an astronaut, oil painting"])
    """Prompts for samples; `[trigger]` and `[class]` are substituted."""
    negative_prompt: str = opt("")
    """Negative prompt for every sample."""
    seeds: list[int] = opt([1, 2])
    """One image per seed per prompt."""
    steps: int = opt(25, min=1, max=1000)
    """Denoising steps."""
    guidance: float = opt(7.5, min=0.0, max=50.0)
    """Classifier-free guidance scale."""
    width: int = opt(512, min=8, max=4096)
    """Image width in pixels (divisible by 8)."""
    height: int = opt(512, min=8, max=4096)
    """Image height in pixels (divisible by 8)."""
    scheduler: str = opt("ddim", choices=vocab.SAMPLERS)
    """Sampler."""
    scales: list[float] = opt([0.0, 0.5, 0.8, 1.0])
    """LoRA scales for `finetune sample` sheets; 0 = the base model."""
    watermark: bool = opt(True)
    """Embed the invisible watermark in generated images."""


@dataclass
class ExportConfig:
    formats: list[str] = opt(["peft", "kohya"])
    """Formats `finetune demo`/`export --all` writes: peft, kohya, merged, merged-diffusers."""
    dtype: str = opt("fp16", choices=vocab.EXPORT_DTYPES)
    """Tensor dtype of exported files."""
    scale: float = opt(1.0, min=0.0, max=4.0)
    """LoRA scale fused into merged checkpoints."""
    name: str = opt("")
    """Output name (kohya ss_output_name, file stem); empty = the run's name."""


@dataclass
class DpoConfig:
    pairs: str = opt("")
    """Preference pairs JSONL (`finetune review RUN --export`); empty = export them from the starting run's ratings."""
    beta: float = opt(5000.0, min=0.0)
    """Diffusion-DPO beta (strength of the pull towards the reference); 5000 as in Wallace et al. 2023 for SD 1.5."""
    held_out: float = opt(0.2, min=0.0, max=0.9)
    """Share of the pairs kept out of training to measure implicit reward accuracy before and after."""
    eval_timesteps: int = opt(8, min=1, max=1000)
    """Fixed, evenly spaced timesteps (each with fixed noise) per held-out pair for the accuracy report."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset preparation."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter shape."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """The flow-matching objective (FLUX.1 bases; SD bases refuse settings other than the defaults)."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Sample images."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Exported files."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """Diffusion-DPO on preference pairs (`finetune train-dpo`)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
            "flow": FlowConfig, "sample": SampleConfig, "export": ExportConfig, "dpo": DpoConfig}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _hint(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]  # right key, wrong section
    close = close or difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert `value` to field type `tp`, or raise TypeError. Strings come from --set or TOML."""
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.replace("_", ""))
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _check_range(key: str, value: Any, meta: dict, problems: list[str]) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta.get("choices") and v not in meta["choices"]:
            problems.append(f"{key} = {v!r} is not one of {', '.join(map(repr, meta['choices']))}")
        if meta.get("min") is not None and isinstance(v, (int, float)) and v < meta["min"]:
            problems.append(f"{key} = {v!r} is below the minimum {meta['min']}")
        if meta.get("max") is not None and isinstance(v, (int, float)) and v > meta["max"]:
            problems.append(f"{key} = {v!r} is above the maximum {meta['max']}")


def _cross_checks(cfg: RunConfig, problems: list[str]) -> None:
    if cfg.data.resolution % 64:
        problems.append(f"data.resolution = {cfg.data.resolution} must be a multiple of 64 (try {round(cfg.data.resolution / 64) * 64 or 64})")
    for k in ("width", "height"):
        v = getattr(cfg.sample, k)
        if v % 8:
            problems.append(f"sample.{k} = {v} must be divisible by 8")
    if cfg.sample.watermark and min(cfg.sample.width, cfg.sample.height) < 64:
        problems.append(f"sample.watermark = true needs samples of at least 64x64 px (sample.width = {cfg.sample.width}, "
                        f"sample.height = {cfg.sample.height}): make them larger or set sample.watermark = false")
    for fmt in cfg.export.formats:
        if fmt not in vocab.EXPORT_FORMATS:
            problems.append(f"export.formats has {fmt!r}: use {', '.join(vocab.EXPORT_FORMATS[:-1])} or "
                            f"{vocab.EXPORT_FORMATS[-1]}")


def from_dict(data: dict, problems: list[str] | None = None, source: str = "",
              overridden: typing.Collection[str] = ()) -> RunConfig:
    """Build a RunConfig from nested dicts, collecting every problem; raise ConfigError if any.

    `source` names where the values came from (a preset file) and `overridden` the dotted keys whose
    values came from `--set` instead (see `override_keys`), so each problem names its true origin."""
    own = problems is None
    problems = [] if own else problems

    def where(dotted: str) -> str:
        return " in --set" if dotted in overridden else f" in {source}" if source else ""

    sections = {}
    for name, section in data.items():
        keys = [f"{name}.{k}" for k in section] if isinstance(section, dict) else []
        from_set = bool(keys) and all(k in overridden for k in keys)
        here = " in --set" if from_set else f" in {source}" if source else ""
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, list(SECTIONS), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (sections: {', '.join(SECTIONS)})"
            problems.append(f"unknown section [{name}]{here}{hint}")
            continue
        if not isinstance(section, dict):
            problems.append(f"[{name}]{here} must be a table of keys, got {section!r}")
            continue
        sections[name] = section
    kwargs = {}
    for name, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, raw in sections.get(name, {}).items():
            dotted = f"{name}.{key}"
            if key not in fields:
                problems.append(f"unknown key {dotted}{where(dotted)}{_hint(dotted)}")
                continue
            try:
                value = _coerce(raw, hints[key])
            except (TypeError, ValueError):
                problems.append(f"{dotted} = {raw!r}{where(dotted)} should be {_type_name(hints[key])}")
                continue
            _check_range(dotted, value, fields[key].metadata, problems)
            values[key] = value
        kwargs[name] = cls(**values)
    cfg = RunConfig(**kwargs)
    _cross_checks(cfg, problems)
    if own and problems:
        raise ConfigError(problems)
    return cfg


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value (e.g. train.lr=2e-4)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def override_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The dotted keys that `--set` overrides give values to."""
    keys = set()
    for text in overrides:
        if "=" in text:
            keys.add(text.split("=", 1)[0].strip())
    return keys


def parse_literal(value: str) -> Any:
    """A --set value: a TOML literal when it parses as one ([1, 2], "x", 3e-4, true), else the raw text."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], problems: list[str]) -> dict:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if key.count(".") != 1:
            problems.append(f"--set {key}: keys are section.key, one of: {', '.join(SECTIONS)}{_hint(key)}")
            continue
        section, leaf = key.split(".")
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][leaf] = parse_literal(value)
    return data


def preset_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in str(name_or_path):
        if not p.is_file():
            raise ConfigError(f"preset file {str(p)!r} does not exist")
        return p
    candidate = PRESETS_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        names = list_presets()
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"no preset named {str(name_or_path)!r}{hint}; see `finetune presets list` ({', '.join(names)})")
    return candidate


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_preset(name_or_path: str | Path = "person-sd15-lora", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a preset (a name under presets/ or a path), apply `section.key=value` overrides, validate."""
    path = preset_path(name_or_path)
    problems: list[str] = []
    data = apply_overrides(read_toml(path), overrides, problems)
    cfg = from_dict(data, problems=problems, source=path.name, overridden=override_keys(overrides))
    if problems:
        raise ConfigError(problems)
    return cfg


def collect_config(preset: str | Path | None = None, overrides=()) -> tuple[RunConfig | None, list[str]]:
    """`load_config` that returns its problems instead of raising them: the config built from the valid
    values (an invalid one keeps its default, so checks that read it must be skipped), or None when the
    preset itself cannot be read."""
    problems: list[str] = []
    try:
        path = preset_path(preset) if preset is not None else None
        data = read_toml(path) if path is not None else {}
    except ConfigError as e:
        return None, e.problems
    data = apply_overrides(data, overrides, problems)
    cfg = from_dict(data, problems=problems, source=path.name if path else "", overridden=override_keys(overrides))
    return cfg, problems


def load_config(preset: str | Path | None = None, overrides=(), base: dict | None = None) -> RunConfig:
    """A preset, or the defaults (or a resolved config dict, e.g. a run's config.json), plus overrides."""
    if preset is not None:
        return load_preset(preset, overrides)
    problems: list[str] = []
    data = apply_overrides(base or {}, overrides, problems)
    cfg = from_dict(data, problems=problems, overridden=override_keys(overrides))
    if problems:
        raise ConfigError(problems)
    return cfg


def load_run_config(path: Path) -> RunConfig:
    """A run's resolved config.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read run config {path}: {e}") from None
    return load_config(base=data)


def describe(cfg: RunConfig) -> str:
    """TOML-ish listing of a config with each field's docstring, for `presets show`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        docs = field_docs(cls)
        section = getattr(cfg, name)
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            lines.append(f"{f.name} = {json.dumps(value)}  # {docs.get(f.name, '')}")
        lines.append("")
    return "\n".join(lines)

"""`finetune sample`: prompts x seeds x LoRA scales (or checkpoints) -> images, contact sheets, a gallery.

How a person decides whether a run worked, which checkpoint to keep and what LoRA strength to use:
for each prompt, one contact sheet whose rows are LoRA scales (scale 0 = the base model, so base and
tuned sit side by side) or checkpoints, and whose columns are seeds; every image as its own PNG; an
index.html over all of it. Every PNG carries its provenance (finetune.provenance) and, unless turned
off, the invisible watermark (finetune.watermark).

- Bases: every model family (finetune.models.families: embedded test bases such as `tiny`, diffusers
  folders, single files, hub ids), each with its own pipeline class; the sampler choices map onto either one's scheduler config.
- Sources: a run folder (its lora/, or its checkpoints), and/or LoRA files in the peft (diffusers) or
  kohya layout. Every LoRA is checked against the base before the first image (`lora_io.check_fits`:
  its header's architecture and its modules' sizes; an error names both architectures otherwise),
  then loaded with diffusers' `load_lora_weights`, which reads both layouts. Several LoRAs load together as named adapters, each with its own weight; a row at
  scale s runs every adapter at s x its weight (`set_adapters`).
- Settings and prompts default to the run's `sample` config; for LoRA files alone, to the training
  config recorded in the first one's header (`finetune.config`), else to the defaults at the base's
  native size. A pipeline call slower than STEP_PROGRESS_AFTER seconds shows its denoising steps.
- The base row is generated once, with no adapter loaded, and reused: the scale-0 images are the base
  model's exactly.
- Deterministic: every image has its own CPU `torch.Generator` seeded with its seed, so a seed gives
  the same starting noise whatever the batch or device, and the same settings give the same image on
  the same machine (another batch size may change a pixel by one level: other kernels). All seeds of
  a row go through the pipeline in one call (batch_size caps it; on a CUDA out-of-memory error the
  batch is halved and retried).
- Output: <out>/index.html, <out>/gallery.json (every image's settings), <out>/pNN/sheet.png and
  <out>/pNN/<row>-seed<S>.png. The folder is built under a temporary name and renamed when complete.
  Default <out>: <run>/gallery/<timestamp>/ for a run, else outputs/samples-<timestamp>/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from finetune import runs, vocab
from finetune.errors import FinetuneError
from finetune.filemode import follow_umask

SCHEDULERS = vocab.SAMPLERS


# ---------------------------------------------------------------- settings and inputs
@dataclass
class SheetSettings:
    """How every image of a gallery is made (a prompt may override negative/size)."""

    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """One column per seed."""
    scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.8, 1.0])
    """One row per LoRA scale; 0 = the base model."""
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    """0 (with height 0) = the base model's native size, known once it is loaded."""
    height: int = 512
    scheduler: str = "ddim"
    """ddim | euler | euler-a | dpmpp-2m (SD); flow-euler (FLUX.1)"""
    negative: str = ""
    """Negative prompt for prompts that have none of their own."""
    watermark: bool = True
    batch_size: int = 0
    """Images per pipeline call; 0 = all seeds of a row at once."""

    @classmethod
    def from_config(cls, s) -> SheetSettings:
        """From a config's `sample` section (finetune.config.SampleConfig)."""
        return cls(seeds=list(s.seeds), scales=list(s.scales), steps=s.steps, guidance=s.guidance, width=s.width,
                   height=s.height, scheduler=s.scheduler, negative=s.negative_prompt, watermark=s.watermark)

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise FinetuneError(f"unknown scheduler {self.scheduler!r} (--scheduler): choose one of {', '.join(SCHEDULERS)}")
        if (self.width, self.height) != (0, 0):  # 0x0: the base's native size, checked once known
            check_size(self.width, self.height, "--size")
            if self.watermark:
                check_watermark_size(self.width, self.height, "--size")
        if not self.seeds:
            raise FinetuneError("no seeds (--seeds): give at least one, e.g. --seeds 1,2,3")
        if not self.scales:
            raise FinetuneError("no LoRA scales (--scales): give at least one, e.g. --scales 0,0.5,1")
        if self.steps < 1:
            raise FinetuneError(f"--steps {self.steps} must be at least 1")
        if self.batch_size < 0:
            raise FinetuneError(f"--batch-size {self.batch_size} must be 0 (all seeds at once) or more")


def check_size(width: int, height: int, where: str) -> None:
    if width < 8 or height < 8 or width % 8 or height % 8:
        fix = f"{max(8, round(width / 8) * 8)}x{max(8, round(height / 8) * 8)}"
        raise FinetuneError(f"{where} {width}x{height}: width and height must be multiples of 8 "
                            f"(the VAE works on 8x8 pixel blocks), e.g. {fix}")


def check_watermark_size(width: int, height: int, where: str) -> None:
    from finetune.watermark import PAYLOAD, capacity

    if capacity(width, height) < len(PAYLOAD) * 8:
        raise FinetuneError(f"{where} {width}x{height} is too small for the invisible watermark (it needs at least "
                            "64x64 px): use a larger size or --no-watermark")


@dataclass
class Prompt:
    """One prompt of a sheet; None = the sheet's setting."""

    text: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class LoraFile:
    """A LoRA to apply: a .safetensors file (peft or kohya layout) or a folder holding the adapter file (runs.WEIGHT_NAME)."""

    path: Path
    weight: float = 1.0
    """Relative strength: a row at scale s applies it at s x weight."""
    name: str = ""
    """Name in `<lora:name:scale>` (default: the run's or the file's name)."""

    def __post_init__(self):
        self.path = Path(self.path)
        if not self.name:
            self.name = self.path.stem if self.path.suffix else self.path.name

    @property
    def file(self) -> Path:
        return runs.adapter_file(self.path) if self.path.is_dir() else self.path


def parse_lora_arg(text: str) -> LoraFile:
    """`FILE` or `FILE:WEIGHT` (the CLI's --lora)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and re.fullmatch(r"-?\d+(\.\d*)?|-?\.\d+", weight):
        return LoraFile(Path(path), float(weight))
    return LoraFile(Path(text))


def parse_size(text: str, where: str = "--size") -> tuple[int, int]:
    """`WxH` or `N` (square)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(text))
    if not m:
        raise FinetuneError(f"{where} {text!r} is not a size: write WIDTHxHEIGHT, e.g. 512x768")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    check_size(w, h, where)
    return w, h


def parse_list(text: str, kind, where: str) -> list:
    try:
        return [kind(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise FinetuneError(f"{where} {text!r}: write a comma-separated list, e.g. {where} 1,2,3") from None


PROMPT_KEYS = {"prompt", "negative", "size"}


def read_prompts(path: Path) -> list[Prompt]:
    """A prompts file: one prompt per line (blank lines and # comments skipped), or a .toml with
    `negative = "..."` (default for all) and `[[prompts]]` tables of prompt / negative / size ("WxH")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FinetuneError(f"cannot read the prompts file {path}: {e.strerror or e}") from None
    if path.suffix.lower() != ".toml":
        return [Prompt(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FinetuneError(f"{path} is not valid TOML: {e}") from None
    unknown = set(data) - {"negative", "prompts"}
    if unknown:
        raise FinetuneError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a prompts file holds `negative` "
                            "and [[prompts]] tables with prompt / negative / size")
    default_negative = data.get("negative")
    prompts = []
    for i, item in enumerate(data.get("prompts", []), 1):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise FinetuneError(f"{path}: prompts[{i}] needs a `prompt` string")
        bad = set(item) - PROMPT_KEYS
        if bad:
            raise FinetuneError(f"{path}: prompts[{i}] has unknown key(s) {', '.join(sorted(bad))}; "
                                f"use {', '.join(sorted(PROMPT_KEYS))}")
        w = h = None
        if "size" in item:
            w, h = parse_size(item["size"], f"{path}: prompts[{i}].size")
        prompts.append(Prompt(item["prompt"].strip(), item.get("negative", default_negative), w, h))
    return prompts


def substitute(text: str, trigger: str, class_word: str, where: str = "prompt") -> str:
    if "[trigger]" in text and not trigger:
        raise FinetuneError(f"{where} {text!r} uses [trigger], but no trigger word is known (no run folder, no "
                            "finetune.trigger in the LoRA's metadata): write the word into the prompt")
    return text.replace("[trigger]", trigger).replace("[class]", class_word or "person")


# ---------------------------------------------------------------- runs and LoRA files
def lora_hash(path: Path) -> str:
    """A1111's short LoRA hash: sha256 of the tensor data after the safetensors header, 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def list_checkpoints(run: Path) -> list[str]:
    """Names of the run's complete checkpoints, oldest first (runs.checkpoint_problem)."""
    return [p.name for _, p in runs.complete_checkpoints(run)]


def resolve_checkpoints(run: Path, spec: str | Sequence[str]) -> list[tuple[str, Path]]:
    """`all` or names (step-N, N, final; runs.find_checkpoint) -> [(label, lora folder)].

    With `all`, a checkpoint whose weights are the final LoRA's (the one saved at the last step) is
    left out: it would render the same images as the `final` row."""
    final, available = runs.final_lora(run), list_checkpoints(run)
    names = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    if names == ["all"]:
        out = [(c, run / runs.CHECKPOINTS / c / runs.LORA_DIR) for c in available]
        if final.is_file():
            final_weights = lora_hash(final)
            out = [(c, folder) for c, folder in out if lora_hash(runs.adapter_file(folder)) != final_weights]
            out.append(("final", final.parent))
        if not out:
            raise FinetuneError(f"{run} has no complete checkpoints and no {runs.LORA_DIR}/ yet")
        return out
    out = []
    for name in names:
        if name == "final":
            if not final.is_file():
                raise FinetuneError(f"{final} does not exist: the run has not finished")
            out.append(("final", final.parent))
            continue
        m = runs.STEP_NAME.fullmatch(name)
        label = runs.checkpoint_name(int(m.group(1))) if m else name
        if label not in available:  # a sheet's rows: the run's complete checkpoints and final
            have = ", ".join(available + (["final"] if final.is_file() else [])) or "none"
            raise FinetuneError(f"--checkpoints {name}: {run} has no complete checkpoint {label} (available: {have})")
        folder = runs.find_checkpoint(run, label, resume=False, option="--checkpoints")
        out.append((folder.name, folder / runs.LORA_DIR))
    return out


def read_run(run: Path) -> tuple[dict, object]:
    """run.json and the resolved config of a run folder."""
    run = Path(run)
    if not (run / runs.RUN_INFO).is_file() or not (run / runs.CONFIG).is_file():
        raise FinetuneError(f"{run} is not a run folder (no {runs.RUN_INFO}/{runs.CONFIG}): pass a folder that "
                            "`finetune train` wrote, or LoRA files with --lora")
    return runs.read_info(run), runs.read_config(run)


def recorded_config(loras: Sequence[LoraFile]):
    """The training config recorded in the first of `loras` whose header holds one (`finetune.config`,
    written by `finetune train` and kept by every export), else None."""
    from finetune.config import load_config
    from finetune.errors import ConfigError
    from finetune.lora_io import read_header

    for lo in loras:
        if not lo.file.is_file():
            continue  # make_plan names the missing file
        text = read_header(lo.file)[1].get("finetune.config")
        if not text:
            continue
        try:
            return load_config(base=json.loads(text))
        except (json.JSONDecodeError, ConfigError) as e:
            raise FinetuneError(f"{lo.file}: its recorded training config (finetune.config) cannot be read ({e}); "
                                "give the sampling settings yourself (--steps, --size, -p)") from None
    return None


def default_settings(run: Path | None, loras: Sequence[LoraFile] = ()) -> SheetSettings:
    """The run's `sample` settings; else those recorded in a LoRA file; else the config defaults at the
    base's native size (a LoRA from another tool, or the base alone)."""
    from finetune.config import SampleConfig

    if run:
        return SheetSettings.from_config(read_run(run)[1].sample)
    cfg = recorded_config(loras)
    if cfg is not None:
        return SheetSettings.from_config(cfg.sample)
    return replace(SheetSettings.from_config(SampleConfig()), width=0, height=0)


def default_prompts(run: Path | None, loras: Sequence[LoraFile] = ()) -> list[Prompt]:
    """The run's sample prompts, else those recorded in a LoRA file (when it has any), else the defaults."""
    from finetune.config import SampleConfig

    if run:
        return [Prompt(p) for p in read_run(run)[1].sample.prompts]
    cfg = recorded_config(loras)
    return [Prompt(p) for p in (cfg.sample.prompts if cfg is not None and cfg.sample.prompts
                                else SampleConfig().prompts)]


def native_size(pipe) -> tuple[int, int]:
    """The size a base model makes by default: its pipeline's (else its denoiser's) sample size in latents
    x the VAE's factor."""
    from finetune.models import families

    size = (getattr(pipe, "default_sample_size", None)
            or getattr(pipe, families.of_pipeline(pipe).denoiser).config.sample_size)
    h, w = (size, size) if isinstance(size, int) else size
    return w * pipe.vae_scale_factor, h * pipe.vae_scale_factor


# ---------------------------------------------------------------- the plan
@dataclass
class Row:
    """One row of every sheet: the base model, or a set of adapters at one scale."""

    label: str
    key: str
    """File-name part: base, scale-0.5, step-000200, step-000200-scale-0.5."""
    scale: float
    checkpoint: str | None
    adapters: list[tuple[str, float]]
    """(adapter name, weight) to set; empty = the base model."""
    loras: list[tuple[str, float]]
    """(name, scale) for <lora:name:scale>."""


@dataclass
class AdapterSet:
    """LoRAs loaded together: a run's LoRA or one of its checkpoints, plus any --lora files."""

    checkpoint: str | None
    loras: list[LoraFile]


def _num(x: float) -> str:
    return f"{x:g}".replace("-", "neg")


def plan_rows(sets: list[AdapterSet], scales: list[float]) -> list[Row]:
    scales = list(dict.fromkeys(float(s) for s in scales))
    nonzero = [s for s in scales if s != 0.0]
    rows = []
    if not sets or len(nonzero) < len(scales):
        rows.append(Row("base" if not sets or sets[0].checkpoint else "scale 0 (base)", "base", 0.0, None, [],
                        [(lo.name, 0.0) for lo in sets[0].loras] if sets else []))
    for n, s in enumerate(sets):
        for scale in nonzero:
            adapters = [(f"a{n}_{i}", scale * lo.weight) for i, lo in enumerate(s.loras)]
            loras = [(lo.name, scale * lo.weight) for lo in s.loras]
            if s.checkpoint is None:
                label, key = f"scale {scale:g}", f"scale-{_num(scale)}"
            elif nonzero == [1.0]:
                label, key = s.checkpoint, s.checkpoint
            else:
                label, key = f"{s.checkpoint} × {scale:g}", f"{s.checkpoint}-scale-{_num(scale)}"
            rows.append(Row(label, key, scale, s.checkpoint, adapters, loras))
    return rows


# ---------------------------------------------------------------- generation
def _scheduler(pipe, name: str):
    import diffusers

    from finetune.train.samples import SAMPLERS, check_sampler

    check_sampler(pipe, name)
    cls_name, extra, _ = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def a1111_sampler(name: str) -> str:
    from finetune.train.samples import SAMPLERS

    return SAMPLERS[name][2]


STEP_PROGRESS_AFTER = 3.0
"""Seconds: a pipeline call still running after this long shows its denoising steps."""


def _generate(pipe, prompt: str, negative: str, seeds: list[int], s: SheetSettings, w: int, h: int, batch: list[int],
              progress: bool = False):
    """Images for `seeds` (one CPU generator per image), `batch[0]` at a time; halved on CUDA OOM. With
    `progress`, a call that takes longer than STEP_PROGRESS_AFTER seconds shows a bar of its denoising
    steps (a large image on a slow device takes minutes before the image count moves)."""
    import torch
    from tqdm.auto import tqdm

    def step_done(pipe, step, timestep, tensors):
        steps.update(1)
        if steps.n == steps.total and steps._time() - steps.start_t >= steps.delay:
            steps.refresh()  # tqdm's rate limit may skip the last step; a finished image shows n/n
        return tensors

    images, i = [], 0
    while i < len(seeds):
        chunk = seeds[i: i + batch[0]]
        steps = tqdm(total=s.steps, desc=f"  {len(chunk)} image{'s' if len(chunk) > 1 else ''} {w}x{h}",
                     unit="step", leave=False, delay=STEP_PROGRESS_AFTER, disable=not progress)
        try:
            out = pipe([prompt] * len(chunk), negative_prompt=[negative] * len(chunk) if negative else None,
                       num_inference_steps=s.steps, guidance_scale=s.guidance, width=w, height=h,
                       generator=[torch.Generator("cpu").manual_seed(seed) for seed in chunk],
                       callback_on_step_end=step_done).images
        except torch.cuda.OutOfMemoryError:
            if batch[0] == 1:
                raise FinetuneError(f"out of GPU memory at one {w}x{h} image: use a smaller --size") from None
            torch.cuda.empty_cache()
            batch[0] = max(1, batch[0] // 2)
            tqdm.write(f"out of GPU memory: batches of {batch[0]} from now on")
            continue
        finally:
            steps.close()
        images += out
        i += len(chunk)
    return images


@contextmanager
def _quiet_lora_loading():
    """diffusers, transformers and peft narrate a normal LoRA load (no text-encoder keys, a second
    adapter, a key report of the base weights a LoRA does not hold). lora_io.load_lora has already
    checked the fit, so only errors get through."""
    import warnings

    import diffusers
    import transformers

    tlog = transformers.utils.logging
    levels = diffusers.utils.logging.get_verbosity(), tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    diffusers.utils.logging.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            warnings.filterwarnings("ignore", message="While injecting the PEFT adapters")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()


def check_loras(plan: "Plan", base) -> None:
    """Refuse, before anything is generated, a LoRA made for another architecture than the base's."""
    from finetune.lora_io import check_fits, read_lora, to_layers

    for file in dict.fromkeys(lo.file for aset in plan.sets for lo in aset.loras):
        tensors, metadata, layout = read_lora(file)
        check_fits(to_layers(tensors, metadata, layout), base.pipe, lora_name=str(file), base_name=base.name,
                   arch=base.arch, metadata=metadata)


def _default_out(run: Path | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = run / runs.GALLERY if run else Path("outputs")
    name = stamp if run else f"samples-{stamp}"
    out, n = parent / name, 1
    while out.exists():
        n += 1
        out = parent / f"{name}-{n}"
    return out


def _load_base(spec: str, run_cfg):
    import torch

    from finetune.models import load_base

    cuda = torch.cuda.is_available()
    kwargs = {}
    if run_cfg is not None:
        kwargs = dict(config=run_cfg.model.config, allow_pickle=run_cfg.model.allow_pickle)
    base = load_base(spec, dtype="fp16" if cuda else None, **kwargs)
    if cuda:
        base.pipe.to("cuda")
    return base


@dataclass
class Plan:
    """Everything decided before a model is loaded, so that bad input fails at once."""

    run: Path | None
    run_info: dict
    run_cfg: object
    settings: SheetSettings
    texts: list[str]
    """The prompts, [trigger] and [class] substituted."""
    negatives: list[str]
    sizes: list[tuple[int, int]]
    seeds: list[int]
    sets: list[AdapterSet]
    rows: list[Row]
    base_spec: str | None
    """The run's base, else the first LoRA's finetune.base metadata."""


def make_plan(run: Path | None, loras: list[LoraFile], prompts: Sequence[Prompt | str] | None,
              settings: SheetSettings | None, checkpoints) -> Plan:
    from finetune.lora_io import read_header

    run_info, run_cfg = read_run(run) if run else ({}, None)
    settings = settings or default_settings(run, loras)
    settings.validate()
    prompts = [p if isinstance(p, Prompt) else Prompt(p)
               for p in (default_prompts(run, loras) if prompts is None else prompts)]
    prompts = [p for p in prompts if p.text.strip()]
    if not prompts:
        raise FinetuneError("no prompts to sample: give -p PROMPT or --prompts FILE with at least one non-empty line")
    for lo in loras:
        if not lo.file.is_file():
            raise FinetuneError(f"LoRA {lo.path} not found (a .safetensors file, or a folder holding {runs.WEIGHT_NAME})")
    headers = [read_header(lo.file)[1] for lo in loras]

    # What to load: the run's LoRA (or each checkpoint's), with any LoRA files beside it.
    if run:
        if checkpoints:
            primary = [(label, LoraFile(folder, name=run.name)) for label, folder in resolve_checkpoints(run, checkpoints)]
        elif runs.is_finished(run):
            primary = [(None, LoraFile(runs.final_lora(run).parent, name=run.name))]
        else:  # unfinished: its newest complete checkpoint, as export takes it (both say so)
            have = list_checkpoints(run)
            if not have:
                raise FinetuneError(f"{run} has no lora/ and no complete checkpoint yet: nothing to sample; let "
                                    "training save a checkpoint (train.save_every) or finish")
            primary = [(have[-1], LoraFile(run / runs.CHECKPOINTS / have[-1] / runs.LORA_DIR, name=run.name))]
        sets = [AdapterSet(label, [lo, *loras]) for label, lo in primary]
    else:
        if checkpoints:
            raise FinetuneError("--checkpoints needs a run folder (RUN_DIR)")
        sets = [AdapterSet(None, loras)] if loras else []

    trigger = run_info.get("trigger") or (run_cfg.data.trigger if run_cfg else "")
    class_word = run_info.get("class_word") or (run_cfg.data.class_word if run_cfg else "")
    for h in headers:
        trigger = trigger or h.get("finetune.trigger", "")
        class_word = class_word or h.get("finetune.class_word", "")
    sizes = []
    for p in prompts:
        w, h = p.width or settings.width, p.height or settings.height
        if settings.watermark and w and h:
            check_watermark_size(w, h, f"prompt {p.text!r} size")
        sizes.append((w, h))
    return Plan(run=run, run_info=run_info, run_cfg=run_cfg, settings=settings,
                texts=[substitute(p.text, trigger, class_word) for p in prompts],
                negatives=[settings.negative if p.negative is None else p.negative for p in prompts], sizes=sizes,
                seeds=list(dict.fromkeys(int(x) for x in settings.seeds)), sets=sets,
                rows=plan_rows(sets, settings.scales),
                base_spec=run_info.get("base") or next((h["finetune.base"] for h in headers if h.get("finetune.base")), None))


def use_native_size(plan: Plan, base) -> None:
    """Put the base's native size where the settings left the size to it (width and height 0)."""
    s = plan.settings
    if (s.width, s.height) != (0, 0):
        return
    w, h = native_size(base.pipe)
    plan.settings = replace(s, width=w, height=h)
    plan.sizes = [(pw or w, ph or h) for pw, ph in plan.sizes]
    if s.watermark:
        for text, size in zip(plan.texts, plan.sizes):
            check_watermark_size(*size, f"{base.spec}'s native size for prompt {text!r}:")


@dataclass
class Made:
    """One generated image: the pixels (for the sheet) and its gallery record."""

    image: object
    record: dict


def generate_all(plan: Plan, base, model_hash: str, folder: Path, progress: bool) -> dict[tuple[int, str], list[Made]]:
    """Every image of every row, written to `folder`/pNN/<row>-seed<S>.png with its provenance.

    The base row comes first, before any adapter is loaded; then each adapter set is loaded (checked
    against the base) and its rows are generated with `set_adapters`. PNGs are encoded (and
    watermarked) on writer threads while the next batch generates: zlib and most of numpy release the
    GIL, and on a GPU the encoding would otherwise add a good part of a generation's time."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from finetune.lora_io import load_lora
    from finetune.provenance import GenerationInfo, save_generated_png

    s, pipe = plan.settings, base.pipe
    made: dict[tuple[int, str], list[Made]] = {}
    batch = [s.batch_size or len(plan.seeds)]
    bar = tqdm(total=len(plan.texts) * len(plan.rows) * len(plan.seeds), desc="sampling", unit="img",
               disable=not progress)

    def generate_row(row: Row, hashes: dict[str, str]) -> None:
        for i, text in enumerate(plan.texts):
            w, h = plan.sizes[i]
            for seed, image in zip(plan.seeds, _generate(pipe, text, plan.negatives[i], plan.seeds, s, w, h, batch,
                                                   progress)):
                extra = {}
                if plan.sets:
                    extra["LoRA scale"] = f"{row.scale:g}" + ("" if row.adapters else " (base model)")
                if row.checkpoint:
                    extra["Checkpoint"] = row.checkpoint
                if hashes:
                    extra["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in hashes.items())
                info = GenerationInfo(prompt=text, negative_prompt=plan.negatives[i], steps=s.steps,
                                      sampler=a1111_sampler(s.scheduler), cfg_scale=s.guidance, seed=seed, width=w,
                                      height=h, model_name=base.name, model_hash=model_hash, loras=row.loras,
                                      extra=extra)
                rel = f"p{i + 1:02d}/{row.key}-seed{seed}.png"
                writes.append(writer.submit(save_generated_png, image, folder / rel, info, watermark=s.watermark))
                writes[-1].add_done_callback(lambda _: bar.update(1))
                made.setdefault((i, row.key), []).append(Made(image, {
                    "file": rel, "row": row.label, "seed": seed, "scale": row.scale, "checkpoint": row.checkpoint,
                    "loras": [list(x) for x in row.loras], "parameters": info.parameters()}))

    writer, writes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="png"), []
    try:
        if plan.rows[0].key == "base":
            generate_row(plan.rows[0], {})
        for n, aset in enumerate(plan.sets):
            pipe.unload_lora_weights()
            names = [f"a{n}_{i}" for i in range(len(aset.loras))]
            for name, lo in zip(names, aset.loras):
                with _quiet_lora_loading():
                    load_lora(pipe, lo.file, adapter_name=name, base_name=base.name, arch=base.arch)
            hashes = {lo.name: lora_hash(lo.file) for lo in aset.loras}
            for row in plan.rows:
                if row.adapters and row.adapters[0][0] in names:
                    pipe.set_adapters([a for a, _ in row.adapters], adapter_weights=[wt for _, wt in row.adapters])
                    generate_row(row, hashes)
        for w in writes:
            w.result()  # a failed write raises here
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return made


def write_gallery(plan: Plan, base, model_hash: str, folder: Path, made: dict[tuple[int, str], list[Made]],
                  title: str) -> None:
    """Contact sheets (pNN/sheet.png, with provenance), index.html and gallery.json into `folder`."""
    from finetune.gallery import contact_sheet, index_html
    from finetune.lora_io import describe_base_architecture
    from finetune.provenance import GenerationInfo, save_generated_png

    s, rows, seeds = plan.settings, plan.rows, plan.seeds
    sampler = a1111_sampler(s.scheduler)
    prompts = []
    for i, text in enumerate(plan.texts):
        w, h = plan.sizes[i]
        negative = plan.negatives[i]
        grid = [[m.image for m in made[i, row.key]] for row in rows]
        sheet, layout = contact_sheet(grid, [r.label for r in rows], [f"seed {x}" for x in seeds],
                                      text + (f"   (negative: {negative})" if negative else ""))
        info = GenerationInfo(prompt=text, negative_prompt=negative, steps=s.steps, sampler=sampler,
                              cfg_scale=s.guidance, seed=seeds[0], width=w, height=h, model_name=base.name,
                              model_hash=model_hash, extra={"Sheet rows": "; ".join(r.label for r in rows),
                                                            "Sheet columns": "seeds " + " ".join(map(str, seeds))})
        rel = f"p{i + 1:02d}/sheet.png"
        save_generated_png(sheet, folder / rel, info, watermark=s.watermark)
        prompts.append({"prompt": text, "negative": negative, "size": [w, h], "sheet": rel, "columns": len(seeds),
                        "layout": asdict(layout), "images": [m.record for row in rows for m in made[i, row.key]]})

    loras = plan.sets[0].loras if plan.sets else []
    checkpoints = [a.checkpoint for a in plan.sets if a.checkpoint]
    summary = {
        "Run": str(plan.run) if plan.run else "-",
        "LoRAs": ", ".join(f"{lo.name} ({lo.file}, weight {lo.weight:g})" for lo in loras) or "-",
        "Checkpoints": ", ".join(checkpoints) or "-",
        "Base": f"{base.spec}, {describe_base_architecture(base.pipe, base.arch)}, hash {model_hash[:10]}",
        "Rows": "; ".join(r.label for r in rows),
        "Seeds": ", ".join(map(str, seeds)),
        "Steps": s.steps, "Sampler": f"{s.scheduler} ({sampler})", "CFG scale": f"{s.guidance:g}",
        "Size": f"{s.width}x{s.height}", "Watermark": "on" if s.watermark else "off",
    }
    (folder / "index.html").write_text(index_html(title, summary, prompts), encoding="utf-8")
    record = {"schema": 1, "tool": "finetune", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "run": str(plan.run) if plan.run else None, "base": base.spec, "base_hash": model_hash,
              "loras": [{"name": lo.name, "file": str(lo.file), "weight": lo.weight} for lo in loras],
              "checkpoints": checkpoints, "settings": asdict(replace(s, seeds=seeds)),
              "rows": [asdict(r) for r in rows], "prompts": prompts,
              "title": title, "summary": summary}  # what `finetune score` needs to re-render index.html
    (folder / "gallery.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def sample(run: Path | str | None = None, *, loras: Sequence[LoraFile | Path | str] = (), base=None,
           prompts: Sequence[Prompt | str] | None = None, settings: SheetSettings | None = None,
           checkpoints: str | Sequence[str] | None = None, out: Path | str | None = None,
           progress: bool = True, echo=print) -> Path:
    """Generate the gallery and return its folder.

    run: a run folder (its lora/, or `checkpoints`: "all" or names like step-200, final);
    loras: LoRA files/folders (peft or kohya layout), applied together with the run's;
    base: a spec (tiny, hub id, folder, file) or a loaded finetune.models.Base (left as it was found);
        default: the run's base, else the first LoRA's finetune.base metadata;
    prompts/settings: default to the run's `sample` config (else the config defaults);
    out: default <run>/gallery/<time>/, else outputs/samples-<time>/; must not exist or be empty.
    An unfinished run (no lora/ yet) is sampled at its newest complete checkpoint, with a warning.
    """
    import torch

    from finetune.models import Base

    run = Path(run) if run is not None else None
    plan = make_plan(run, [lo if isinstance(lo, LoraFile) else LoraFile(Path(lo)) for lo in loras], prompts, settings,
                     checkpoints)
    out = Path(out) if out else _default_out(run)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(f"{out} already exists and is not empty: choose another --out")
    if run is not None:
        if (note := runs.unfinished_note(run)) is not None:
            echo(f"warning: {note}")

    if not isinstance(base, Base):
        spec = base or plan.base_spec
        if not spec:
            raise FinetuneError("which base model? pass --base (tiny, a hub id, a diffusers folder or a single file)")
        base = _load_base(str(spec), plan.run_cfg)
    use_native_size(plan, base)
    check_loras(plan, base)
    # The run recorded its base's hash: no need to hash gigabytes again when it is the same base.
    same = plan.run_info.get("base_hash") and base.spec == plan.run_info.get("base")
    model_hash = plan.run_info["base_hash"] if same else base.model_hash()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    pipe = base.pipe
    original_scheduler = pipe.scheduler
    try:
        pipe.scheduler = _scheduler(pipe, plan.settings.scheduler)
        with torch.no_grad():
            made = generate_all(plan, base, model_hash, tmp, progress)
        write_gallery(plan, base, model_hash, tmp, made, f"finetune sample — {run.name if run else out.name}")
        follow_umask(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.scheduler = original_scheduler
        if plan.sets:
            pipe.unload_lora_weights()
    return out

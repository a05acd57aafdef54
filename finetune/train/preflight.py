"""What `finetune train` checks before it imports torch or loads a model, all problems at once.

Importing torch, diffusers and accelerate takes 5-10 s, and loading a base longer; a config typo, a
missing dataset, a run folder that is taken, fp16 on a CPU or a dataset prepared at another resolution
need none of that. This module reads only the config and small files (the dataset's manifest and
dataset.json, the run folder's listing, a base's configs or safetensors header), so the CLI answers in
well under a second, and reports every such problem in one message instead of one per attempt.
`setup` (train/lora.py) runs the same checks, so the Python API refuses the same things; the checks
that need the real device or the model (the accelerator's device, LoRA targets) stay there.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

from finetune.config import RunConfig, all_keys
from finetune.errors import ConfigError, FinetuneError
from finetune import runs
from finetune.runs import complete_checkpoints

FP16_ON_CPU = ("train.mixed_precision = 'fp16' needs a CUDA GPU (fp16 training on a CPU has no loss scaling and "
               "is slower than fp32); use --set train.mixed_precision=auto, =bf16 or =no")
XFORMERS_MISSING = ("train.attention = 'xformers' but xformers is not installed: on a CUDA machine run "
                    "`pip install finetune[xformers]`, or use --set train.attention=sdpa")



class Problems(FinetuneError):
    """Several problems found before any work started, one per line; exit 2 if any is a config problem."""

    def __init__(self, problems: list[str], config_problems: int = 0):
        self.problems = list(problems)
        self.exit_code = 2 if config_problems else 1
        super().__init__(f"{len(self.problems)} problems, nothing was started:\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


def check_before_loading(cfg: RunConfig | None, dataset: Path, out: Path | None = None, *,
                         preset: str | None = None, resume: str | Path | None = None,
                         feedback: Path | None = None, config_problems: list[str] | tuple = ()) -> Path:
    """Raise every problem found without torch or a model (with `config_problems`, those of loading the
    config); return the run folder. `cfg` may be None (the preset could not be read) or built from the
    valid values only: checks that read a key named in `config_problems` are then skipped."""
    unsure = _keys_named(config_problems)
    problems: list[str] = []
    dataset = Path(dataset)
    run_dir = Path(out) if out is not None else default_run_dir(dataset, preset, feedback)
    problems += filter(None, [dataset_problem(dataset), run_folder_problem(run_dir, resume)])
    if cfg is not None:
        if not unsure & {"model.base"}:
            from finetune.models.load import missing_base

            problems += filter(None, [missing_base(cfg.model.base)])
        if not unsure & {"train.mixed_precision"} and cfg.train.mixed_precision == "fp16" and cuda_impossible():
            problems.append(FP16_ON_CPU)
        if cuda_impossible():
            from finetune.models.quantize import needs_cuda

            problems += [needs_cuda(key, value) for key, value in (("model.quantize", cfg.model.quantize),
                                                                   ("model.offload", cfg.model.offload))
                         if value != "none" and not unsure & {key}]
        if not unsure & {"train.attention"}:
            problems += filter(None, [attention_problem(cfg.train.attention, "cpu" if cuda_impossible() else None)])
        if not unsure & {"data.resolution", "model.base"} and dataset.is_dir() and _is_prepared(dataset):
            problems += filter(None, [resolution_problem(cfg, dataset, preset)])
    if config_problems and not problems:
        raise ConfigError(list(config_problems))
    if len(problems) == 1 and not config_problems:
        raise FinetuneError(problems[0])
    if problems:
        raise Problems([f"invalid config: {p}" for p in config_problems] + problems, len(config_problems))
    return run_dir


def _keys_named(problems) -> set[str]:
    """The config keys that problem messages name (a check reading one of them would judge a guess)."""
    return {k for k in all_keys() for p in problems if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", p)}


def _is_prepared(folder: Path) -> bool:
    from finetune.train.data import is_prepared

    return is_prepared(folder)


def default_run_dir(dataset: Path, preset: str | None, feedback: Path | None = None) -> Path:
    """outputs/<dataset name>-<preset name>; with `--feedback RUN`, outputs/<RUN's name>-feedback (the
    default would otherwise be the rated run itself, which is taken)."""
    if feedback is not None:
        return runs.default_run_dir(f"{Path(feedback).resolve().name}-feedback")
    return runs.default_run_dir(f"{Path(dataset).name}-{Path(preset).stem if preset else 'run'}")


def dataset_problem(path: Path) -> str | None:
    """Why `--dataset path` cannot be trained on or prepared, or None."""
    from finetune.data.sources import IMAGE_EXTENSIONS

    path = Path(path)
    if not path.exists():
        return f"dataset folder {path} does not exist"
    if not path.is_dir():
        return f"--dataset {path} is a file: pass a prepared dataset folder or a folder of photos"
    if _is_prepared(path):
        return None
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file()):
        return (f"{path} has no manifest.jsonl and no photos: pass a dataset written by `finetune prepare`, "
                "or a folder of photos (.jpg, .png, .webp, .heic, ...)")
    return None


def run_folder_problem(run_dir: Path, resume: str | Path | None) -> str | None:
    """A new run needs an empty or missing folder (a resume checks its run folder when it loads it)."""
    if resume is not None or not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"the run folder {run_dir} is a file: pass --out NEW_FOLDER"
    if not any(run_dir.iterdir()):
        return None
    again = " or add --resume latest to continue it" if complete_checkpoints(run_dir, state=True) else ""
    return (f"{run_dir} already holds a run: pass --out NEW_FOLDER to start another one{again} "
            "(or delete that folder to start it over)")


def cuda_impossible() -> bool:
    """True when this process cannot see a CUDA (or ROCm) GPU, told without importing torch: CUDA hidden
    (CUDA_VISIBLE_DEVICES empty or -1), accelerate told to use the CPU, a CPU-only torch build, or a
    Linux machine without NVIDIA or AMD GPU device files. False when unsure (the real device is checked
    once the accelerator exists)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    if "+cpu" in version:
        return True
    if "+xpu" in version or sys.platform != "linux":  # Intel GPUs, Apple MPS: devices of their own
        return False
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def have_xformers() -> bool:
    return importlib.util.find_spec("xformers") is not None


def attention_problem(mode: str, device_type: str | None) -> str | None:
    """Why `train.attention = mode` cannot run on `device_type` (None: not known yet), or None."""
    if mode != "xformers":
        return None
    if not have_xformers():
        return XFORMERS_MISSING
    if device_type is not None and device_type != "cuda":
        return (f"train.attention = 'xformers' needs a CUDA GPU (this run is on {device_type}): "
                "use --set train.attention=sdpa")
    return None


def resolution_problem(cfg: RunConfig, dataset: Path, preset: str | None) -> str | None:
    """A dataset prepared at another resolution than `data.resolution`, or None.

    The recipe trains on the dataset's crops at their size (their bucket), so such a run would train at
    the dataset's resolution while its config, metadata and samples say another: typically a dataset
    prepared for an SD 1.5 preset (512 px) trained with an SDXL one (1024 px), or the reverse.
    Needs no model weights: the base's architecture comes from its configs or header."""
    from finetune.models import families
    from finetune.models.load import peek_architecture
    from finetune.train.data import prepared_at
    from finetune.train.dataset_checks import reprepare_command

    prepared, _ = prepared_at(dataset)
    res = cfg.data.resolution
    if prepared is None or prepared == res:
        return None
    spec = cfg.model.base
    arch = peek_architecture(spec, cfg.model.revision)
    if spec in families.tiny_specs():  # the embedded test bases train at 64 px
        about = f" (the base {spec} is the embedded {families.title(arch)} test model, which trains at 64 px)"
    elif arch:
        name = families.title(arch)
        about = f" (the base {spec} is {name}; {name} bases train at {families.variant(arch).resolution_text} px)"
    else:
        about = ""
    command, new = reprepare_command(dataset, preset, {"resolution": res}, f"{res}px")
    return (f"dataset {dataset} was prepared at {prepared} px but this run trains at data.resolution = "
            f"{res} px{about}: prepare the photos again at {res} px (`{command}`) and train with "
            f"--dataset {new}, or train at the dataset's resolution with --set data.resolution={prepared}")


def check_resolution(cfg: RunConfig, dataset: Path, preset: str | None) -> None:
    problem = resolution_problem(cfg, dataset, preset)
    if problem:
        raise FinetuneError(problem)

"""What the recipes (train/lora.py, train/dpo.py) share, as plain functions: the accelerator and the
frozen weights' dtype, run.json, the stop flag across processes, checkpoints (save, and resume with its
checks), and the sampling step.

Each recipe keeps its own setup, loop and end in plain view and calls these; neither imports the other.
The functions that take a `run` read only the loop state both recipes' run objects hold (`LoopState`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Protocol

import torch

import finetune
from finetune import runs
from finetune.config import RunConfig
from finetune.errors import FinetuneError
from finetune.train.checkpoint import (capture_rng, check_resume_compatible, load_checkpoint, restore_rng,
                                       save_checkpoint)
from finetune.train.precision import Precision, check_resume_precision, resolve_precision, saved_precision
from finetune.train.preflight import FP16_ON_CPU
from finetune.train.residency import move_frozen, reuse_freed_memory


class LoopState(Protocol):
    """What a recipe's run object holds that the shared functions read (both `Run`s have these)."""

    cfg: RunConfig
    dir: Path
    accelerator: object
    base: object
    base_hash: str
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    sampler: object
    parked: object
    step: int
    sampled_at: set[int]
    started_at: str
    precision: Precision


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- accelerator and dtypes
def make_accelerator(cfg: RunConfig, run_dir: Path) -> tuple[object, Precision]:
    """The accelerator, and the precision it trains in (`train.mixed_precision`, "auto" resolved for
    this device: see `finetune.train.precision`)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import is_tensorboard_available, parse_flag_from_env

    t = cfg.train
    # accelerate keeps its settings in process-wide singletons; a second `train()` in the same process
    # (the Python API, a notebook) must not inherit the first run's precision or accumulation. The
    # distributed environment (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # The first PartialState fixes the process group for the whole process, and only AcceleratorState
    # reads ACCELERATE_USE_CPU: without passing it here (accelerate 1.16), `accelerate launch` on CPU
    # runs each rank as a separate single process.
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision = resolve_precision(t.mixed_precision, device)
    if precision.mode == "fp16" and device.type == "cpu":
        raise FinetuneError(FP16_ON_CPU)
    if device.type == "cpu":  # a step's large blocks: kept for the next step, not faulted in again
        reuse_freed_memory()
    accelerator = Accelerator(mixed_precision=precision.mode, gradient_accumulation_steps=t.grad_accum,
                              log_with="tensorboard" if is_tensorboard_available() else None, project_dir=str(run_dir))
    return accelerator, precision


def place_frozen(pipe, family, device: torch.device, dtype: torch.dtype, offload: bool = False) -> None:
    """Every pipeline component on the device in the frozen weights' dtype (`precision.dtype`), except
    those the family keeps fp32 (SDXL's VAE overflows in fp16); the LoRA parameters are made fp32 later.
    Cast while moving, tensor by tensor (`move_frozen`): moving first would put the whole fp32 model on
    the GPU (SDXL's UNet: 10 GiB, more than the 8 GB card its fp16 copy trains on), and `Module.to` keeps
    the whole fp32 weights file resident in host memory beside the copy until it is done. A quantized
    denoiser stays where bitsandbytes put it; with `offload` (model.offload) the denoiser stays in CPU
    memory, its blocks moved to the device by group offloading (`quantize.offload_blocks`)."""
    from finetune.models.quantize import is_quantized

    for component in family.components:
        module = getattr(pipe, component.name)
        if is_quantized(module):
            continue
        target = torch.device("cpu") if offload and component.name == family.denoiser else device
        move_frozen(module, target, None if component.keep_fp32 else dtype)


# ---------------------------------------------------------------- the run folder's records
def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_info(run: LoopState, *, dataset: str | None, dataset_hash: str | None, finished: bool = False,
             **extra) -> dict:
    """run.json: what was trained, from what, how far (the keys export, sample and review read), plus
    the recipe's own keys (`extra`)."""
    base = run.base
    return {"base": base.spec, "base_kind": base.kind, "arch": base.arch, "base_hash": run.base_hash,
            "dataset": dataset, "dataset_hash": dataset_hash, "trigger": run.cfg.data.trigger,
            "class_word": run.cfg.data.class_word, "started_at": run.started_at,
            "precision": run.precision.name, "precision_reason": run.precision.reason,
            "finished_at": now() if finished else None, "steps": run.step, "version": finetune.__version__,
            **extra}


# ---------------------------------------------------------------- stopping
def stop_requested(run: LoopState, stop) -> bool:
    """Whether any process got a stop signal (`stop`: a GracefulStop), so that all processes stop after
    the same step and save the same checkpoint."""
    flag = torch.tensor([int(stop.requested)], device=run.accelerator.device)
    return bool(run.accelerator.gather(flag).max().item())


# ---------------------------------------------------------------- checkpoints
def trainable(run: LoopState, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The LoRA parameters of `models` ({component name: model}) by `<component>.<parameter name>`, as
    they are in the model (fp32)."""
    acc = run.accelerator
    return {f"{prefix}.{name}": p for prefix, m in models.items()
            for name, p in acc.unwrap_model(m).named_parameters() if p.requires_grad}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(run: LoopState, params: dict[str, torch.Tensor], identity: dict, lora_files) -> Path:
    """Write checkpoints/step-NNNNNN/ (every process calls this; only the main process writes).

    `params`: `trainable(...)`; `identity`: the resolved config plus what a resume must find unchanged
    (`check_resume_compatible`); `lora_files`: writes the adapter into a folder. Each process adds its
    RNG states and a digest of its LoRA weights; the digests must agree (they do unless data-parallel
    training is broken) and are kept in the checkpoint as the record that they did.
    """
    from accelerate.utils import gather_object

    acc = run.accelerator
    rngs = gather_object([capture_rng()])
    digests = gather_object([tensors_digest(params)])
    if len(set(digests)) > 1:
        raise FinetuneError(f"the {len(digests)} processes hold different LoRA weights at step {run.step}: "
                            "data-parallel training went out of sync; report this with the run's config")
    state = {"step": run.step, "config": identity, "trainable": params,
             "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
             "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
             "sampler": run.sampler.state_dict(), "rng": rngs, "param_digests": digests}
    path = save_checkpoint(run.dir, run.step, lora_files=lora_files, state=state,
                           keep=run.cfg.train.keep_checkpoints, is_main=acc.is_main_process)
    acc.wait_for_everyone()
    return path


def find_resume(run_dir: Path, resume: str | Path, out_given: bool) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for `--resume latest | step-N | CHECKPOINT | RUN`
    (runs.find_checkpoint); a checkpoint or run named by path must be the run `--out` names."""
    path = Path(resume)
    if str(resume) != "latest" and path.is_dir():
        run = runs.run_of(path)
        if out_given and run.resolve() != run_dir.resolve():
            raise FinetuneError(f"--resume {resume} belongs to the run {run}, not to --out {run_dir}: "
                                "drop --out or pass a checkpoint of that run")
        run_dir = run
    if not (run_dir / runs.CONFIG).is_file():
        raise FinetuneError(f"--resume {resume}: nothing to resume, {run_dir} holds no run (give the run folder "
                            "with --out, or start without --resume)")
    if str(resume) == "latest" and not any((run_dir / runs.CHECKPOINTS).glob("step-*")):
        raise FinetuneError(f"--resume latest: nothing to resume, {run_dir} has no checkpoint (the run stopped "
                            f"before its first save): delete {run_dir} and start again without --resume")
    return run_dir, runs.find_checkpoint(run_dir, resume)


def open_resume(run_dir: Path, resume: str | Path, out_given: bool) -> tuple[Path, Path, dict, list]:
    """(run folder, checkpoint folder, its state, the CheckpointWarnings met on the way: damaged newer
    checkpoints skipped) of a resume; the warnings are shown once the log is known (`show_warnings`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", runs.CheckpointWarning)
        run_dir, found = find_resume(run_dir, resume, out_given)
        state = load_checkpoint(found)
    return run_dir, found, state, caught


def show_warnings(caught, log) -> None:
    for w in caught:
        if issubclass(w.category, runs.CheckpointWarning):
            log(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_resume(state: dict, found: Path, cfg: RunConfig, precision: Precision) -> None:
    """What a resume must match before any model is loaded: the precision, the config (except the keys
    `checkpoint.RESUME_MAY_CHANGE` allows), and steps left to train. The identities the config dict
    carries (`_base_hash`, ...) are compared by the recipe once it knows them (`check_resume_compatible`)."""
    check_resume_precision(state["config"], precision)
    state["config"]["_precision"] = saved_precision(state["config"])  # checkpoints from before it was kept
    check_resume_compatible({k: v for k, v in state["config"].items() if not k.startswith("_")}, cfg.to_dict())
    max_steps = cfg.train.max_steps
    if state["step"] >= max_steps:
        raise FinetuneError(f"{found} is at step {state['step']} and train.max_steps = {max_steps}: nothing "
                            "left to train; to train longer, add --set train.max_steps=N (N > "
                            f"{state['step']})")


def load_state(run: LoopState, state: dict, params: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's training state into a freshly set-up run: the LoRA parameters (`params`, by the
    names `trainable` gives), optimizer, schedule, gradient scaler, data position and step (all but the
    RNGs, restored last: `restore_rngs`)."""
    saved = state["trainable"]
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved)) or sorted(set(saved) - set(params))
        raise FinetuneError(f"the checkpoint's LoRA parameters do not match this model's (e.g. {missing[0]}); "
                            "was it written by another version of finetune? start a new run without --resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    scaler = run.accelerator.scaler
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    run.sampler.load_state_dict(state["sampler"])
    run.step = int(state["step"])


def restore_rngs(run: LoopState, state: dict) -> None:
    """This process's RNG states from the checkpoint: last, right before the loop, so that every random
    draw from there on is the one the run would have made."""
    rng = state["rng"]
    restore_rng(rng[run.accelerator.process_index] if isinstance(rng, list) else rng)


def drop_newer_checkpoints(run_dir: Path, step: int) -> list[str]:
    """Delete checkpoints after `step` (resuming from an older one abandons the run they continued):
    `keep_checkpoints` would otherwise count them, and "latest" would jump back to them."""
    dropped = []
    for p in sorted((run_dir / runs.CHECKPOINTS).iterdir()):
        m = runs.STEP_DIR.fullmatch(p.name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(p)
            dropped.append(p.name)
    return dropped


def resumed_note(run: LoopState, dropped: list[str]) -> str:
    return (f"resuming {run.dir} from {runs.checkpoint_name(run.step)} (step {run.step} of {run.cfg.train.max_steps})"
            + (f"; deleted the newer checkpoints {', '.join(dropped)} (they continued the abandoned run)"
               if dropped else ""))


def started_at(run_dir: Path, default: str) -> str:
    """When a resumed run first started (its run.json), else `default`."""
    return runs.read_info(run_dir).get("started_at") or default


# ---------------------------------------------------------------- sampling
def sample(run: LoopState, models: list[torch.nn.Module]) -> list[Path]:
    """Sample images of the model as it is now into samples/step-NNNNNN/ (main process; once per step).

    `models` (the ones with LoRA) sample in eval mode: no LoRA dropout, and no draws from the training
    RNG; the parked frozen components come back for it."""
    from finetune.train.samples import write_samples

    paths = []
    if run.accelerator.is_main_process and run.step not in run.sampled_at:
        acc = run.accelerator
        models = [acc.unwrap_model(m) for m in models]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        with run.parked.back():
            paths = write_samples(run.base.pipe, run.cfg, run.step, run.dir / runs.SAMPLES / runs.checkpoint_name(run.step),
                                  model_name=run.base.name, model_hash=run.base_hash, lora_name=run.dir.name,
                                  autocast=acc.autocast)
        for m, mode in zip(models, modes):
            m.train(mode)
    run.sampled_at.add(run.step)
    return paths

"""The run folder (outputs/<run>/): its layout, its records, and the one "is this checkpoint complete" check.

    config.json             the resolved config          run.json        what was trained, on what, how far
    lora/pytorch_lora_weights.safetensors                 the final adapter (written when training finishes)
    checkpoints/step-NNNNNN/  lora/ + state + COMPLETE    samples/step-NNNNNN/   training samples
    export/                 `finetune export`             gallery/<time>/        `finetune sample`
    feedback.sqlite         `finetune review`'s ratings

train and train-dpo write it; export, sample, review, inspect and the tests read it through here, and
`find_checkpoint` is the one reading of `latest | step-N | PATH | RUN` (--resume, --checkpoint).
Torch-free, so that commands answer fast.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.hashing import sha256_file

OUTPUTS = "outputs"
CONFIG = "config.json"
RUN_INFO = "run.json"
LORA_DIR = "lora"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The adapter file in lora/ and in each checkpoint's lora/ (diffusers' default name)."""
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
EXPORT = "export"
GALLERY = "gallery"
FEEDBACK = "feedback.sqlite"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step-(\d{6,})")
TEMP_DIR = re.compile(r"\.step-(\d{6,})\.(tmp|old)-(\d+)")
"""A checkpoint being written (`.step-NNNNNN.tmp-<pid>`) or replaced (`.old-<pid>`): never a checkpoint."""
STEP_NAME = re.compile(r"(?:step-)?(\d+)")
"""How a person names a checkpoint: step-N or N."""


class CheckpointWarning(UserWarning):
    """A checkpoint folder was skipped (damaged, unfinished) or a resume cannot be bit-exact."""


def default_run_dir(name: str) -> Path:
    """outputs/<name>, beside where the command runs: where a run goes without --out."""
    return Path(OUTPUTS) / name


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def final_lora(run: Path) -> Path:
    return Path(run) / LORA_DIR / WEIGHT_NAME


def adapter_file(folder: Path) -> Path:
    """The adapter file in a lora/ folder (the run's or a checkpoint's)."""
    return Path(folder) / WEIGHT_NAME


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / checkpoint_name(step)


def checkpoint_lora(folder: Path) -> Path:
    """A checkpoint folder's adapter file."""
    return Path(folder) / LORA_DIR / WEIGHT_NAME


def is_run_folder(path: Path) -> bool:
    """A folder holding checkpoints/ that is not itself a checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / CHECKPOINTS).is_dir() and not (path / MARKER).exists()


def run_of(path: Path) -> Path:
    """The run a folder given as --resume/--checkpoint PATH belongs to: the run folder itself, or the
    run of a checkpoint folder (RUN/checkpoints/step-N)."""
    path = Path(path)
    return path if is_run_folder(path) else path.parent.parent


def checkpoint_problem(folder: Path, *, state: bool = False, hashes: bool = False) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is: the one check.

    Always: a COMPLETE marker (written last), every file it lists at its recorded size, and the
    adapter. With `state` (to resume from it, to count it among a run's checkpoints) also the training
    state; with `hashes` every file's sha256 as recorded (what a resume checks before loading).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (its save did not finish)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"] if state else info.get("files", {})
        step = int(info["step"]) if state or "step" in info else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MARKER} marker is unreadable"
    if not isinstance(files, dict):
        return f"its {MARKER} marker is unreadable"
    m = STEP_DIR.fullmatch(folder.name)
    if m and step is not None and int(m.group(1)) != step:
        return f"its {MARKER} marker says step {step}"
    if state and ("state.json" not in files or "state.safetensors" not in files):
        return "it holds no training state"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        meta = meta if isinstance(meta, dict) else {}
        size = p.stat().st_size
        if size != meta.get("size"):
            return f"{rel} has {size} bytes, not the recorded {meta.get('size')} (truncated or modified)"
        if hashes and sha256_file(p) != meta.get("sha256"):
            return f"{rel} does not match its recorded sha256 (modified or corrupt)"
    if not (folder / LORA_DIR / WEIGHT_NAME).is_file():
        return f"no {LORA_DIR}/{WEIGHT_NAME}"
    return None


def complete_checkpoints(run: Path, *, state: bool = False, hashes: bool = False) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints that pass `checkpoint_problem`, oldest first."""
    folder = Path(run) / CHECKPOINTS
    found = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and checkpoint_problem(p, state=state, hashes=hashes) is None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(run: Path, which: str | Path = "latest", *, resume: bool = True,
                    option: str = "--checkpoint") -> Path:
    """The checkpoint folder `which` names: "latest", "step-N" or N (in `run`), a checkpoint folder, or a
    run folder (its latest); the one reading of --resume, export's --checkpoint and sample's --checkpoints.

    To resume (`resume`) a checkpoint must hold the training state with every file's recorded sha256;
    "latest" skips newer folders that fail, and unfinished temporary ones, with a CheckpointWarning.
    Otherwise (export, sample: `option` names the flag in messages) the adapter at its recorded size is
    enough. A folder named explicitly must pass the check. Errors say what there is and how to choose.
    """
    run, ckpt_dir = Path(run), Path(run) / CHECKPOINTS

    def problem(folder: Path) -> str | None:
        return checkpoint_problem(folder, state=resume, hashes=resume)

    if str(which) == "latest":
        folders = sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []
        if resume:
            for p in folders:
                if TEMP_DIR.fullmatch(p.name):
                    warnings.warn(f"ignoring unfinished checkpoint folder {p} (a save was interrupted)",
                                  CheckpointWarning, stacklevel=2)
        candidates = sorted(((int(m.group(1)), p) for p in folders
                             if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()), reverse=True)
        for _, p in candidates:
            reason = problem(p)
            if reason is None:
                return p
            if resume:
                warnings.warn(f"skipping checkpoint {p}: {reason}; trying the one before it",
                              CheckpointWarning, stacklevel=2)
        if not resume:
            raise FinetuneError(f"{option} latest: run {run} has no complete checkpoint under {ckpt_dir}; "
                                f"leave {option} out to use the final adapter")
        damaged = " (each one is damaged or unfinished: see the warnings above)" if candidates else ""
        raise FinetuneError(f"no complete checkpoint in {ckpt_dir}{damaged}: nothing to resume; start the run "
                            f"over without --resume, with --out NEW_FOLDER or after deleting {run}")

    path = Path(which)
    if is_run_folder(path):
        return find_checkpoint(path, "latest", resume=resume, option=option)
    named = STEP_NAME.fullmatch(str(which))
    if not path.is_dir() and named:
        path = ckpt_dir / checkpoint_name(int(named.group(1)))
    reason = problem(path) if path.is_dir() else None
    if path.is_dir() and reason is None:
        return path
    have = [p.name for _, p in complete_checkpoints(run, state=resume)]
    if resume:
        if reason is not None:
            raise FinetuneError(f"checkpoint {path} cannot be resumed: {reason}; pick another one or use --resume latest")
        listing = f"complete ones: {', '.join(have)}" if have else f"there is none in {ckpt_dir}"
        raise FinetuneError(f"--resume {which}: no such checkpoint folder ({listing}); use --resume latest "
                            "or a checkpoint folder")
    listing = f"complete ones: {', '.join(have) or 'none'}"
    if not path.is_dir() and not named:
        raise FinetuneError(f"{option} {str(which)!r}: use latest or step-N ({listing})")
    if not path.is_dir():
        raise FinetuneError(f"{option} {which}: {path} does not exist ({listing})")
    raise FinetuneError(f"{option} {which}: {path} is not a complete checkpoint: {reason} ({listing})")


def read_info(run: Path) -> dict:
    """run.json, or {} when the run has none."""
    path = Path(run) / RUN_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path} is not valid JSON ({e})") from None


def read_config(run: Path):
    """The run's resolved RunConfig (config.json), or None when it has none."""
    from finetune.config import load_run_config

    path = Path(run) / CONFIG
    return load_run_config(path) if path.is_file() else None


def is_finished(run: Path) -> bool:
    """Whether training wrote its final adapter (lora/)."""
    return final_lora(run).is_file()


def unfinished_note(run: Path) -> str | None:
    """"training unfinished: ..." for a run without its final adapter (it stopped, or is still going),
    saying how far it got and how to go on; None for a finished run."""
    run = Path(run)
    if is_finished(run):
        return None
    info = read_info(run)
    complete = complete_checkpoints(run)
    cfg = None
    try:
        cfg = read_config(run)
    except FinetuneError:
        pass
    total = getattr(getattr(cfg, "train", None), "max_steps", None)
    at = f"step {complete[-1][0]}" if complete else f"step {info.get('steps', 0)}"
    of = f" of {total}" if total else ""
    newest = f"its newest complete checkpoint is {complete[-1][1].name}" if complete else "it has no complete checkpoint"
    return (f"training unfinished: {run} stopped at {at}{of} (no {LORA_DIR}/ yet); {newest}. Continue it with the "
            f"command that started it plus --resume latest")

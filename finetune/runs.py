"""The run folder (outputs/<run>/): its layout, its records, and the one "is this checkpoint complete" check.

    config.json             the resolved config          run.json        what was trained, on what, how far
    lora/pytorch_lora_weights.safetensors                 the final adapter (written when training finishes)
    checkpoints/step-NNNNNN/  lora/ + state + COMPLETE    samples/step-NNNNNN/   training samples
    export/                 `finetune export`             gallery/<time>/        `finetune sample`
    feedback.sqlite         `finetune review`'s ratings

train and train-dpo write it; export, sample, review, inspect and the tests read it through here.
Torch-free, so that commands answer fast.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from finetune.errors import FinetuneError

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


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def final_lora(run: Path) -> Path:
    return Path(run) / LORA_DIR / WEIGHT_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
        if hashes and _sha256(p) != meta.get("sha256"):
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

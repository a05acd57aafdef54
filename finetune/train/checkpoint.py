"""Resumable checkpoints: atomic step folders, exact state round-trips, a "latest" that always loads.

A checkpoint is `outputs/<run>/checkpoints/step-NNNNNN/`:

    lora/<runs.WEIGHT_NAME>                 the adapter in the diffusers layout (written by the recipe)
    state.json                              everything in `state` that is not a tensor, with references to ...
    state.safetensors                       ... its tensors: LoRA parameters (exact fp32), optimizer state
    rng-rank<i>.json, rng-rank<i>.safetensors   RNG states of process i (python, numpy, torch CPU + CUDA)
    COMPLETE                                written last: step, every file's size and sha256, version, time

Nothing is pickled. Tensors go to safetensors and the rest to JSON, with small tags for what JSON lacks
(tuples, dicts with int keys, numpy arrays and scalars), so loading a checkpoint cannot run code and every
float comes back bit for bit. A folder is built under a temporary name (`.step-NNNNNN.tmp-<pid>`), fsynced,
and renamed only once its COMPLETE marker is on disk: a crash at any moment leaves either the previous
checkpoints or a complete new one, and `runs.find_checkpoint(run, "latest")` re-checks sizes and hashes so
that a folder damaged later (by hand, by a full disk) is skipped with a warning instead of failing the resume.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from finetune import __version__
from finetune.errors import FinetuneError
from finetune.hashing import sha256_file
from finetune.runs import (LORA_DIR, MARKER, TEMP_DIR, WEIGHT_NAME, CheckpointWarning, checkpoint_dir,
                           checkpoint_problem, complete_checkpoints)

FORMAT = 1
REQUIRED_STATE = ("step", "config", "trainable", "optimizer", "lr_scheduler", "grad_scaler", "sampler", "rng")
"""Keys `save_checkpoint` insists on: without any of them a resume could not continue exactly."""


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """This process's generator states: python `random`, numpy's global RNG, torch CPU, every CUDA device.

    Each process captures its own; the main process saves them all (`state["rng"]`, a list by rank).
    Generators the recipe owns (e.g. a `torch.Generator` for the data order) belong in `state["sampler"]`.
    """
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict) -> None:
    """Put back what `capture_rng` took (after `load_checkpoint`, pass the entry of this process's rank)."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    saved = list(rng.get("cuda") or [])
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, s in enumerate(saved[:here]):
        torch.cuda.set_rng_state(s, i)
    if len(saved) > here:
        warnings.warn(f"the checkpoint holds CUDA RNG states for {len(saved)} device(s) but this machine has "
                      f"{here}: random draws on the missing devices will differ from the original run",
                      CheckpointWarning, stacklevel=2)


# ------------------------------------------------------------------- state <-> JSON + safetensors


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class _Encoder:
    """Split a nested state into a JSON-able skeleton and a flat dict of tensors (keyed by their path)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[int, str] = {}  # the same tensor object twice (bnb's shared qmaps) is stored once

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        key = self._seen.get(id(t))
        if key is None:
            if t.is_sparse or t.layout != torch.strided:
                raise TypeError(f"cannot store {path} in a checkpoint: {t.layout} tensors are not supported")
            # A private contiguous CPU copy: safetensors refuses tensors that share storage.
            self.tensors[path] = t.detach().to("cpu", copy=True).contiguous()
            self._seen[id(t)] = key = path
        return key

    def encode(self, obj: Any, path: str) -> Any:
        if isinstance(obj, np.generic):  # before float: np.float64 subclasses it
            return {"__numpy__": obj.dtype.str, "value": obj.item()}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)  # json writes repr(): exact, and NaN/Infinity round-trip
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._tensor(obj, path)}
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": self._tensor(torch.from_numpy(np.ascontiguousarray(obj)), path)}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, _join(path, k)) for k, v in obj.items()}
            items = []
            for k, v in obj.items():  # int keys (optimizer state) and "__"-keys (bnb) keep their type
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"cannot store {path} in a checkpoint: dict key {k!r} is not a str or int")
                items.append([k, self.encode(v, _join(path, k))])
            return {"__dict__": items}
        raise TypeError(f"cannot store {path} ({type(obj).__name__}) in a checkpoint: use tensors, numbers, "
                        "strings, None, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__numpy__" in obj:
        return np.array(obj["value"], dtype=np.dtype(obj["__numpy__"]))[()]
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _pack(obj: Any, root: str) -> tuple[Any, bytes]:
    """(JSON-able skeleton, safetensors bytes of its tensors) for one nested object."""
    enc = _Encoder()
    skeleton = enc.encode(obj, root)
    return skeleton, st_save(enc.tensors, metadata={"format": str(FORMAT)})


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()


# ------------------------------------------------------------------------------------ file system


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file (every state file goes through here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors' Rust writer (used by diffusers' save_lora_weights) reports it as its own error type.
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _remove_stale_temps(ckpt_dir: Path, current: Path | None = None) -> None:
    """Delete `.step-*.tmp-<pid>` / `.old-<pid>` folders left by processes that died mid-save."""
    for p in ckpt_dir.iterdir():
        m = TEMP_DIR.fullmatch(p.name)
        if not m or p == current:
            continue
        pid = int(m.group(3))
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int, new: Path) -> None:
    """Keep the newest `keep` complete checkpoints (always `new`); folders that fail the check are left alone."""
    complete = [p for _, p in complete_checkpoints(ckpt_dir.parent, state=True)]
    kept = set(complete[-keep:]) | {new}
    for p in complete:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


# -------------------------------------------------------------------------------------- save / load


def save_checkpoint(run_dir: Path, step: int, *, lora_files: Callable[[Path], None] | dict, state: dict,
                    keep: int, is_main: bool = True) -> Path:
    """Write `run_dir/checkpoints/step-NNNNNN/` atomically and return it; keep the newest `keep`.

    `lora_files` writes the adapter: a callable given the (empty) `lora/` folder, e.g.
    `lambda d: StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=..., ...)`, or a dict of
    diffusers-layout tensors saved as the adapter file (`runs.WEIGHT_NAME`).
    `state` must hold REQUIRED_STATE: "step" (== step), "config" (the resolved config dict plus the
    `_`-identities that `check_resume_compatible` compares), "trainable" ({name: fp32 tensor}),
    "optimizer", "lr_scheduler" and "grad_scaler" (state_dicts; the scaler's may be None), "sampler"
    (the data position, e.g. {"epoch": e, "index": i}) and "rng" (`capture_rng()`, or a list of them by
    process rank); other keys are saved too. Values: tensors, numpy arrays, numbers, strings, None,
    lists, tuples and dicts (str or int keys). Only the main process writes (`is_main`); the others
    just get the path. A full disk raises FinetuneError after removing the partial folder.
    """
    final = checkpoint_dir(run_dir, step)
    if not is_main:
        return final
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)} (needs {', '.join(REQUIRED_STATE)})")
    if state["step"] != step:
        raise ValueError(f"state['step'] = {state['step']} but saving step {step}")

    ckpt_dir = final.parent
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    old = ckpt_dir / f".{final.name}.old-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(ckpt_dir)  # first: frees the space that dead saves held
        _build(tmp, step, lora_files, state)
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException as e:  # a second Ctrl-C included: never leave a partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        if not isinstance(e, Exception):
            raise
        previous = complete_checkpoints(ckpt_dir.parent, state=True)
        intact = (f"the previous checkpoint {previous[-1][1].name} is intact" if previous
                  else "there is no earlier checkpoint")
        if _disk_full(e):
            raise FinetuneError(f"no space left on device while writing checkpoint {final.name} in {ckpt_dir}; "
                                f"{intact}: free some space, then resume with --resume latest") from None
        if isinstance(e, OSError):
            raise FinetuneError(f"cannot write checkpoint {final.name} in {ckpt_dir}: "
                                f"{e.strerror or e}; {intact}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    _prune(ckpt_dir, keep, final)
    return final


def _build(tmp: Path, step: int, lora_files: Callable[[Path], None] | dict, state: dict) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    lora_dir = tmp / LORA_DIR
    lora_dir.mkdir()
    if callable(lora_files):
        lora_files(lora_dir)
    else:
        _write_bytes(lora_dir / WEIGHT_NAME,
                     st_save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in lora_files.items()}))
    if not any(lora_dir.iterdir()):
        raise RuntimeError(f"lora_files wrote nothing into {lora_dir}")

    rng = state["rng"]
    per_rank = list(rng) if isinstance(rng, (list, tuple)) else [rng]
    rest = {k: v for k, v in state.items() if k != "rng"}
    skeleton, tensors = _pack(rest, "")
    _write_bytes(tmp / "state.safetensors", tensors)
    head = {"format": FORMAT, "order": list(state),
            "rng": {"ranks": len(per_rank), "list": isinstance(rng, (list, tuple))}}
    _write_bytes(tmp / "state.json", _json({**head, "state": skeleton}))
    for rank, r in enumerate(per_rank):
        skeleton, tensors = _pack(r, f"rank{rank}")
        _write_bytes(tmp / f"rng-rank{rank}.safetensors", tensors)
        _write_bytes(tmp / f"rng-rank{rank}.json", _json(skeleton))

    files = {}
    for p in _files(tmp):
        _fsync_file(p)  # the recipe's lora files did not go through _write_bytes
        files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    marker = {"format": FORMAT, "step": step, "finetune_version": __version__,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
    _write_bytes(tmp / MARKER, _json(marker))
    _fsync_dir(lora_dir)
    _fsync_dir(tmp)


def load_checkpoint(path: Path) -> dict:
    """The `state` that `save_checkpoint` was given, with CPU tensors (rng: as given, a dict or a list by rank).

    The folder is checked first (sizes + sha256): a damaged one raises FinetuneError. Load the optimizer
    with `optimizer.load_state_dict(state["optimizer"])` (it moves tensors to the parameters' devices) and
    the LoRA parameters with `param.data.copy_(state["trainable"][name])`.
    """
    path = Path(path)
    reason = checkpoint_problem(path, state=True, hashes=True)
    if reason is not None:
        raise FinetuneError(f"checkpoint {path} cannot be loaded: {reason}; use --resume latest to pick the newest "
                            "intact one")
    head = json.loads((path / "state.json").read_bytes())
    if head.get("format") != FORMAT:
        raise FinetuneError(f"checkpoint {path} has format {head.get('format')!r}; this finetune ({__version__}) "
                            f"reads format {FORMAT}")
    state = _decode(head["state"], st_load((path / "state.safetensors").read_bytes()))
    ranks = [_decode(json.loads((path / f"rng-rank{i}.json").read_bytes()),
                     st_load((path / f"rng-rank{i}.safetensors").read_bytes())) for i in range(head["rng"]["ranks"])]
    state["rng"] = ranks if head["rng"]["list"] else ranks[0]
    return {k: state[k] for k in head["order"]}


# ----------------------------------------------------------------------------------- resume config

RESUME_MAY_CHANGE = ("train.max_steps", "train.save_every", "train.keep_checkpoints", "train.log_every",
                     "train.gradient_checkpointing", "train.attention", "train.mixed_precision", "data.workers",
                     "model.allow_pickle", "sample.*", "export.*")
"""train.mixed_precision may change ("auto" <-> the precision it resolved to): what must not is the
resolved precision, the identity `_precision`."""
IDENTITY_NAMES = {"_dataset_hash": "the dataset", "_base_hash": "the base model weights",
                  "_num_processes": "the number of processes", "_precision": "the training precision"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not k.startswith("_"):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in RESUME_MAY_CHANGE)


_UNSET = object()


def _show(v: Any) -> str:
    text = "<unset>" if v is _UNSET else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume_compatible(saved_cfg: dict, new_cfg: dict) -> None:
    """Refuse a resume whose config changes what is being trained, naming every changed key.

    Both are resolved config dicts (`RunConfig.to_dict()`, the saved one from `state["config"]`), plus
    identities the caller adds as top-level `_` keys and that must match: `_dataset_hash` (the prepared
    dataset), `_base_hash` (the base weights), `_num_processes` (data-parallel sharding of the data order),
    `_precision` (the resolved training precision: "no", "fp16" or "bf16").
    Anything else must be unchanged too (model.base, lora.rank/alpha/targets/use_dora/train_text_encoder/
    text_encoder_*, data.*, train.seed/batch_size/grad_accum/optimizer/lr/..., since each changes the
    result) except what only says how long to train, how often to save/log, or how to compute the same
    thing, or what happens after training:
    train.max_steps, train.save_every, train.keep_checkpoints, train.log_every, train.gradient_checkpointing,
    train.attention, train.mixed_precision (its resolved value is `_precision`), data.workers,
    model.allow_pickle, sample.*, export.*.
    """
    old, new = _flatten(saved_cfg), _flatten(new_cfg)
    changed = []
    for key in sorted(old.keys() | new.keys(), key=lambda k: (not k.startswith("_"), k)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a == b or _may_change(key):
            continue
        name = f"{IDENTITY_NAMES[key]} ({key})" if key in IDENTITY_NAMES else key
        changed.append(f"{name} {_show(a)} -> {_show(b)}")
    if changed:
        allowed = ", ".join(RESUME_MAY_CHANGE)
        raise FinetuneError(f"cannot resume: the config differs from the checkpoint's run in {'; '.join(changed)}; "
                            f"set these back or start a new run without --resume (only {allowed} may change)")

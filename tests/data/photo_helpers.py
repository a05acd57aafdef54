"""Helpers for the prepare tests: synthetic photos, configs, and fingerprints of folder trees."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.config import DataConfig


def blocks(seed: int, size=(160, 128)) -> Image.Image:
    """A sharp picture of random colour blocks: distinct per seed (far apart in perceptual hash)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


def config(**changes) -> DataConfig:
    """Data settings for tests: one worker (in-process, fast), anything else as given."""
    return DataConfig(**{"workers": 1, **changes})


def tree_state(folder: Path) -> dict:
    """Every entry under `folder` (symlinks not followed) -> its content hash or link target, and mode."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            if p.is_symlink():
                state[os.fsencode(p)] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_file():
                try:
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError:  # a chmod 000 file when not root: its mode and time still count
                    digest = "unreadable"
                state[os.fsencode(p)] = (digest, st.st_mode, st.st_mtime_ns)
            else:
                state[os.fsencode(p)] = ("dir", st.st_mode)
    return state


def folder_bytes(folder: Path) -> dict:
    """relative path -> (bytes, mtime_ns) of every file under `folder`."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def crash_on_bad(path, settings):
    """A worker that dies (as on a decoder segfault) on one file. It lives in an importable module
    because the pool's workers are fresh processes (fork server), not forks of the test."""
    from finetune.data import process

    if path.endswith("bad.png"):
        os._exit(3)
    return process.process_photo(path, settings)

"""Whole pipelines in the original ("single file") layout: which architecture a file is, and writing one.

What the layout is for each architecture is its family's (`Family.to_single_file`,
`Family.detect_single_file`); this module only looks the family up and writes the file atomically.
Loading goes the other way through diffusers' `from_single_file` (finetune.models.load).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.filemode import follow_umask
from finetune.models import families

if TYPE_CHECKING:  # torch only in annotations: detecting a file's architecture needs no torch import
    import torch


def detect_architecture(keys: Iterable[str] | Mapping[str, tuple[int, ...]]) -> str:
    """The arch (e.g. "sd1") of original-layout keys (or key -> shape); ValueError if unknown."""
    shapes = keys if isinstance(keys, Mapping) else {k: () for k in keys}
    return families.single_file_arch(shapes)


def pipeline_to_ldm(pipe, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The whole pipeline in its family's single-file layout, as views of the live weights where possible.
    `arch` names the family; without it, the family whose pipeline class `pipe` is."""
    family = families.for_arch(arch) if arch else families.of_pipeline(pipe)
    return family.to_single_file(pipe)


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None, arch: str | None = None) -> Path:
    """Write `pipe` as one original-layout .safetensors (atomically), optionally cast to `dtype`."""
    from safetensors.torch import save_file

    path = Path(path)
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; not so for {bad} (json.dumps the values)")
    # pipeline_to_ldm only renames, so the one copy made here (a cast, or a device move) is made tensor
    # by tensor and the peak stays near one extra model; safetensors writes from the buffers directly.
    tensors = {}
    for name, tensor in pipeline_to_ldm(pipe, arch).items():
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.detach().to("cpu", target).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

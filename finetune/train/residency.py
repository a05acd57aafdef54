"""Hold only what the training loop needs: frozen components leave the device once their outputs are cached.

A step needs the denoiser, the LoRA, the optimizer state and the activations. The text encoders are
not needed once the captions are cached (and they are frozen), nor the VAE once the latents are; both
are needed again only to sample images during training. `Parked` takes such components off the
device and brings them back around sampling:

- on an accelerator (CUDA, ...) they move to CPU memory and back;
- on a CPU-only run there is nowhere cheaper to move them, so their weights are written once to a
  temporary safetensors file and the modules are emptied (their tensors on PyTorch's "meta" device,
  which holds no memory); bringing them back reads the file again.

Which components a run parks is decided by what it cached (`release_after_caching` in the recipes), by
their pipeline names; the mechanism itself knows no architecture. A parked module keeps its dtype and
structure, so code that only asks `module.dtype` or `module.config` still works, while code that would
run it fails loudly ("meta" tensors) instead of silently computing.

`reuse_freed_memory` keeps what a CPU training step frees for the next step (see its docstring).

`move_frozen` puts a frozen component on the device in the training dtype one tensor at a time, so the
fp32 source is never held whole beside its bf16/fp16 copy (see its docstring).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import mmap
import shutil
import tempfile
import weakref
from pathlib import Path

import torch


def _tensors(module: torch.nn.Module):
    """(name, tensor) of every parameter and buffer, non-persistent buffers too (a state_dict lacks those:
    CLIP's position ids)."""
    return itertools.chain(module.named_parameters(), module.named_buffers())


def _ties(module: torch.nn.Module) -> dict[str, str]:
    """Parameter names that are another parameter under a second name -> that name (T5's input embedding
    is its `shared` table). Emptying a module unties them; `_tie` ties them again."""
    first: dict[int, str] = {}
    names = {name: first.setdefault(id(p), name) for name, p in module.named_parameters(remove_duplicate=False)}
    return {alias: name for alias, name in names.items() if alias != name}


def _tie(module: torch.nn.Module, ties: dict[str, str]) -> None:
    for alias, name in ties.items():
        owner, _, attr = alias.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(name))


def release_memory() -> None:
    """Give freed memory back to the operating system (glibc keeps freed small blocks for reuse)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
REUSE_UP_TO = 1 << 30
"""Blocks up to this size (bytes) come from, and go back to, the heap while a CPU run trains."""


def reuse_freed_memory() -> bool:
    """Keep the memory a CPU training step frees for the next step, rather than handing it back to the
    system and taking it again (glibc only; returns whether it was set). Process-wide and lasting.

    glibc serves blocks over its mmap threshold (at most 32 MB however it adapts) with fresh mappings
    and unmaps them when freed, and trims the heap's free top: every step then faults the same memory
    back in page by page, zeroed by the kernel. On SD 1.5's shapes at 128 px that is about 200,000
    minor page faults (0.8 GB) per step and a sixth of the step's time; with both thresholds at 1 GiB
    it is none, at the same peak memory, since each step reuses the blocks the one before freed
    (`bench/train.py`, variant "reuse"). `release_memory` still hands everything free back on demand."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_UP_TO) and libc.mallopt(M_TRIM_THRESHOLD, REUSE_UP_TO))


MADV_DONTNEED = 4  # Linux


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (safetensors weights are read through such a
    map): [(start, end), ...]; empty where /proc is unavailable."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) > 5 else ""
                if path.startswith("/") and "x" not in fields[1]:  # a file, not code
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def _drop_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]], libc) -> None:
    """Take the pages of a copied-and-dropped tensor read from a mapped weights file out of this process's
    resident memory. They stay mapped until the last tensor of the file is freed (one map per file), so
    without this a cast model holds its whole fp32 file resident beside the copy. Pages are only clean
    file pages here (frozen weights are never written): touched again, they are read from the file."""
    if libc is None or tensor.device.type != "cpu" or not tensor.numel():
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages only: neighbours keep theirs
    if last > first and any(lo <= first and last <= hi for lo, hi in mappings):
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def move_frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """`module.to(device, dtype)` for a frozen component, with a peak of the result plus one tensor.

    `Module.to` converts every tensor before the sources can go: a model read from safetensors holds
    its file's pages resident (a memory map) until its last tensor is gone, so SD 1.5's UNet peaked at
    its fp32 3.3 GB plus the 1.7 GB bf16 copy. Here each floating-point parameter and buffer is
    converted, swapped in, and its source's file pages released at once (other tensors are only moved);
    memory freed by sources that were not mapped is handed back to the system at the end."""
    device = torch.device(device)
    libc = _libc()
    mappings = _file_mappings() if libc is not None else []
    with torch.no_grad():
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is None:
                        continue
                    to = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    if t.device == device and t.dtype == to:
                        continue
                    source = t.detach()
                    if isinstance(t, torch.nn.Parameter):
                        t.data = source.to(device, to)  # the same Parameter object (tied weights stay tied)
                    else:
                        table[name] = source.to(device, to)
                    _drop_file_pages(source, mappings, libc)
                    del source
    release_memory()


@functools.cache
def _libc():  # find_library runs ldconfig: once per process, not at every park and move
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


class Parked:
    """Components of a pipeline kept off `device` while the loop runs (see the module docstring).

    `park(names)` takes them off; `back()` is a context manager that puts them back on the device for
    its body (sampling) and parks them again afterwards."""

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, torch.device(device)
        self.names: list[str] = []
        self._dir: Path | None = None
        self._cleanup = None
        self._ties: dict[str, dict[str, str]] = {}

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def _file(self, name: str) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="finetune-parked-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir / f"{name}.safetensors"

    def park(self, names: list[str]) -> list[str]:
        """Take the named components (those the pipeline has) off the device; returns their names."""
        from safetensors.torch import save_file

        names = [n for n in names if getattr(self.pipe, n, None) is not None and n not in self.names]
        for name in names:
            module = getattr(self.pipe, name)
            if self.on_cpu:
                path = self._file(name)
                if not path.is_file():  # frozen: the weights written once stay right
                    self._ties[name] = _ties(module)
                    save_file({k: t.detach().contiguous() for k, t in _tensors(module)}, str(path))
                module.to("meta")
            else:
                module.to("cpu")
        self.names += names
        if names and self.on_cpu:
            release_memory()
        return names

    def _unpark(self) -> None:
        from safetensors.torch import load_file

        for name in self.names:
            module = getattr(self.pipe, name)
            if self.on_cpu:
                saved = load_file(str(self._file(name)))
                module.to_empty(device=self.device)
                _tie(module, self._ties[name])
                with torch.no_grad():
                    for key, t in _tensors(module):
                        t.copy_(saved[key])
                del saved
            else:
                module.to(self.device)

    @contextlib.contextmanager
    def back(self):
        """The parked components on the device for the body of the `with` (then parked again)."""
        names = list(self.names)
        self._unpark()
        self.names = []
        try:
            yield
        finally:
            self.park(names)

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()

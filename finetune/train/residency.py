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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
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
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


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

"""Which precision a run trains in: `train.mixed_precision = "auto"` picks the fastest the hardware has.

- CUDA with bf16 (compute capability 8.0 and up: Ampere, Ada, Hopper, ...): bf16.
- Older CUDA cards: fp16, with accelerate's gradient scaler (fp16 overflows without one).
- A CPU with bf16 instructions (AMX-BF16, or AVX512-BF16): bf16; oneDNN runs bf16 matmuls and
  convolutions there at about twice the fp32 rate (`bench/train.py` measures it on SD 1.5's UNet).
- Anything else (an older CPU, Apple's MPS): fp32, where half precision is emulated or unreliable.

Frozen weights (UNet, text encoders, VAE) are held in the chosen dtype; the LoRA parameters and their
optimizer state stay fp32 whatever is chosen. The choice and its reason are printed in the run header
and kept in run.json; a checkpoint records the resolved precision, and resuming it where "auto" (or
the config) resolves to another precision is refused by name, since the continued run would not be
the one that was started.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.errors import FinetuneError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""By `vocab.TRAINING_PRECISIONS` name."""
NAMES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU features that make bf16 fast, in `torch.cpu.get_capabilities()`'s names (cpuinfo's)."""


@dataclass(frozen=True)
class Precision:
    """A resolved training precision."""

    mode: str
    """accelerate's name: "no" (fp32), "fp16" or "bf16"."""
    reason: str
    """Why: "set in the config", or what "auto" found on this device."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the frozen weights."""
        return DTYPES[self.mode]

    @property
    def name(self) -> str:
        """fp32 | fp16 | bf16."""
        return NAMES[self.mode]

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_capabilities() -> dict:
    """This CPU's features (cpuinfo's, as torch reads them); empty where torch cannot tell."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get else {}
    except RuntimeError:
        return {}


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_precision(asked: str, device: torch.device) -> Precision:
    """The precision for `train.mixed_precision = asked` ("auto", "no", "fp16" or "bf16") on `device`."""
    if asked != "auto":
        return Precision(asked, "set in the config")
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if major >= 8:
            return Precision("bf16", f"auto: CUDA compute capability {major}.{minor} has bf16")
        return Precision("fp16", f"auto: CUDA compute capability {major}.{minor} has no fast bf16; fp16 with a "
                                 "gradient scaler")
    if device.type == "cpu":
        caps = cpu_capabilities()
        found = [flag for flag in CPU_BF16_FLAGS if caps.get(flag)]
        if found:
            return Precision("bf16", f"auto: the CPU has {found[0].upper().replace('_', '-')}")
        return Precision("no", "auto: the CPU has neither AMX-BF16 nor AVX512-BF16")
    return Precision("no", f"auto: no fast half precision known on {device.type}")


def saved_precision(saved_config: dict) -> str:
    """The precision a checkpoint was trained in (its `_precision`; before that was recorded, the
    config's `train.mixed_precision`, which could not be "auto" then)."""
    return saved_config.get("_precision") or saved_config["train"]["mixed_precision"]


def check_resume_precision(saved_config: dict, precision: Precision) -> None:
    """Refuse to continue a checkpoint in another precision than it was trained in."""
    saved = saved_precision(saved_config)
    if saved != precision.mode:
        raise FinetuneError(f"cannot resume: the checkpoint was trained in {NAMES[saved]}, but this run would train in "
                            f"{precision.describe()}; a run continues in the precision it started in: add --set "
                            f"train.mixed_precision={saved} (on a device that runs {NAMES[saved]}), or start a new run "
                            "without --resume")

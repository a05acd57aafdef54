"""Names that the config, the CLI and the stages share, in one torch-free place.

The config validates against them, the CLI offers them as choices, and each stage maps them to what it
runs (export: a torch dtype per name; train: accelerate's precision; sampling: a diffusers scheduler), so
a name is added here once and every layer agrees on it.
"""

from __future__ import annotations

SAMPLERS = ("ddim", "euler", "euler-a", "dpmpp-2m", "flow-euler")
"""`sample.scheduler` / `--scheduler`: the samplers of training samples and `finetune sample`
(finetune.train.samples maps each to its diffusers scheduler and A1111 name); flow-euler is the
flow-matching bases' (FLUX.1), the others are for DDPM-trained bases (SD 1.x, SDXL)."""
EXPORT_FORMATS = ("peft", "kohya", "merged", "merged-diffusers")
"""`finetune export` formats: peft (diffusers) and kohya (A1111, ComfyUI, Forge) LoRA files, the LoRA
merged into a single-file checkpoint, or into a diffusers folder."""
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
"""Tensor dtypes of exported files."""
PRECISION_MODES = ("auto", "no", "fp16", "bf16")
"""`train.mixed_precision`: "auto" picks by hardware (finetune.train.precision); "no" is fp32."""
TRAINING_PRECISIONS = ("no", "fp16", "bf16")
"""What "auto" resolves to: accelerate's names for the precision a run trains in."""
TIMESTEP_SAMPLERS = ("uniform", "sigmoid", "shift", "flux_shift")
"""`flow.timestep_sampler`: how flow-matching training draws noise levels (finetune.models.families.flux_flow)."""
QUANTIZE = ("none", "nf4", "int8")
"""`model.quantize`: the frozen denoiser's weights through bitsandbytes (QLoRA), or none."""
OFFLOAD = ("none", "blocks")
"""`model.offload`: keep the denoiser's blocks in CPU memory, each moved to the GPU for its forward pass."""

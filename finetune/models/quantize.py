"""Memory tiers: a frozen base quantized by bitsandbytes (QLoRA: NF4 or 8-bit weights, the LoRA in higher
precision), and the denoiser's blocks offloaded to CPU memory.

Loading goes through diffusers' `BitsAndBytesConfig` (`quantization_config=` of `from_pretrained` /
`from_single_file`). diffusers' bitsandbytes quantizer needs an NVIDIA CUDA GPU: elsewhere it refuses
with "No GPU found" (checked on a CPU with bitsandbytes 0.50 and diffusers 0.42, where 8-bit AdamW does
run). So the quantized path is refused up front on a machine without one, saying what it needs.
"""

from __future__ import annotations

from finetune.errors import FinetuneError
from finetune.vocab import QUANTIZE


def needs_cuda(key: str, value: str) -> str:
    """The refusal of a memory tier on a machine without an NVIDIA CUDA GPU (torch-free: the CLI says it
    before loading anything)."""
    what = {"model.quantize": "loads the frozen base through bitsandbytes (diffusers' BitsAndBytesConfig)",
            "model.offload": "moves the denoiser's blocks between CPU memory and the GPU (diffusers' group offloading)"}
    why = " (unquantized, FLUX.1's transformer alone is 24 GB in bf16)" if key == "model.quantize" else ""
    return (f"{key} = {value!r} {what[key]}, which needs an NVIDIA GPU with CUDA; this machine has none. "
            f"Set {key} = \"none\" here{why}, or train on a CUDA machine.")


def require_cuda(kind: str, key: str = "model.quantize") -> None:
    """Refuse a quantized base (or offloading) where it cannot run."""
    import torch

    if not torch.cuda.is_available():
        raise FinetuneError(needs_cuda(key, kind))


def bnb_config(kind: str, compute_dtype=None):
    """diffusers' BitsAndBytesConfig for `kind` (nf4 | int8), None for none."""
    if kind not in QUANTIZE:
        raise FinetuneError(f"model.quantize = {kind!r}: expected one of {', '.join(QUANTIZE)}")
    if kind == "none":
        return None
    require_cuda(kind)
    import torch
    from diffusers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16)


def pipeline_quantization(kind: str, components: list[str], compute_dtype=None):
    """diffusers' PipelineQuantizationConfig quantizing `components` (the denoiser) of a pipeline loaded
    with `from_pretrained`; None for none."""
    config = bnb_config(kind, compute_dtype)
    if config is None:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={name: config for name in components})


def is_quantized(module) -> bool:
    """Loaded through a quantization config: its weights stay where and how bitsandbytes put them."""
    return getattr(module, "hf_quantizer", None) is not None or bool(getattr(module, "is_quantized", False))


def offload_blocks(denoiser, device) -> None:
    """Keep the denoiser's blocks in CPU memory, each group moved to `device` for its own forward pass
    (diffusers' block-level group offloading, with a CUDA stream to overlap the copies)."""
    import torch

    require_cuda("blocks", "model.offload")
    device = torch.device(device)
    denoiser.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.type == "cuda")

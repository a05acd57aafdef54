"""A frozen base quantized by bitsandbytes (QLoRA): NF4 or 8-bit weights, the LoRA in higher precision.

Loading goes through diffusers' `BitsAndBytesConfig` (`quantization_config=` of `from_pretrained` /
`from_single_file`). diffusers' bitsandbytes quantizer needs an NVIDIA CUDA GPU: elsewhere it refuses
with "No GPU found" (checked on a CPU with bitsandbytes 0.50 and diffusers 0.42, where 8-bit AdamW does
run). So the quantized path is refused up front on a machine without one, saying what it needs.
"""

from __future__ import annotations

from finetune.errors import FinetuneError

QUANTIZE = ("none", "nf4", "int8")


def require_cuda(kind: str) -> None:
    """Refuse a quantized base where diffusers' bitsandbytes quantizer cannot run."""
    import torch

    if not torch.cuda.is_available():
        raise FinetuneError(
            f"model.quantize = {kind!r} loads the frozen base through bitsandbytes (diffusers' BitsAndBytesConfig), "
            "which needs an NVIDIA GPU with CUDA; this machine has none. Set model.quantize = \"none\" here "
            "(a full-precision base needs a 24 GB card for FLUX.1), or train on a CUDA machine.")


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

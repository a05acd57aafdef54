"""QLoRA's quantized base: refused without CUDA, naming what it needs; loaded as 4-bit/8-bit with it."""

import pytest
import torch
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

from finetune.errors import FinetuneError
from finetune.models.families.flux_tiny import tiny_flux_base_dir
from finetune.models.quantize import bnb_config

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantization needs a CUDA GPU")


@no_cuda
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_refused_without_cuda_naming_the_hardware(kind):
    with pytest.raises(FinetuneError, match=f"model.quantize = '{kind}'.*NVIDIA GPU with CUDA.*\"none\""):
        bnb_config(kind)


@no_cuda
def test_diffusers_quantizer_itself_needs_a_gpu():
    """Why the refusal: if diffusers' bitsandbytes path ever runs on a CPU, this fails and the quantized
    path can be tested here."""
    with pytest.raises(RuntimeError, match="GPU"):
        FluxTransformer2DModel.from_pretrained(str(tiny_flux_base_dir("dev")), subfolder="transformer",
                                               quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                               local_files_only=True)


def test_none_and_unknown():
    assert bnb_config("none") is None
    with pytest.raises(FinetuneError, match="model.quantize = 'fp4': expected one of none, nf4, int8"):
        bnb_config("fp4")


@needs_cuda
@pytest.mark.parametrize("kind,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_tiny_flux_runs_on_cuda(kind, layer):
    t = FluxTransformer2DModel.from_pretrained(str(tiny_flux_base_dir("dev")), subfolder="transformer",
                                               quantization_config=bnb_config(kind), torch_dtype=torch.bfloat16,
                                               local_files_only=True)
    assert type(t.transformer_blocks[0].attn.to_q).__name__ == layer
    out = t(hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16, device="cuda"),
            encoder_hidden_states=torch.randn(1, 8, 32, dtype=torch.bfloat16, device="cuda"),
            pooled_projections=torch.randn(1, 32, dtype=torch.bfloat16, device="cuda"),
            timestep=torch.tensor([0.5], device="cuda"), img_ids=torch.zeros(16, 3, device="cuda"),
            txt_ids=torch.zeros(8, 3, device="cuda"), guidance=torch.tensor([1.0], device="cuda")).sample
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all()

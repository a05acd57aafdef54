"""The run's lora/ folder: peft keys for every target kind, read back exactly by `load_lora_weights`."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.models import load_base
from finetune.train.lora import finish, fit, setup
from finetune import runs

from train_helpers import tiny_config


def image(pipe) -> np.ndarray:
    return pipe("a photo of ohwx person", num_inference_steps=3, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(7), output_type="np").images[0]


def test_attention_feed_forward_and_proj_in_loras_all_load_back(dataset, tmp_path):
    # Before the fix, attention LoRAs were renamed to diffusers' old keys and the others kept peft keys;
    # load_lora_weights then silently dropped every attention LoRA.
    targets = "['to_q', 'to_k', 'to_v', 'to_out.0', 'ff.net.0.proj', 'proj_in']"
    run = setup(tiny_config("train.max_steps=3", "train.optimizer=adamw", "lora.alpha=2",
                            f"lora.targets={targets}"), dataset, tmp_path / "run")
    fit(run)
    run.denoiser.eval()
    with run.parked.back():  # the VAE and text encoder left the device once their outputs were cached
        in_memory = image(run.base.pipe)
    finish(run)

    keys = load_file(tmp_path / "run" / "lora" / runs.WEIGHT_NAME).keys()
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    for target in ("attn1.to_q", "attn2.to_out.0", "ff.net.0.proj", "proj_in"):
        assert any(f".{target}.lora_A.weight" in k for k in keys), target

    fresh = load_base("tiny").pipe
    baseline = image(fresh)
    fresh.load_lora_weights(tmp_path / "run" / "lora")
    np.testing.assert_array_equal(image(fresh), in_memory)
    assert np.abs(in_memory - baseline).max() > 1e-3

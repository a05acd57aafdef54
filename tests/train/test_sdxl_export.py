"""A tiny SDXL trained by the recipe, exported by `finetune export`: every format gives the trained model's image.

tests/test_export_sdxl.py proves the same round trips on a fixture LoRA with random weights; here the
LoRA (UNet and both text encoders) comes out of `setup` + `fit` + `finish`, so what training writes
(run.json, config.json, the adapter's header and key layout) is what export reads.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers_run import load_lora, read_header, render

from finetune.export import export
from finetune.models import load_base
from finetune.models.families.sdxl_tiny import tiny_sdxl_base_dir
from finetune.train.lora import finish, fit, setup

from train_helpers import tiny_sdxl_config

# Both LoRA files load into peft layers with the trained fp32 weights and alphas: measured bit-equal
# (0); 1e-5 leaves room for a converter that folds alpha / rank into the matrices (another rounding).
LORA_TOL = 1e-5
# Fusing adds scale * B @ A into each fp32 weight, which reorders float sums: measured 1.3e-6, bound as
# for the fixture (5e-5, ~1/80 of one 8-bit level; pixels are in [0, 1]).
MERGED_TOL = 5e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_master):
    """(run folder, image of the trained model in memory, image of the base): 4 steps at lr 1e-2,
    LoRAs on the UNet (rank 4, alpha 8) and both text encoders (rank 2, alpha 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module fixture runs before the per-test one-thread fixture
    try:
        root = tmp_path_factory.mktemp("sdxl-export")
        dataset = shutil.copytree(prepared_master, root / "datasets" / "me")
        cfg = tiny_sdxl_config("train.max_steps=4", "train.lr=1e-2", "train.text_encoder_lr=1e-2",
                               "lora.train_text_encoder=true", "lora.text_encoder_rank=2",
                               "lora.text_encoder_alpha=4")
        run = setup(cfg, dataset, root / "run")
        fit(run)
        for m in (run.denoiser, run.encoders["text_encoder"], run.encoders["text_encoder_2"]):
            m.eval()
        with run.parked.back():
            image = render(run.base.pipe)
        finish(run)
        base_image = render(load_base("tiny-sdxl").pipe)
    finally:
        torch.set_num_threads(threads)
    return run.dir, image, base_image


@pytest.fixture()
def base(tiny_sdxl_base):
    return tiny_sdxl_base


def test_the_trained_lora_changes_the_image(trained):
    _, image, base_image = trained
    assert np.abs(image - base_image).max() > 100 * MERGED_TOL  # else the comparisons below prove nothing


def test_peft_file_through_load_lora_weights(trained, base, tmp_path):
    run, image, _ = trained
    path = export(run, "peft", dtype="fp32", out=tmp_path)
    meta, tensors = read_header(path)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["finetune.arch"] == "sdxl"
    diff = np.abs(render(load_lora(base, path)) - image).max()
    assert diff <= LORA_TOL, diff


def test_kohya_file_through_diffusers_own_converter(trained, base, tmp_path):
    run, image, _ = trained
    path = export(run, "kohya", dtype="fp32", out=tmp_path)
    meta, tensors = read_header(path)
    modules = {k.split(".")[0] for k in tensors}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) for m in unet)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == \
        ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")
    diff = np.abs(render(load_lora(base, path)) - image).max()
    assert diff <= LORA_TOL, diff


def test_merged_single_file_through_from_single_file_offline(trained, tmp_path):
    run, image, _ = trained
    path = export(run, "merged", dtype="fp32", scale=1.0, out=tmp_path / "merged.safetensors")
    meta, tensors = read_header(path)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["finetune.arch"] == "sdxl"
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_base_dir()),
                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    diff = np.abs(render(pipe) - image).max()
    assert diff <= MERGED_TOL, diff


def test_merged_diffusers_folder(trained, tmp_path):
    import json

    run, image, _ = trained
    path = export(run, "merged-diffusers", dtype="fp32", scale=1.0, out=tmp_path / "folder")
    info = json.loads((path / "finetune_export.json").read_text())
    assert info["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and info["finetune.arch"] == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    diff = np.abs(render(pipe) - image).max()
    assert diff <= MERGED_TOL, diff

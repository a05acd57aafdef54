"""`finetune export` of an SDXL run, proven by round trips on the tiny SDXL: the peft file, the kohya file
(through diffusers' own converter), the merged single file (through `StableDiffusionXLPipeline.from_single_file`
with the tiny SDXL's local config, offline) and the merged diffusers folder all give the image of the LoRA
model in memory; an SD 1.x LoRA and an SDXL base (and the reverse) are refused naming both."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import StableDiffusionXLPipeline
from helpers_run import (load_lora, lora_pipe, make_fake_run, one_torch_thread,  # noqa: F401 (fixture)
                          read_header, render)

from finetune import lora_io, runs
from finetune.cli import cli
from finetune.export import export
from finetune.models.single_file import pipeline_to_ldm
from finetune.models.families.sdxl_tiny import tiny_sdxl_base_dir

SCALE = 0.7
LORA_TOL = 1e-5  # the LoRA files load into the same peft layers: measured 0 here
MERGED_FP32_TOL = 5e-5  # fusing reorders float sums (same bound as SD 1.x)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An SDXL run with LoRAs on the UNet and both text encoders (alpha 8 / 2 at rank 4)."""
    return make_fake_run(tmp_path_factory.mktemp("export-sdxl"), arch="sdxl", text_encoder=True)


@pytest.fixture(scope="module")
def refs():
    """Images of the LoRA model in memory (its peft adapters, no file read): at scale 1 and at SCALE."""
    pipe = lora_pipe(arch="sdxl", text_encoder=True)
    full = render(pipe)
    pipe.set_adapters(["default"], [SCALE])
    return {"full": full, "scaled": render(pipe)}


@pytest.fixture()
def base(tiny_sdxl_base):
    return tiny_sdxl_base


def test_peft_file_gives_the_lora_models_image(run, refs, base, tmp_path):
    path = export(run, "peft", dtype="fp32", out=tmp_path)
    meta, tensors = read_header(path)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.") for k in tensors)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert [(adapter[f"{c}.r"], adapter[f"{c}.lora_alpha"]) for c in ("unet", "text_encoder", "text_encoder_2")] == \
        [(4, 8.0), (4, 2.0), (4, 2.0)]
    assert meta["finetune.arch"] == "sdxl" and meta["finetune.te2_alpha"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    diff = np.abs(render(load_lora(base, path)) - refs["full"]).max()
    assert diff <= LORA_TOL, diff


def test_kohya_file_in_sdxl_naming_through_diffusers_own_converter(run, refs, base, tmp_path):
    path = export(run, "kohya", dtype="fp32", out=tmp_path)
    meta, tensors = read_header(path)
    modules = {k.split(".")[0] for k in tensors}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    assert not [m for m in modules if m.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block_"))]
    assert tensors["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.alpha"].item() == 8.0
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"  # as kohya writes

    # every UNet and CLIP-L name is a module of the original layout (what ComfyUI/A1111 look names up in)
    ldm = {k.rsplit(".", 1)[0].replace(".", "_") for k in pipeline_to_ldm(base)}
    unknown = [m for m in modules if m.startswith("lora_unet_")
               and "model_diffusion_model_" + m.removeprefix("lora_unet_") not in ldm]
    unknown += [m for m in modules if m.startswith("lora_te1_")
                and "conditioner_embedders_0_transformer_" + m.removeprefix("lora_te1_") not in ldm]
    assert not unknown, unknown[:3]

    diff = np.abs(render(load_lora(base, path)) - refs["full"]).max()
    assert diff <= LORA_TOL, diff
    # the check has teeth: without alphas (loaders then take alpha = rank) it is another image
    bare = lora_io.write_safetensors(tmp_path / "bare.safetensors",
                                     {k: v for k, v in tensors.items() if not k.endswith(".alpha")}, {})
    assert np.abs(render(load_lora(base, bare)) - refs["full"]).max() > 1e-2


def test_merged_single_file_in_the_original_sdxl_layout(run, refs, tmp_path):
    path = export(run, "merged", dtype="fp32", scale=SCALE, out=tmp_path / "m.safetensors")
    meta, tensors = read_header(path)
    assert {k.split(".")[0] for k in tensors} == {"model", "first_stage_model", "conditioner"}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.0.") for k in tensors)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors and not [k for k in tensors if "lora" in k]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["finetune.arch"] == "sdxl"

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_base_dir()),
                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    diff = np.abs(render(pipe) - refs["scaled"]).max()
    assert diff <= MERGED_FP32_TOL, diff


def test_merged_diffusers_folder(run, refs, tmp_path):
    path = export(run, "merged-diffusers", dtype="fp32", scale=SCALE, out=tmp_path / "folder")
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert "StableDiffusionXLPipeline.from_pretrained" in (path / "README.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    diff = np.abs(render(pipe) - refs["scaled"]).max()
    assert diff <= MERGED_FP32_TOL, diff


# ---------------------------------------------------------------- the wrong architecture


def _one_line_error(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    out = result.output.strip()
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and out.endswith(errors[0]) and "Traceback" not in out, out
    return errors[0]


def _on_base(run, tmp_path, base: str):
    """A copy of `run` that says it was trained on `base` (header and run.json)."""
    other = tmp_path / "outputs" / f"{run.name}-on-{base}"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "export"))
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**info, "base": base}))
    file = other / "lora" / runs.WEIGHT_NAME
    tensors, meta = lora_io.read_safetensors(file)
    lora_io.write_safetensors(file, tensors, {**meta, "finetune.base": base})
    return other


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("export-sd1"), name="sd1-run")


def test_merging_onto_the_other_architecture_is_refused_naming_both(run, sd1_run, tmp_path):
    msg = _one_line_error(["export", _on_base(sd1_run, tmp_path, "tiny-sdxl"), "-f", "merged", "-o", tmp_path])
    assert "made for SD 1.x (cross-attention width 32)" in msg
    assert "the base is SDXL (cross-attention width 96, two text encoders)" in msg
    msg = _one_line_error(["export", _on_base(run, tmp_path, "tiny"), "-f", "merged-diffusers", "-o", tmp_path])
    assert "made for SDXL (cross-attention width 96, two text encoders)" in msg
    assert "the base is SD 1.x (cross-attention width 32)" in msg
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*merged*"))


def test_inspect_names_sdxl_and_checks_the_base(run, sd1_run, tmp_path):
    kohya = export(run, "kohya", out=tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(kohya), "--base", "tiny-sdxl"])
    assert result.exit_code == 0, result.output
    assert "made for" in result.output and "SDXL (cross-attention width 96, two text encoders)" in result.output
    assert result.output.strip().endswith("fits base tiny-sdxl (SDXL (cross-attention width 96, two text encoders))")
    msg = _one_line_error(["inspect", kohya, "--base", "tiny"])
    assert "made for SDXL" in msg and "the base is SD 1.x" in msg
    sd1 = sd1_run / "lora" / runs.WEIGHT_NAME
    msg = _one_line_error(["inspect", sd1, "--base", "tiny-sdxl"])
    assert "made for SD 1.x" in msg and "the base is SDXL" in msg


def test_architecture_comes_from_the_header(run, tmp_path):
    """A LoRA's own header names its architecture (finetune.arch, kohya's ss_base_model_version,
    modelspec); without one, its modules tell."""
    layers = lora_io.to_layers(*lora_io.read_lora(run / "lora" / runs.WEIGHT_NAME))
    unet_only = [l for l in layers if l.component == "unet"]
    assert lora_io.lora_architecture(unet_only) == "sdxl"  # several transformer blocks per attention
    assert lora_io.lora_architecture(unet_only, {"ss_base_model_version": "sd_v1"}) == "sd1"
    assert lora_io.lora_architecture([], {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == "sdxl"
    assert lora_io.lora_architecture([], {"finetune.arch": "sd2", "ss_base_model_version": "sdxl_base_v1-0"}) == "sd2"
    assert lora_io.describe_lora_architecture(unet_only).startswith("SDXL (cross-attention width 96")

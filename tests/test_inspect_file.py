"""`finetune inspect`: our exports, files other tools made, checkpoints and folders."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from helpers_run import make_fake_run, one_torch_thread  # noqa: F401 (fixture)

from finetune import lora_io
from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.inspect_file import format_report, inspect_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("inspect"), text_encoder=True)


def _invoke(*args):
    result = CliRunner().invoke(cli, ["inspect", *map(str, args)])
    return result.exit_code, result.output.strip()


def _sd15_kohya(path, *, alphas=True, metadata=None):
    """A kohya LoRA as sd-scripts writes one for SD 1.5: no finetune.* keys, ss_* metadata or none."""
    t = {}
    for block in ("down_blocks_1_attentions_0_transformer_blocks_0", "up_blocks_3_attentions_2_transformer_blocks_0"):
        for proj, width in (("attn1_to_q", 320), ("attn2_to_k", 768)):
            name = f"lora_unet_{block}_{proj}"
            t[f"{name}.lora_down.weight"] = torch.zeros(8, width, dtype=torch.float16)
            t[f"{name}.lora_up.weight"] = torch.zeros(320, 8, dtype=torch.float16)
            if alphas:
                t[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(8, 768, dtype=torch.float16)
    t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(3072, 8, dtype=torch.float16)
    if alphas:
        t["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    return lora_io.write_safetensors(path, t, metadata or {})


def test_our_kohya_export(run, tmp_path):
    info = inspect_path(export(run, "kohya", out=tmp_path))
    assert info["format"] == "kohya" and info["rank"] == "4"
    unet, te = info["components"]["unet"], info["components"]["text_encoder"]
    assert (unet["alpha"], unet["scale"], te["alpha"], te["scale"]) == ("8", "2", "2", "0.5")
    assert unet["targets"] == ["conv1", "ff.net.2", "proj_in", "to_k", "to_out.0", "to_q", "to_v"]
    assert te["targets"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert info["alpha_source"] == "alpha tensors"
    assert info["made_for"] == "SD 1.x (cross-attention width 32)"  # the header's ss_base_model_version / finetune.arch
    assert (info["base_model"], info["trigger"]) == ("tiny", "ohwx")
    assert info["metadata"]["ss_network_alpha"] == "8"
    assert info["dtypes"] == {"fp16": 396, "fp32": 198}  # 198 modules: fp16 down and up, fp32 alpha
    assert info["size_bytes"] == (tmp_path / "ohwx-run.safetensors").stat().st_size


def test_run_folder_and_its_peft_file(run):
    info = inspect_path(run)  # a run folder: its final adapter
    assert info["path"].endswith("lora/pytorch_lora_weights.safetensors")
    assert info["format"] == "peft" and info["alpha_source"] == "header (lora_adapter_metadata)"
    assert info["components"]["unet"]["alpha"] == "8" and info["components"]["text_encoder"]["alpha"] == "2"


def test_a_kohya_file_from_sd_scripts(tmp_path):
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "1",
            "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_new_sd_model_hash": "cc6cb27103",
            "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 20, "grass": 3, " sitting": 5}})}
    info = inspect_path(_sd15_kohya(tmp_path / "dog.safetensors", metadata=meta))
    assert info["format"] == "kohya" and info["made_for"] == "SD 1.x (cross-attention width 768)"
    assert (info["rank"], info["alpha"], info["components"]["unet"]["scale"]) == ("8", "1", "0.125")
    assert info["base_model"] == "v1-5-pruned-emaonly.safetensors" and info["base_hash"] == "cc6cb27103"
    assert info["trigger"] == "" and info["top_tags"] == ["sks dog", "sitting", "grass"]
    assert info["components"]["text_encoder"]["targets"] == ["fc1"]
    report = format_report(info)
    assert "most frequent caption tags: sks dog, sitting, grass" in report and "ss_network_module: networks.lora" in report

    bare = inspect_path(_sd15_kohya(tmp_path / "bare.safetensors", alphas=False))
    assert bare["alpha"] == "8" and bare["alpha_source"] == "none stored: loaders use alpha = rank"
    assert bare["base_model"] == "" and re.search(r"^base model +not recorded$", format_report(bare), re.M)


def test_a_diffusers_lora_without_metadata(tmp_path):
    module = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    path = lora_io.write_safetensors(tmp_path / "d.safetensors", {f"{module}.lora.down.weight": torch.zeros(16, 32),
                                                                  f"{module}.lora.up.weight": torch.zeros(32, 16)}, {})
    info = inspect_path(path)
    assert info["format"] == "peft" and info["rank"] == "16" and info["alpha"] == "16"
    assert info["alpha_source"] == "none stored: diffusers assumes alpha = rank"


def test_checkpoint_and_diffusers_folder(tmp_path, tiny_pipe, tiny_dir):
    from finetune.models.single_file import save_single_file

    path = save_single_file(tiny_pipe, tmp_path / "model.safetensors", dtype=torch.float16,
                            metadata={"modelspec.title": "tiny"})
    info = inspect_path(path)
    assert info["format"] == "checkpoint" and info["architecture"] == "sd1"
    assert set(info["parts"]) == {"unet", "vae", "text encoder"} and info["dtypes"] == {"fp16": info["tensors"]}
    folder = inspect_path(tiny_dir)
    assert folder["format"] == "diffusers-folder" and folder["architecture"] == "sd1"
    assert folder["cross_attention_width"] == 32 and "unet" in folder["components"]


def test_cli_report_json_and_base_check(run, tmp_path):
    path = export(run, "kohya", out=tmp_path)
    code, out = _invoke(path)
    assert code == 0, out
    for label in ("format", "made for", "rank", "alpha", "unet", "text_encoder", "base model", "trigger", "metadata"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "targets conv1, ff.net.2, proj_in, to_k, to_out.0, to_q, to_v" in out
    code, out = _invoke(path, "--json")
    assert code == 0 and json.loads(out)["components"]["unet"]["alpha"] == "8"
    code, out = _invoke(path, "--base", "tiny")
    assert code == 0 and out.endswith("fits base tiny (SD 1.x (cross-attention width 32))"), out


def _error_line(code, out):
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and out.endswith(errors[0]) and "Traceback" not in out, out
    return errors[0]


def test_cli_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "is not a safetensors file" in _error_line(*_invoke(text))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    assert "pickle" in _error_line(*_invoke(ckpt))
    msg = _error_line(*_invoke(_sd15_kohya(tmp_path / "dog.safetensors"), "--base", "tiny"))
    assert "SD 1.x (cross-attention width 768)" in msg and "SD 1.x (cross-attention width 32)" in msg
    with pytest.raises(FinetuneError, match="without model_index.json"):
        inspect_path(tmp_path)


def test_training_checkpoint_state_is_described_not_read_as_a_broken_lora(tmp_path):
    """Issue 13 item 20: a checkpoint's state.safetensors holds `trainable/...lora_A.weight` keys among
    optimizer state, and was reported as a "peft-layout LoRA" with 1026 bad keys."""
    from finetune.train.checkpoint import capture_rng, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    weight = torch.nn.Parameter(torch.ones(4, 8))
    trainable = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": weight}
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    state = {"step": 3, "config": {"model": {"base": "tiny"}, "data": {"trigger": "ohwx"}}, "trainable": trainable,
             "optimizer": optimizer.state_dict(), "lr_scheduler": {}, "grad_scaler": None,
             "sampler": {"epoch": 0, "index": 2}, "rng": [capture_rng()]}
    folder = save_checkpoint(run, 3, lora_files={"unet.x.lora_A.weight": torch.zeros(4, 8),
                                                 "unet.x.lora_B.weight": torch.zeros(8, 4)}, state=state, keep=1)
    info = inspect_path(folder / "state.safetensors")
    assert info["format"] == "training-state" and info["step"] == 3
    assert (info["base_model"], info["trigger"]) == ("tiny", "ohwx")
    assert info["holds"] == {"LoRA weights in fp32": 1, "optimizer state": 3}  # step, exp_avg, exp_avg_sq
    code, out = _invoke(folder / "state.safetensors")
    assert code == 0, out
    assert "peft" not in out and "not a LoRA" in out
    assert f"its LoRA    {folder / 'lora' / 'pytorch_lora_weights.safetensors'}" in out
    assert f"to export   finetune export {run} --checkpoint step-000003" in out
    assert "holds       LoRA weights in fp32 (1 tensor), optimizer state (3 tensors)" in out
    code, out = _invoke(folder / "rng-rank0.safetensors")
    assert code == 0 and "random-number-generator states" in out, out

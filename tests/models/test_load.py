"""load_base: tiny, diffusers folder, single file, pickle refusal, hub id offline."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.models import load_base
from finetune.models.single_file import pipeline_to_ldm
from finetune.models.tiny import build_tiny_pipeline


def image(pipe, seed=0):
    out = pipe("a photo of ohwx person", num_inference_steps=4, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def reference():
    """The image of the tiny base built in memory, never saved."""
    return image(build_tiny_pipeline())


def test_tiny_is_deterministic_and_small(reference):
    pipe = build_tiny_pipeline()
    np.testing.assert_array_equal(image(pipe), reference)
    # small enough that a test step takes milliseconds (sizes, not a timed test: the suite's hosts are shared)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 3_000_000
    assert sum(p.numel() for p in pipe.vae.parameters()) < 2_000_000
    unet = pipe.unet.config
    assert len(unet.down_block_types) == 4 and unet.layers_per_block == 2
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.tokenize("a photo of ohwx person") == ["a</w>", "photo</w>", "of</w>", "ohwx</w>", "person</w>"]


def test_folder_and_single_file_reload_give_identical_images(tmp_path, reference, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(cli, ["base", "tiny", "--out", str(tmp_path / "tiny"),
                                 "--single-file", str(tmp_path / "tiny.safetensors")])
    assert r.exit_code == 0, r.output
    folder = load_base(str(tmp_path / "tiny"))
    assert folder.kind == "folder" and folder.arch == "sd1"
    np.testing.assert_array_equal(image(folder.pipe), reference)
    single = load_base(str(tmp_path / "tiny.safetensors"), config=str(tmp_path / "tiny"))
    assert single.kind == "single-file" and single.arch == "sd1"
    np.testing.assert_array_equal(image(single.pipe), reference)
    # without --config the tiny topology is recognised and its local configs used (offline)
    detected = load_base(str(tmp_path / "tiny.safetensors"))
    np.testing.assert_array_equal(image(detected.pipe), reference)
    assert len(single.model_hash()) == 64 and single.model_hash() != folder.model_hash()


def _evil_checkpoint(path, marker, with_weights):
    """A .ckpt whose unpickling would create `marker` (what a malicious checkpoint does)."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = {k: v.contiguous() for k, v in pipeline_to_ldm(build_tiny_pipeline()).items()} if with_weights else {}
    torch.save({"state_dict": state, "payload": Evil()}, path)


def test_pickle_checkpoint_is_refused_and_never_runs_code(tmp_path):
    ckpt, marker = tmp_path / "model.ckpt", tmp_path / "pwned"
    _evil_checkpoint(ckpt, marker, with_weights=False)
    with pytest.raises(FinetuneError, match="pickle checkpoint.*--allow-pickle"):
        load_base(str(ckpt))
    with pytest.raises(FinetuneError, match="weights_only=True"):
        load_base(str(ckpt), allow_pickle=True)
    assert not marker.exists()
    r = CliRunner().invoke(cli, ["base", "info", str(ckpt), "--allow-pickle"])
    assert r.exit_code == 1 and "weights_only" in r.output and "Traceback" not in r.output
    assert not marker.exists()


def test_plain_pickle_checkpoint_loads_with_opt_in(tmp_path, reference):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: v.contiguous() for k, v in pipeline_to_ldm(build_tiny_pipeline()).items()}}, ckpt)
    with pytest.raises(FinetuneError):
        load_base(str(ckpt))
    b = load_base(str(ckpt), allow_pickle=True)
    np.testing.assert_array_equal(image(b.pipe), reference)
    assert b.files == [ckpt]


def test_hub_id_offline_is_one_line_and_fast():
    env = dict(os.environ, HF_HUB_OFFLINE="0")
    env.pop("HF_HUB_OFFLINE")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "finetune", "base", "info", "someone/not-cached-model"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert time.perf_counter() - t < 60
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "not in the local Hugging Face cache" in err[0] and "--base PATH" in err[0]
    assert "Traceback" not in r.stderr


def test_bad_specs_are_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    for spec, msg in [(str(tmp_path / "missing"), "file not found"), ("sd15", "neither `tiny`"),
                      (str(tmp_path / "notes.txt"), "unknown checkpoint type"),
                      (str(tmp_path), "model_index.json")]:
        r = CliRunner().invoke(cli, ["base", "info", spec])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    r = CliRunner().invoke(cli, ["base", "info", str(bad)])
    assert r.exit_code == 1 and "not a readable safetensors file" in r.output


def test_a_missing_base_file_says_file_not_found(tmp_path, monkeypatch):
    """Issue 13 item 12: `--base ~/models/x.safetensors` that does not exist is a missing file, not a bad hub id."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for spec in ("~/models/x.safetensors", "models/x.safetensors", str(tmp_path / "a" / "b" / "folder")):
        r = CliRunner().invoke(cli, ["base", "info", spec])
        assert r.exit_code == 1 and r.output.startswith(f"error: base model {spec}: file not found"), r.output
        assert "neither" not in r.output and "hub id (org/name)" in r.output
    r = CliRunner().invoke(cli, ["base", "info", "~/models/x.safetensors"])
    assert f"(nothing at {tmp_path / 'models' / 'x.safetensors'})" in r.output


def test_offline_hub_message_gives_the_download_command_size_and_cache(tmp_path, monkeypatch):
    """Issue 13 item 12: the exact `hf download` command, the download size and where the cache is (HF_HOME)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "finetune", "base", "info", "stabilityai/stable-diffusion-xl-base-1.0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: base model 'stabilityai/stable-diffusion-xl-base-1.0' is not in the local "
                               "Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE is set)")
    assert "download it (about 13.9 GB)" in r.stderr
    command = next(line.strip() for line in r.stderr.splitlines() if line.strip().startswith("hf download"))
    assert command == ("hf download stabilityai/stable-diffusion-xl-base-1.0 --include '*.json' --include '*.txt' "
                       "--include unet/diffusion_pytorch_model.safetensors --include vae/diffusion_pytorch_model.safetensors "
                       "--include text_encoder/model.safetensors --include text_encoder_2/model.safetensors")
    assert f"into the cache {tmp_path / 'hf' / 'hub'} (HF_HOME={tmp_path / 'hf'})" in r.stderr


def test_the_download_command_fetches_what_load_hub_reads_and_nothing_more():
    """The --include patterns match each component's weights and configs, not a repository's single-file
    checkpoints or fp16 copies (SD 1.5's repository holds 4 of each beside the diffusers folders)."""
    from fnmatch import fnmatch

    from finetune.models.load import HUB_INCLUDE

    def fetched(name):
        return any(fnmatch(name, p) for p in HUB_INCLUDE)

    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "tokenizer/merges.txt", "tokenizer/vocab.json", "text_encoder/model.safetensors",
                 "scheduler/scheduler_config.json", "text_encoder_2/model.safetensors"):
        assert fetched(name), name
    for name in ("v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"):
        assert not fetched(name), name


def test_peek_architecture_reads_configs_or_a_header_only(tmp_path):
    """What the training run's early checks use: no weights loaded, no network; None where it cannot tell."""
    from safetensors.torch import save_file

    from finetune.models.load import peek_architecture
    from finetune.models.families.sdxl_tiny import tiny_sdxl_base_dir

    assert (peek_architecture("tiny"), peek_architecture("tiny-sdxl")) == ("sd1", "sdxl")
    assert peek_architecture(str(tiny_sdxl_base_dir())) == "sdxl"
    for width, arch in [(768, "sd1"), (1024, "sd2")]:  # SD 2.x: the same pipeline class, OpenCLIP-H's width
        folder = tmp_path / arch
        (folder / "text_encoder").mkdir(parents=True)
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        (folder / "text_encoder" / "config.json").write_text(f'{{"hidden_size": {width}}}')
        assert peek_architecture(str(folder)) == arch
    for key, arch in [("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
                      ("cond_stage_model.model.ln_final.weight", "sd2"),
                      ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1")]:
        save_file({key: torch.zeros(1)}, str(tmp_path / f"{arch}.safetensors"))
        assert peek_architecture(str(tmp_path / f"{arch}.safetensors")) == arch
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    for spec in ["someone/not-cached-model", str(tmp_path / "missing"), str(tmp_path / "model.ckpt"), str(tmp_path)]:
        assert peek_architecture(spec) is None, spec

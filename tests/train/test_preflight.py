"""`finetune train` reports everything that needs no model before importing torch, all at once (issue 13 item 11)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import ConfigError, FinetuneError
from finetune.train.preflight import Problems, check_before_loading, cuda_impossible, default_run_dir

from train_helpers import tiny_config, write_dataset

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes")
# Runs `finetune train ARGS` in a fresh interpreter and reports which heavy modules were imported when it exited.
PROBE = f"""
import sys
from finetune.cli import cli
try:
    cli(["train", *sys.argv[1:]], prog_name="finetune")
finally:
    print("imported:", ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
"""


def train_in_fresh_process(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=120)


def errors_and_imports(r: subprocess.CompletedProcess) -> tuple[list[str], str]:
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("imported:"), r.stderr
    return lines[:-1], lines[-1].removeprefix("imported:").strip()


def test_a_config_typo_and_a_missing_dataset_are_reported_together_without_importing_torch(tmp_path):
    r = train_in_fresh_process(tmp_path, "--preset", "tiny-demo", "--dataset", "nope", "--set", "train.lrate=1")
    errors, imported = errors_and_imports(r)
    assert r.returncode == 2
    assert errors == ["error: 2 problems, nothing was started:",
                      "  - invalid config: unknown key train.lrate in --set (did you mean train.lr?)",
                      "  - dataset folder nope does not exist"]
    assert imported == "", f"imported {imported} before reporting a config typo"


def test_a_real_preset_on_a_cpu_reports_fp16_resolution_taken_folder_and_missing_base_at_once(
        example_photos, tmp_path):
    """What the newcomer met one 10-second run at a time (the presets then said fp16): all four in one
    message, before torch."""
    write_dataset(example_photos, tmp_path / "datasets" / "me", size=64)
    (tmp_path / "outputs" / "me-person-sd15-lora").mkdir(parents=True)
    (tmp_path / "outputs" / "me-person-sd15-lora" / "config.json").write_text("{}")
    r = train_in_fresh_process(tmp_path, "--preset", "person-sd15-lora", "--dataset", "datasets/me",
                               "--base", "models/x.safetensors", "--set", "train.mixed_precision=fp16",
                               CUDA_VISIBLE_DEVICES="")
    errors, imported = errors_and_imports(r)
    assert r.returncode == 1 and imported == "", r.stderr
    assert errors[0] == "error: 4 problems, nothing was started:"
    assert errors[1].startswith("  - outputs/me-person-sd15-lora already holds a run: pass --out NEW_FOLDER")
    assert errors[2].startswith("  - base model models/x.safetensors: file not found")
    assert errors[3].startswith("  - train.mixed_precision = 'fp16' needs a CUDA GPU")
    assert errors[4].startswith("  - dataset datasets/me was prepared at 64 px but this run trains at "
                                "data.resolution = 512 px")
    assert len(errors) == 5


def test_a_bad_value_skips_only_the_checks_that_read_it(example_photos, tmp_path, monkeypatch):
    """An invalid data.resolution is not judged against the dataset (its value would be a default), but
    fp16 on a CPU still is, beside the config problem."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    from finetune.config import collect_config

    dataset = write_dataset(example_photos, tmp_path / "datasets" / "me", size=64)
    cfg, problems = collect_config("tiny-demo", ["data.resolution=big", "train.mixed_precision=fp16"])
    with pytest.raises(Problems) as e:
        check_before_loading(cfg, dataset, preset="tiny-demo", config_problems=problems)
    assert e.value.exit_code == 2 and len(e.value.problems) == 2
    assert e.value.problems[0] == "invalid config: data.resolution = 'big' in --set should be integer"
    assert e.value.problems[1].startswith("train.mixed_precision = 'fp16' needs a CUDA GPU")
    cfg, problems = collect_config("tiny-demo", ["data.resolution=big"])  # only the config problem: as before
    with pytest.raises(ConfigError, match=r"^invalid config: data.resolution = 'big' in --set should be integer$"):
        check_before_loading(cfg, dataset, preset="tiny-demo", config_problems=problems)


def test_the_python_api_refuses_the_same_things_at_once(dataset, tmp_path, monkeypatch):
    from finetune.train.lora import setup

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(Problems) as e:
        setup(tiny_config("train.mixed_precision=fp16", "data.resolution=128"), dataset, tmp_path / "run")
    assert e.value.exit_code == 1
    assert [p.split(" ")[0] for p in e.value.problems] == [str(tmp_path / "run"), "train.mixed_precision", "dataset"]


def test_no_cuda_is_told_without_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_impossible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert cuda_impossible()
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    import torch

    if torch.cuda.is_available():  # never claims "no CUDA" where there is one
        assert not cuda_impossible()


def test_the_checkpoint_marker_is_the_checkpoints_own():
    """One owner (finetune.runs): checkpoint.py writes its marker, preflight asks runs whether a run has
    a checkpoint, and keeps no copy of the name."""
    from finetune import runs
    from finetune.train import checkpoint, preflight

    assert checkpoint.MARKER is runs.MARKER
    assert not hasattr(preflight, "CHECKPOINT_MARKER")


def test_a_feedback_run_defaults_to_its_own_folder_beside_the_rated_run(dataset, tmp_path, monkeypatch):
    """Issue 13 item 16: `train ... --feedback outputs/<run>` was refused because the default run folder was
    the rated run itself; it is now outputs/<run>-feedback."""
    monkeypatch.chdir(tmp_path)
    rated = tmp_path / "outputs" / "me-tiny-demo"
    rated.mkdir(parents=True)
    (rated / "config.json").write_text("{}")
    assert default_run_dir(dataset, "tiny-demo") == Path("outputs/me-tiny-demo")
    with pytest.raises(FinetuneError, match="outputs/me-tiny-demo already holds a run"):
        check_before_loading(tiny_config(), dataset, preset="tiny-demo")
    run_dir = check_before_loading(tiny_config(), dataset, preset="tiny-demo", feedback=Path("outputs/me-tiny-demo"))
    assert run_dir == Path("outputs/me-tiny-demo-feedback")

"""`finetune train`: the command, its default run folder, photos prepared on the fly, one-line errors."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from finetune.cli import cli

from train_helpers import HAVE_WATERMARK

QUICK = ["--set", "train.max_steps=2", "--set", "train.save_every=0", "--set", "sample.every=0",
         "--set", "sample.prompts=[]", "--set", f"sample.watermark={str(HAVE_WATERMARK).lower()}"]


def invoke(*args):
    return CliRunner().invoke(cli, ["train", *args])


def test_train_writes_outputs_dataset_preset_and_refuses_to_overwrite(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("--preset", "tiny-demo", "--dataset", str(dataset), "--base", "tiny", *QUICK)
    assert r.exit_code == 0, r.output
    run = tmp_path / "outputs" / "me-tiny-demo"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["steps"] == 2
    assert "done: 2 steps" in r.output

    again = invoke("--preset", "tiny-demo", "--dataset", str(dataset), *QUICK)
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == [again.output.strip()]
    assert again.output.startswith("error: outputs/me-tiny-demo already holds a run: pass --out")


def test_a_folder_of_photos_is_prepared_first(example_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in example_photos.iterdir()}
    r = invoke("--preset", "tiny-demo", "--dataset", str(example_photos), "--out", "run", *QUICK)
    assert r.exit_code == 0, r.output
    assert "is a folder of photos, not a prepared dataset: preparing it into datasets/example-photos" in r.output
    manifest = tmp_path / "datasets" / "example-photos" / "manifest.jsonl"
    assert manifest.is_file() and len(manifest.read_text().splitlines()) == 6  # tiny-demo keeps all six
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dataset"] == "datasets/example-photos"
    assert {p.name: p.stat().st_mtime_ns for p in example_photos.iterdir()} == before  # photos untouched


def test_photos_already_under_datasets_are_prepared_beside_them(example_photos, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(example_photos, tmp_path / "datasets" / "selfies")
    r = invoke("--preset", "tiny-demo", "--dataset", "datasets/selfies", "--out", "run", *QUICK)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "datasets" / "selfies-prepared" / "manifest.jsonl").is_file()
    assert not (tmp_path / "datasets" / "selfies" / "manifest.jsonl").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--dataset", "missing"], 1, "error: dataset folder missing does not exist"),
    (["--dataset", "empty"], 1, "error: empty has no manifest.jsonl and no photos"),
    (["--dataset", "DATASET", "--set", "train.attention=xformers"], 1,
     "error: train.attention = 'xformers' but xformers is not installed: on a CUDA machine run `pip install finetune[xformers]`"),
    (["--dataset", "DATASET", "--set", "train.mixed_precision=fp16"], 1,
     "error: train.mixed_precision = 'fp16' needs a CUDA GPU"),
    (["--dataset", "DATASET", "--set", "train.lr=5"], 2, "error: invalid config: train.lr = 5.0 is above the maximum 1.0"),
    (["--dataset", "DATASET", "--set", "lora.rank=0"], 2, "error: invalid config: lora.rank = 0 is below the minimum 1"),
])
def test_errors_are_one_line_with_a_nonzero_exit(dataset, tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [str(dataset) if a == "DATASET" else a for a in args]
    r = invoke("--preset", "tiny-demo", *args, *QUICK)
    assert r.exit_code == code
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.output
    assert not (tmp_path / "outputs").exists() or not os.listdir(tmp_path / "outputs")

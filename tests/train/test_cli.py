"""`finetune train`: the command, its default run folder, photos prepared on the fly, one-line errors."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.runs import MARKER
from finetune import runs

from train_helpers import HAVE_WATERMARK, write_dataset

QUICK = ["--set", "train.max_steps=2", "--set", "train.save_every=0", "--set", "sample.every=0",
         "--set", "sample.prompts=[]", "--set", f"sample.watermark={str(HAVE_WATERMARK).lower()}"]


def invoke(*args):
    return CliRunner().invoke(cli, ["train", *args])


def test_train_writes_outputs_dataset_preset_and_refuses_to_overwrite(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("--preset", "tiny-demo", "--dataset", str(dataset), "--base", "tiny", *QUICK)
    assert r.exit_code == 0, r.output
    run = tmp_path / "outputs" / "me-tiny-demo"
    assert (run / "lora" / runs.WEIGHT_NAME).is_file()
    assert json.loads((run / "run.json").read_text())["steps"] == 2
    assert "done: 2 steps" in r.output

    again = invoke("--preset", "tiny-demo", "--dataset", str(dataset), *QUICK)
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == [again.output.strip()]
    assert again.output.startswith("error: outputs/me-tiny-demo already holds a run: pass --out")
    assert "or add --resume latest to continue it" in again.output  # the final checkpoint is complete
    for marker in (run / "checkpoints").glob(f"step-*/{MARKER}"):
        marker.unlink()  # every checkpoint damaged: nothing to continue, so no such advice
    damaged = invoke("--preset", "tiny-demo", "--dataset", str(dataset), *QUICK)
    assert damaged.exit_code == 1 and "--resume" not in damaged.output


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


@pytest.mark.parametrize("preset, base, prepared, want", [
    ("person-sdxl-lora-8gb", "tiny-sdxl", 512, 1024),  # a dataset made for SD 1.5, trained on SDXL
    ("person-sd15-lora", "tiny", 1024, 512),  # and the reverse
])
def test_a_dataset_prepared_at_another_resolution_is_refused_before_loading_the_base(
        example_photos, tmp_path, monkeypatch, preset, base, prepared, want):
    from finetune.models.tiny import tiny_base_dir
    from finetune.models.families.sdxl_tiny import tiny_sdxl_base_dir

    monkeypatch.chdir(tmp_path)
    write_dataset(example_photos, tmp_path / "datasets" / "me", size=prepared)
    loaded = []
    monkeypatch.setattr("finetune.models.load_base", lambda *a, **k: loaded.append(a))
    # The bases as diffusers folders: architecture known from their configs, named like a real one.
    folder = {"tiny": tiny_base_dir, "tiny-sdxl": tiny_sdxl_base_dir}[base]()
    arch = {"tiny": "SD 1.x", "tiny-sdxl": "SDXL"}[base]
    r = invoke("--preset", preset, "--dataset", "datasets/me", "--base", str(folder),
               "--set", "train.mixed_precision=no", *QUICK)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines == [(
        f"error: dataset datasets/me was prepared at {prepared} px but this run trains at data.resolution = {want} px "
        f"(the base {folder} is {arch}; {arch} bases train at {want} px): prepare the photos again at {want} px "
        f"(`finetune prepare {example_photos} --name me-{want}px --preset {preset}`) and train with --dataset "
        f"datasets/me-{want}px, or train at the dataset's resolution with --set data.resolution={prepared}")], r.output
    assert not loaded and not (tmp_path / "outputs").exists()


def test_item2_the_suggested_prepare_command_keeps_the_caption_settings_and_writes_a_new_dataset(
        example_photos, tmp_path, monkeypatch):
    import shlex
    import shutil

    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    shutil.copytree(example_photos, photos)
    prepare = ["prepare", str(photos), "--name", "me", "--preset", "tiny-demo", "--set", "data.workers=1",
               "--set", "data.trigger=zkq", "--set", "data.class_word=woman",
               "--set", "data.caption_template=portrait of [trigger] [class], 35mm"]
    assert CliRunner().invoke(cli, prepare).exit_code == 0
    old = {p.name: p.read_bytes() for p in (tmp_path / "datasets" / "me" / "images").iterdir()}
    r = invoke("--preset", "tiny-demo", "--dataset", "datasets/me", "--set", "data.trigger=zkq",
               "--set", "data.resolution=128", *QUICK)
    assert r.exit_code == 1, r.output
    command = r.output.split("`")[1]
    assert command == (f"finetune prepare {photos} --name me-128px --preset tiny-demo --set data.trigger=zkq "
                       "--set data.class_word=woman "
                       "--set 'data.caption_template=portrait of [trigger] [class], 35mm' --set data.resolution=128")
    assert "and train with --dataset datasets/me-128px, or train at" in r.output
    done = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert done.exit_code == 0, done.output
    new = tmp_path / "datasets" / "me-128px"
    assert (new / "images" / "0001.txt").read_text() == "portrait of zkq woman, 35mm"
    settings = json.loads((new / "dataset.json").read_text())["settings"]
    assert settings["resolution"] == 128 and settings["class_word"] == "woman" and settings["trigger"] == "zkq"
    assert {p.name: p.read_bytes() for p in (tmp_path / "datasets" / "me" / "images").iterdir()} == old


def test_item3_a_trigger_the_captions_do_not_use_is_refused_before_loading_the_base(
        dataset, example_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = json.loads((dataset / "dataset.json").read_text())
    info["settings"]["trigger"] = "ohwx"
    (dataset / "dataset.json").write_text(json.dumps(info))
    loaded = []
    monkeypatch.setattr("finetune.models.load_base", lambda *a, **k: loaded.append(a))
    r = invoke("--preset", "tiny-demo", "--dataset", "datasets/me", "--set", "data.trigger=sks", *QUICK)
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: data.trigger = 'sks' is in none of the 6 captions of dataset datasets/me, which say 'ohwx' (the "
        "trigger it was prepared with): train with --set data.trigger=ohwx, or prepare the photos again with 'sks' "
        f"(`finetune prepare {example_photos} --name me-sks --preset tiny-demo "
        "--set data.trigger=sks`) and train with --dataset datasets/me-sks"], r.output
    assert not loaded and not (tmp_path / "outputs").exists()


def test_item1_training_on_another_folder_of_photos_does_not_replace_a_dataset(example_photos, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    mine, other = tmp_path / "photos" / "me", tmp_path / "other" / "me"
    shutil.copytree(example_photos, mine)
    other.mkdir(parents=True)
    shutil.copy(example_photos / "IMG_0001.jpg", other / "IMG_9001.jpg")
    assert CliRunner().invoke(cli, ["prepare", str(mine), "--preset", "tiny-demo"]).exit_code == 0
    manifest = (tmp_path / "datasets" / "me" / "manifest.jsonl").read_bytes()
    r = invoke("--preset", "tiny-demo", "--dataset", str(other), *QUICK)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"error: datasets/me holds a dataset prepared from {mine.resolve()}, not from {other}: prepare these photos "
        f"under another name (`finetune prepare {other} --name me-2`) and train with --dataset datasets/me-2")
    assert (tmp_path / "datasets" / "me" / "manifest.jsonl").read_bytes() == manifest


def test_the_class_word_the_dataset_was_prepared_with_is_trained_unless_set(example_photos, tmp_path, monkeypatch):
    """README order: `prepare ... --set data.class_word=woman`, then `train --preset person-...`. The captions
    say 'ohwx woman'; the preset's 'person' went into run.json, the LoRA's usage hint, the sample and class
    prompts. The dataset's word is used and said; --set data.class_word still chooses."""
    import shutil

    import finetune.train.lora

    monkeypatch.chdir(tmp_path)
    shutil.copytree(example_photos, tmp_path / "Pictures" / "me")
    r = CliRunner().invoke(cli, ["prepare", "Pictures/me", "--name", "me", "--preset", "tiny-demo", "--set", "data.workers=1",
                                 "--set", "data.class_word=woman"])
    assert r.exit_code == 0, r.output
    trained = []
    monkeypatch.setattr(finetune.train.lora, "train", lambda cfg, *a, **k: trained.append(cfg))
    r = invoke("--preset", "tiny-demo", "--dataset", "datasets/me", *QUICK)
    assert r.exit_code == 0, r.output
    assert trained[-1].data.class_word == "woman"
    assert ("data.class_word = 'woman': the class word dataset datasets/me was prepared with (the preset says "
            "'person'; add --set data.class_word=WORD to choose another)") in r.output
    r = invoke("--preset", "tiny-demo", "--dataset", "datasets/me", "--set", "data.class_word=man", *QUICK)
    assert r.exit_code == 0, r.output
    assert trained[-1].data.class_word == "man" and "class word dataset" not in r.output
    # the README's other line: the photos again, which were prepared into datasets/me before
    r = invoke("--preset", "tiny-demo", "--dataset", "Pictures/me", *QUICK)
    assert r.exit_code == 0, r.output
    assert trained[-1].data.class_word == "woman" and "the class word dataset datasets/me was prepared" in r.output
    shutil.copytree(tmp_path / "Pictures" / "me", tmp_path / "others")  # photos never prepared: the preset's word
    r = invoke("--preset", "tiny-demo", "--dataset", "others", *QUICK)
    assert r.exit_code == 0, r.output
    assert trained[-1].data.class_word == "person" and "class word" not in r.output

"""`finetune prepare` through the CLI: default output folder, options, one-line errors and exit codes."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["prepare", *args])


def test_default_output_is_datasets_slash_source_name(example_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(str(example_photos), "--set", "data.workers=1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "kept 6 of 6 photos; report: datasets/example-photos/report.html"
    assert (tmp_path / "datasets" / "example-photos" / "manifest.jsonl").is_file()
    named = run(str(example_photos), "--name", "me", "--preset", "tiny-demo", "--set", "data.workers=1")
    assert named.exit_code == 0, named.output
    assert named.stdout.strip().endswith("report: datasets/me/report.html")
    with Image.open(tmp_path / "datasets" / "me" / "images" / "0001.png") as im:
        assert im.size == (64, 64)  # the preset's resolution
    settings = json.loads((tmp_path / "datasets" / "me" / "dataset.json").read_text())["settings"]
    assert settings["resolution"] == 64 and settings["min_side"] == 64


def test_missing_folder_is_one_line_and_exit_1(tmp_path):
    result = run(str(tmp_path / "nope"), "--out", str(tmp_path / "ds"))
    assert result.exit_code == 1
    assert result.output == f"error: source folder {tmp_path / 'nope'} does not exist\n"


def test_folder_without_a_usable_photo_is_one_line_and_exit_1(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "IMG_1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (40, 30)).save(src / "IMG_2.png")
    result = run(str(src), "--out", str(tmp_path / "ds"))
    assert result.exit_code == 1 and result.stdout == ""
    lines = [line for line in result.stderr.split("\n") if not line.startswith("\r") and line]  # no progress bar
    assert len(lines) == 1 and lines[0].startswith(f"error: no usable photo in {src} (1 not an image, 1 too small): ")
    assert "IMG_1.jpg: not an image" in lines[0] and "IMG_2.png: too small: 40x30" in lines[0]
    assert not (tmp_path / "ds").exists()


def test_output_inside_the_source_is_refused(example_photos, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(example_photos, src)
    before = sorted(p.name for p in src.rglob("*"))
    result = run(str(src), "--out", str(src / "dataset"))
    assert result.exit_code == 1 and "is inside the source folder" in result.output
    assert sorted(p.name for p in src.rglob("*")) == before


def test_option_mistakes(example_photos, tmp_path):
    both = run(str(example_photos), "--name", "me", "--out", str(tmp_path / "x"))
    assert both.exit_code == 2 and "give --name or --out, not both" in both.output
    bad = run(str(example_photos), "--out", str(tmp_path / "x"), "--set", "data.crop=square")
    assert bad.exit_code == 2 and "data.crop = 'square' is not one of 'face', 'center', 'none'" in bad.output
    typo = run(str(example_photos), "--out", str(tmp_path / "x"), "--set", "data.blur=3")
    assert typo.exit_code == 2 and "unknown key data.blur" in typo.output
    assert not (tmp_path / "x").exists()


def test_ctrl_c_exits_130_in_one_line(example_photos, tmp_path, monkeypatch):
    import finetune.data.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.data.prepare, "prepare", interrupted)
    result = run(str(example_photos), "--out", str(tmp_path / "ds"))
    assert result.exit_code == 130 and result.stderr == "interrupted\n"


def test_item1_another_folder_named_like_the_dataset_is_refused_in_one_line(example_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine, other = tmp_path / "photos" / "me", tmp_path / "other" / "me"
    shutil.copytree(example_photos, mine)
    other.mkdir(parents=True)
    shutil.copy(example_photos / "IMG_0001.jpg", other / "IMG_9001.jpg")
    assert run(str(mine), "--set", "data.workers=1").exit_code == 0
    manifest = (tmp_path / "datasets" / "me" / "manifest.jsonl").read_bytes()
    result = run(str(other), "--set", "data.workers=1")
    assert result.exit_code == 1
    assert result.output == (f"error: datasets/me holds a dataset prepared from {mine.resolve()}, not from "
                             f"{other.resolve()}: prepare these photos under another name (--name me-2), or add "
                             "--replace to replace that dataset\n")
    assert (tmp_path / "datasets" / "me" / "manifest.jsonl").read_bytes() == manifest
    named = run(str(other), "--name", "me-2", "--set", "data.workers=1")
    assert named.exit_code == 0 and named.stdout.strip().endswith("report: datasets/me-2/report.html")
    replaced = run(str(other), "--replace", "--set", "data.workers=1")
    assert replaced.exit_code == 0 and "kept 1 of 1 photo; report: datasets/me/report.html" in replaced.stdout

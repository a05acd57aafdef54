"""What `finetune train` shows a person (issue 13 item 20): the header labels the precision, counts
agree with their nouns ("1 image", "1 step"), and the training samples get a contact sheet and a page.

One 1-step run on a 1-image dataset, shared by the tests of this module."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.provenance import read_provenance
from finetune.train.samples import SHEET_TILE, write_overview

from train_helpers import HAVE_WATERMARK, tiny_config, write_dataset


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, example_photos):
    root = tmp_path_factory.mktemp("one-step")
    (root / "photos").mkdir()
    shutil.copy(example_photos / "IMG_0001.jpg", root / "photos")
    dataset = write_dataset(root / "photos", root / "datasets" / "me")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is latency-bound (the autouse one_thread fixture is per test)
    result = CliRunner().invoke(cli, [
        "train", "--preset", "tiny-demo", "--dataset", str(dataset), "--base", "tiny", "--out", str(root / "run"),
        "--set", "train.max_steps=1", "--set", "train.batch_size=1", "--set", "train.save_every=0",
        "--set", "sample.every=0", "--set", "sample.seeds=[1, 2]",
        "--set", 'sample.prompts=["a photo of [trigger] [class]", "a portrait of [trigger] [class] in the city"]',
        "--set", f"sample.watermark={str(HAVE_WATERMARK).lower()}"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root / "run", result.output


def test_train_header_labels_the_precision(one_step):
    _, output = one_step
    header = next(line for line in output.splitlines() if line.startswith("training tiny"))
    assert "[cpu, precision fp32 (set in the config), sdpa, adamw8bit]" in header, header


def test_train_output_says_1_image_and_1_step_not_1_images(one_step):
    _, output = one_step
    assert "on 1 image of " in output and "done: 1 step;" in output
    assert not re.search(r"\b1 (images|steps|photos)\b", output), output


def test_training_samples_get_a_contact_sheet_and_a_page(one_step):
    run, _ = one_step
    page = (run / "samples" / "index.html").read_text()
    files = sorted(p.relative_to(run / "samples").as_posix() for p in (run / "samples").glob("step-*/*.png"))
    assert files == ["step-000001/0-1.png", "step-000001/0-2.png", "step-000001/1-1.png", "step-000001/1-2.png"]
    for f in files:
        assert f'src="{f}"' in page
    assert '<img src="../samples.png"' in page and "a portrait of ohwx person in the city" in page
    with Image.open(run / "samples.png") as sheet:
        assert sheet.width > 4 * SHEET_TILE and SHEET_TILE < sheet.height < 2 * SHEET_TILE  # 1 step x 4 images
    parameters = read_provenance(run / "samples.png")["parameters"]
    assert "Sheet rows: steps 1" in parameters  # `finetune review` skips it as a sheet, were it ever under samples/
    assert not list(run.glob("samples/**/.*"))  # no temporaries left


def test_the_sheet_has_a_row_per_sample_step_oldest_first(one_step, tmp_path):
    run, _ = one_step
    samples = tmp_path / "run" / "samples"
    for step in (200, 100):
        shutil.copytree(run / "samples" / "step-000001", samples / f"step-{step:06d}")
    (samples / "step-000200" / "1-2.png").unlink()  # a step stopped before its last image: a blank tile
    cfg = tiny_config("sample.seeds=[1, 2]", 'sample.prompts=["a photo of [trigger] [class]", "x"]')
    sheet, page = write_overview(samples, cfg, title="run")
    text = page.read_text()
    assert text.index("step 100") < text.index("step 200") and text.count("<td>—</td>") == 1
    with Image.open(sheet) as im:
        assert 2 * SHEET_TILE < im.height < 3 * SHEET_TILE
    assert "Sheet rows: steps 100 200" in read_provenance(sheet)["parameters"]

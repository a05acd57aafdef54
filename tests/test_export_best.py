"""export --checkpoint best: the checkpoint `finetune score` recommends, said by name; the model card
and the review page show the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_run import make_fake_run, one_torch_thread  # noqa: F401 (fixture)
from safetensors import safe_open

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.export import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scores(recommendation, summary):
    cells = [{"checkpoint": None, "step": None, "scale": 0.0, "images": 2, "faces": 2, "likeness": 0.21,
              "class_images": 0, "class_faces": 0, "class_leak": None, "copies": 0},
             {"checkpoint": "step-000005", "step": 5, "scale": 0.8, "images": 2, "faces": 2, "likeness": 0.71,
              "class_images": 2, "class_faces": 2, "class_leak": 0.12, "copies": 0},
             {"checkpoint": None, "step": 10, "scale": 1.0, "images": 2, "faces": 2, "likeness": 0.74,
              "class_images": 2, "class_faces": 2, "class_leak": 0.52, "copies": 0}]
    return {"schema": 1, "faces_found": "4 of 4", "cells": cells, "recommendation": recommendation,
            "summary": summary, "images": []}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_fake_run(tmp_path_factory.mktemp("best"))
    line = "step-000005 at scale 0.8: likeness 0.71, class leak 0.12"
    (run / "scores.json").write_text(json.dumps(scores({"checkpoint": "step-000005", "step": 5, "scale": 0.8,
                                                        "likeness": 0.71, "class_leak": 0.12}, line)))
    return run


def test_export_best_exports_the_recommended_checkpoint_and_says_so(run):
    result = CliRunner().invoke(cli, ["export", str(run), "--checkpoint", "best", "-f", "peft"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("--checkpoint best: step-000005 (finetune score: step-000005 at scale "
                                             "0.8: likeness 0.71, class leak 0.12)")
    path = run / "export" / "ohwx-run-step-000005-peft.safetensors"
    with safe_open(path, "pt") as f:
        assert f.metadata()["finetune.checkpoint"] == "step-000005"
    card = (run / "export" / "README.md").read_text()
    assert "## Likeness" in card
    assert "**Recommendation:** step-000005 at scale 0.8: likeness 0.71, class leak 0.12" in card
    assert "| step-000005 | 0.8 | 0.71 | 2/2 | 0.12 | 0 |" in card
    assert "| final |" not in card  # only this checkpoint's rows


def test_export_best_without_a_recommendation_says_why(run, tmp_path):
    (run / "scores.json").rename(tmp_path / "kept.json")
    try:
        (run / "scores.json").write_text(json.dumps(scores(None, "no face found in 24 of 24 samples: no recommendation")))
        with pytest.raises(FinetuneError, match=r"recommend no checkpoint \(no face found in 24 of 24 samples"):
            export(run, "peft", checkpoint="best", out=tmp_path)
    finally:
        (tmp_path / "kept.json").replace(run / "scores.json")


def test_review_shows_the_scores(run):
    from PIL import Image

    from finetune import review
    from finetune.provenance import GenerationInfo, save_generated_png
    from finetune.review.images import scan_run

    gallery = run / "gallery" / "20260101-000000"
    for name in ("a.png", "b.png"):
        save_generated_png(Image.new("RGB", (64, 64), (90, 90, 90)), gallery / "p01" / name,
                           GenerationInfo(prompt="a photo of ohwx person", seed=1, steps=4, width=64, height=64),
                           watermark=False)
    (gallery / "scores.json").write_text(json.dumps({"images": [
        {"file": "p01/a.png", "class_prompt": False, "face": True, "likeness": 0.7134, "copy_of": None},
        {"file": "p01/b.png", "class_prompt": True, "face": False, "likeness": None, "copy_of": None}]}))
    images = [im for im in scan_run(run).images if im.path.startswith("gallery/")]
    assert {im.path: im.to_json()["identity"] for im in images} == {  # what the page's API serves
        "gallery/20260101-000000/p01/a.png": "likeness 0.71", "gallery/20260101-000000/p01/b.png": "no face found"}
    page = (Path(review.__file__).parent / "page.html").read_text()
    assert '["identity", img.identity || ""]' in page  # shown among each image's settings

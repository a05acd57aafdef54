"""finetune score: the recommendation on score tables, and measuring real faces, class leak and copies
in a gallery; the honest outcomes (no face in any sample, a run without a face subject)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune import identity
from finetune.cli import cli
from finetune.data.prepare import prepare
from finetune.score import LEAK_LIMIT, Cell, aggregate, recommend, score
from helpers_run import one_torch_thread  # noqa: F401 (fixture)

needs_identity = pytest.mark.skipif(not identity.available(), reason=f"identity models not installed: {identity.INSTALL}")


def cell(step, scale, likeness, leak=None, faces=4, images=4, copies=0):
    return Cell(f"step-{step:06d}", step, scale, images=images, faces=faces, likeness=likeness,
                class_images=2, class_faces=2 if leak is not None else 0, class_leak=leak, copies=copies)


# ---------------------------------------------------------------- the recommendation, on tables
def test_highest_likeness_wins():
    best, text = recommend([cell(250, 1.0, 0.52, 0.10), cell(500, 0.8, 0.68, 0.12), cell(500, 1.0, 0.61, 0.15)])
    assert (best.step, best.scale) == (500, 0.8)
    assert text == "step-000500 at scale 0.8: likeness 0.68, class leak 0.12"


def test_a_leak_rules_out_the_most_likeness():
    leaky = cell(1000, 1.0, 0.80, leak=LEAK_LIMIT + 0.05)
    best, text = recommend([cell(500, 1.0, 0.66, 0.20), leaky, cell(1000, 0.5, 0.70, 0.30)])
    assert (best.step, best.scale) == (1000, 0.5)
    assert text == "step-001000 at scale 0.5: likeness 0.70, class leak 0.30"
    best, text = recommend([leaky])
    assert best is None and "leaks the subject into the class prompt" in text


def test_copies_rule_a_cell_out():
    best, _ = recommend([cell(500, 1.0, 0.66, 0.2), cell(1000, 1.0, 0.75, 0.2, copies=1)])
    assert best.step == 500


def test_ties_go_to_less_leak_then_the_earlier_step_then_the_lower_scale():
    best, _ = recommend([cell(1000, 1.0, 0.700, 0.20), cell(500, 1.0, 0.698, 0.25), cell(750, 1.0, 0.701, 0.10)])
    assert best.step == 750  # within the tie margin, the least leak
    best, _ = recommend([cell(1000, 1.0, 0.70, 0.2), cell(500, 1.0, 0.70, 0.2), cell(500, 0.8, 0.70, 0.2)])
    assert (best.step, best.scale) == (500, 0.8)
    base = Cell(None, None, 0.0, images=4, faces=4, likeness=0.2)  # the base model is never recommended
    best, _ = recommend([base, cell(500, 1.0, 0.1, None)])
    assert best.step == 500


def test_no_faces_at_all_no_recommendation():
    cells = [cell(20, 1.0, None, None, faces=0, images=8), cell(40, 1.0, None, None, faces=0, images=8)]
    best, text = recommend(cells)
    assert best is None
    assert text == "no face found in 20 of 20 samples: no recommendation"  # 2 x (8 trigger + 2 class images)


def test_too_few_faces_no_recommendation():
    best, text = recommend([cell(20, 1.0, 0.9, None, faces=1, images=8)])
    assert best is None and "under 50%" in text


def test_aggregate_per_checkpoint_and_scale():
    im = lambda ck, scale, cls, like, copy=None: {"checkpoint": ck, "scale": scale, "class_prompt": cls,  # noqa: E731
                                                   "face": like is not None, "likeness": like, "copy_of": copy}
    cells = aggregate([im(None, 0.0, False, 0.2), im("step-000020", 1.0, False, 0.6), im("step-000020", 1.0, False, None),
                       im("step-000020", 1.0, False, 0.8, "images/0001.png"), im("step-000020", 1.0, True, 0.3),
                       im("step-000040", 0.5, False, None)])
    assert [(c.checkpoint, c.scale) for c in cells] == [(None, 0.0), ("step-000020", 1.0), ("step-000040", 0.5)]
    c = cells[1]
    assert (c.step, c.images, c.faces, c.likeness, c.class_images, c.class_faces, c.class_leak, c.copies) == \
        (20, 3, 2, 0.7, 1, 1, 0.3, 1)
    assert cells[2].likeness is None and cells[2].faces == 0


# ---------------------------------------------------------------- measuring a gallery
def make_run(tmp_path, dataset, gallery_images: dict[str, tuple[Image.Image, str, float, str]]):
    """A run folder with a gallery: file -> (image, checkpoint, scale, prompt)."""
    run = tmp_path / "run"
    gallery = run / "gallery" / "20260101-000000"
    gallery.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"dataset": str(dataset), "trigger": "ohwx", "steps": 40}))
    prompts: dict[str, list] = {}
    for file, (image, checkpoint, scale, prompt) in gallery_images.items():
        (gallery / file).parent.mkdir(parents=True, exist_ok=True)
        image.save(gallery / file)
        prompts.setdefault(prompt, []).append({"file": file, "row": f"{checkpoint} x {scale}", "seed": 1,
                                               "scale": scale, "checkpoint": checkpoint, "parameters": prompt})
    record = {"prompts": [{"prompt": p, "negative": "", "sheet": "none.png", "columns": 1, "images": ims}
                          for p, ims in prompts.items()],
              "title": "finetune sample — run", "summary": {"Run": str(run)}}
    (gallery / "gallery.json").write_text(json.dumps(record))
    return run, gallery


def portrait(path, side=256) -> Image.Image:
    """A generated-looking square image: the photo's face, head and shoulders."""
    from finetune.data.faces import detect_faces, face_crop

    image = Image.open(path).convert("RGB")
    return image.crop(face_crop(detect_faces(image)[0], image.size, 0.4)).resize((side, side))


@pytest.fixture(scope="module")
def obama_dataset(real_photos, tmp_path_factory):
    src = tmp_path_factory.mktemp("photos")
    for name in ("obama.jpg", "obama3.jpg"):
        shutil.copy(real_photos / name, src / name)
    return prepare(src, tmp_path_factory.mktemp("ds") / "obama", identity_config(), progress=False).out


def identity_config(**changes):
    from finetune.config import DataConfig

    return DataConfig(**{"workers": 1, "resolution": 128, **changes})


@needs_identity
def test_likeness_leak_and_copies_measured(real_photos, obama_dataset, tmp_path):
    training_crop = Image.open(obama_dataset / "images" / "0001.png").convert("RGB").resize((256, 256))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    run, gallery = make_run(tmp_path, obama_dataset, {
        "p01/base-seed1.png": (portrait(real_photos / "biden.jpg"), None, 0.0, "a photo of ohwx person"),
        "p01/step-000020-seed1.png": (noise, "step-000020", 1.0, "a photo of ohwx person"),
        "p01/step-000020-seed2.png": (portrait(real_photos / "hanks.png"), "step-000020", 1.0, "a photo of ohwx person"),
        "p01/step-000040-seed1.png": (portrait(real_photos / "obama2.jpg"), "step-000040", 1.0, "a photo of ohwx person"),
        "p01/step-000040-seed2.png": (training_crop, "step-000040", 1.0, "a photo of ohwx person"),
        "p01/step-000040-s05-seed1.png": (portrait(real_photos / "obama2.jpg"), "step-000040", 0.5, "a photo of ohwx person"),
        "p02/step-000040-seed1.png": (portrait(real_photos / "biden.jpg"), "step-000040", 1.0, "a photo of person"),
        "p02/step-000040-s05-seed1.png": (portrait(real_photos / "hanks.png"), "step-000040", 0.5, "a photo of person"),
    })
    result = score(run, progress=False)
    cells = {(c["checkpoint"], c["scale"]): c for c in result["cells"]}
    at20 = cells[("step-000020", 1.0)]
    assert (at20["images"], at20["faces"]) == (2, 1) and at20["likeness"] < LEAK_LIMIT  # noise, and a stranger
    at40 = cells[("step-000040", 1.0)]
    assert at40["copies"] == 1 and at40["faces"] == 2
    assert at40["likeness"] > 1 - identity.SAME_PERSON  # a real photo of the subject
    assert at40["class_leak"] < LEAK_LIMIT  # a stranger for the class prompt
    assert cells[(None, 0.0)]["likeness"] < LEAK_LIMIT
    # step 40 at 1.0 copies a training photo: the recommendation is the same step at 0.5
    assert result["recommendation"]["checkpoint"] == "step-000040" and result["recommendation"]["scale"] == 0.5
    assert result["summary"].startswith("step-000040 at scale 0.5: likeness 0.")
    copied = next(im for im in result["images"] if im["file"] == "p01/step-000040-seed2.png")
    assert copied["copy_of"] == "images/0001.png"
    for folder in (gallery, run):  # in the gallery, and in the run for `export --checkpoint best`
        assert json.loads((folder / "scores.json").read_text())["recommendation"] == result["recommendation"]
    page = (gallery / "index.html").read_text()
    assert result["summary"] in page and "no face found" in page and "copies images/0001.png" in page
    assert "<svg" in page and "class leak" in page


@needs_identity
def test_no_face_in_any_sample_is_said_and_recommends_nothing(obama_dataset, tmp_path):
    rng = np.random.default_rng(1)
    images = {f"p01/step-{s:06d}-seed{k}.png": (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                                                f"step-{s:06d}", 1.0, "a photo of ohwx person")
              for s in (20, 40) for k in (1, 2, 3)}
    run, _ = make_run(tmp_path, obama_dataset, images)
    result = CliRunner().invoke(cli, ["score", str(run)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "no face found in 6 of 6 samples: no recommendation"
    assert json.loads((run / "scores.json").read_text())["recommendation"] is None


def test_a_run_without_a_face_subject_is_skipped_in_one_line(example_photos, tmp_path):
    dataset = prepare(example_photos, tmp_path / "ds", identity_config(crop="center"), progress=False).out
    run, _ = make_run(tmp_path, dataset, {"p01/x-seed1.png": (Image.new("RGB", (64, 64)), "step-000020", 1.0, "ohwx")})
    result = CliRunner().invoke(cli, ["score", str(run)])
    assert result.exit_code == 0, result.output
    assert result.output == ("identity scores skipped: no face subject in this run (the dataset was prepared "
                             "without face crops)\n")
    assert not (run / "scores.json").exists()


@needs_identity
def test_score_without_identity_says_what_to_install(obama_dataset, tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, obama_dataset, {"p01/x-seed1.png": (Image.new("RGB", (64, 64)), "step-000020", 1.0,
                                                                    "ohwx")})
    monkeypatch.setattr(identity, "available", lambda: False)
    result = CliRunner().invoke(cli, ["score", str(run)])
    assert result.exit_code == 1
    assert result.output.strip().endswith(identity.INSTALL)
    assert "Traceback" not in result.output


@needs_identity
@pytest.mark.usefixtures("one_torch_thread")  # the tiny base on one thread: two oversubscribe a shared machine
def test_sample_scores_a_run_with_a_face_subject(obama_dataset, tmp_path):
    """`finetune sample RUN` scores its gallery when the run's dataset has a subject: on the tiny base's
    faceless images, honestly."""
    from helpers_run import make_fake_run

    run = make_fake_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "dataset": str(obama_dataset)}))
    result = CliRunner().invoke(cli, ["sample", str(run), "-p", "a photo of [trigger] [class]", "-p", "a photo of [class]",
                                      "--seeds", "1", "--scales", "0,1", "--steps", "2", "--size", "64",
                                      "--no-watermark"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == "no face found in 2 of 2 samples: no recommendation"
    scores = json.loads((run / "scores.json").read_text())
    assert scores["recommendation"] is None and len(scores["images"]) == 4

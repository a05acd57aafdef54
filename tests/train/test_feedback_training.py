"""`finetune train --feedback RUN`: favourites join the examples with their loss weight; a rejected
class prompt gets fresh class images."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune.provenance import read_provenance
from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.review.images import ReviewImage
from finetune.ratings import DB_NAME, Store
from finetune.train.data import Batch
from finetune.train.lora import batch_loss, setup

from train_helpers import tiny_config

FAVOURITE = "ohwx person smiling"
CLASS_PROMPT = "a photo of person"  # tiny-demo's class prompt with its class word


def rated(run, rel, prompt, verdict, size=(64, 64), color="red", seed=1):
    path = run / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    img = ReviewImage(path=rel, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), prompt=prompt,
                      negative_prompt="", seed=seed, steps=4, cfg_scale=5.0, sampler="DDIM",
                      size=f"{size[0]}x{size[1]}", loras=(("run", 1.0),), scale=1.0, checkpoint="step-000010",
                      parameters="")
    Store(run / DB_NAME).rate(img, verdict)
    return path


@pytest.fixture()
def reviewed(tmp_path):
    run = tmp_path / "outputs" / "reviewed"
    fav = rated(run, "samples/step-000010/0-1.png", FAVOURITE, "favourite")
    rated(run, "samples/step-000010/1-1.png", CLASS_PROMPT, "reject", color="blue")
    return run, fav


def class_folders(dataset):
    return {p.name for p in (dataset / "class-images").iterdir()}


def test_cli_feedback_adds_favourites_and_regenerates_rejected_class_images(dataset, reviewed, tmp_path):
    run, fav = reviewed
    sets = ["train.max_steps=2", "train.log_every=1", "train.save_every=0", "sample.every=0", "sample.prompts=[]",
            "sample.watermark=false", "train.prior_preservation=true", "train.num_class_images=2", "sample.steps=2",
            "train.feedback_weight=0.5"]
    args = ["train", "--preset", "tiny-demo", "--dataset", str(dataset), *[a for s in sets for a in ("--set", s)]]
    first = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "plain")])
    assert first.exit_code == 0, first.output
    assert "feedback" not in json.loads((tmp_path / "plain" / "run.json").read_text())
    reused = class_folders(dataset)
    assert len(reused) == 1

    second = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "fb"), "--feedback", str(run)])
    assert second.exit_code == 0, second.output
    assert f"1 rejected image of the class prompt {CLASS_PROMPT!r}: its class images are made afresh" in second.output
    info = json.loads((tmp_path / "fb" / "run.json").read_text())
    assert info["feedback"] == {"run": str(run.resolve()), "images": [str(fav.resolve())], "weight": 0.5}
    # the favourites count in what was trained on (a resume with other favourites is refused)
    plain = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert info["dataset_hash"] != plain["dataset_hash"]
    # the class prompt has a rejected image: its class images were made afresh, in another folder
    assert len(class_folders(dataset)) == 2 and reused < class_folders(dataset)
    (fresh,) = class_folders(dataset) - reused
    seeds = lambda folder: {read_provenance(p)["parameters"].split("Seed: ")[1].split(",")[0]
                            for p in (dataset / "class-images" / folder).glob("*.png")}
    assert seeds(fresh).isdisjoint(seeds(next(iter(reused))))  # new images, not the rejected ones again


def test_favourites_are_examples_with_their_weight_and_it_scales_their_loss(dataset, reviewed, tmp_path):
    run, fav = reviewed
    r = setup(tiny_config("train.feedback_weight=0.5", "train.caption_dropout=0"), dataset, tmp_path / "out",
              feedback=run)
    added = r.examples[-1]
    assert (added.image, added.caption, added.weight) == (fav.resolve(), FAVOURITE, 0.5)
    assert all(ex.weight == 1.0 for ex in r.examples[:-1])

    batch = Batch(instance=(len(r.examples) - 1,))

    def loss_with(weight):
        r.examples[-1] = dataclasses.replace(added, weight=weight)
        torch.manual_seed(0)  # the same latent draw, noise and timestep each time
        with torch.no_grad():
            return batch_loss(r, batch).item()

    full, half, zero = loss_with(1.0), loss_with(0.5), loss_with(0.0)
    assert full > 0 and zero == 0
    assert half == pytest.approx(0.5 * full, rel=1e-5)


def test_favourites_of_a_size_the_vae_cannot_take_are_skipped(dataset, tmp_path):
    run = tmp_path / "outputs" / "odd"
    rated(run, "samples/a.png", FAVOURITE, "favourite", size=(60, 64))
    with pytest.raises(FinetuneError, match="60x64, both sides must be multiples of 8"):
        setup(tiny_config(), dataset, tmp_path / "out", feedback=run)
    assert not (tmp_path / "out").exists()


def test_rejects_say_they_change_nothing_when_prior_preservation_is_off(dataset, reviewed, tmp_path, capsys):
    """Issue 13 item 9: rejects only renew class images; without prior preservation the user is told so
    (and where rejects do count), instead of the rejects being ignored in silence."""
    run, _ = reviewed
    rated(run, "samples/step-000010/0-2.png", FAVOURITE, "reject", color="green", seed=2)
    setup(tiny_config("train.prior_preservation=false"), dataset, tmp_path / "off", feedback=run)
    out = capsys.readouterr().out
    assert (f"--feedback: the 2 rejected images change nothing in this run: rejects only renew class images, "
            f"and train.prior_preservation is off; to learn from them, tune the run with preference pairs: "
            f"finetune train-dpo --from {run}") in out


def test_rejects_note_names_what_each_reject_does(reviewed):
    from finetune.train.feedback import rejects_note

    run, _ = reviewed
    assert "1 rejected image of the class prompt" in rejects_note(run, True, CLASS_PROMPT)
    assert rejects_note(run, True, "a photo of dog").startswith(
        "--feedback: the 1 rejected image changes nothing in this run: none is of the class prompt 'a photo of dog'")
    rated(run, "samples/step-000010/0-2.png", FAVOURITE, "reject", color="green", seed=2)
    assert rejects_note(run, True, CLASS_PROMPT).endswith(
        f"; the other 1 rejected image changes nothing here (to learn from them, tune the run with preference "
        f"pairs: finetune train-dpo --from {run})")

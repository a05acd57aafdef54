"""Favourites of a reviewed run become weighted training rows; rejected prompts are named."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from finetune.errors import FinetuneError
from finetune.review.images import ReviewImage
from finetune.ratings import DB_NAME, Store
from finetune.train.feedback import feedback_examples, rejected_prompts


def image(run, rel: str, prompt: str, color, seed: int) -> ReviewImage:
    path = run / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), color).save(path)
    return ReviewImage(path=rel, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), prompt=prompt,
                       negative_prompt="", seed=seed, steps=4, cfg_scale=5.0, sampler="DDIM", size="64x48",
                       loras=(("run", 1.0),), scale=1.0, checkpoint="step-000010", parameters="")


@pytest.fixture()
def reviewed(tmp_path):
    run = tmp_path / "outputs" / "me"
    a = image(run, "samples/step-000010/0-1.png", "a photo of ohwx person", "red", 1)
    b = image(run, "samples/step-000010/0-2.png", "a photo of ohwx person", "blue", 2)
    c = image(run, "samples/step-000010/1-1.png", "ohwx person on a beach", "green", 1)
    d = image(run, "samples/step-000010/1-2.png", "ohwx person on a beach", "gray", 2)
    store = Store(run / DB_NAME)
    store.rate(a, "favourite")
    store.rate(b, "reject")
    store.rate(c, "reject")
    store.rate(c, "favourite")  # the newest verdict counts
    store.rate(d, "neutral")
    return run, (a, b, c, d), store


def test_favourites_become_weighted_rows_with_their_prompts(reviewed):
    run, (a, _, c, _), _ = reviewed
    rows = feedback_examples(run, weight=0.5)
    assert [r["caption"] for r in rows] == ["a photo of ohwx person", "ohwx person on a beach"]
    assert [r["image"] for r in rows] == [str((run / a.path).resolve()), str((run / c.path).resolve())]
    assert all(r["weight"] == 0.5 and r["bucket"] == [64, 48] for r in rows)
    assert rows[0]["sha256"] == a.sha256 and rows[0]["seed"] == 1 and rows[0]["source"] == f"feedback:me/{a.path}"


def test_changed_or_deleted_favourites_are_skipped_with_a_reason(reviewed):
    run, (a, _, c, _), _ = reviewed
    Image.new("RGB", (64, 48), "white").save(run / a.path)
    skipped: list[str] = []
    rows = feedback_examples(run, 1.0, skipped)
    assert [r["caption"] for r in rows] == ["ohwx person on a beach"]
    assert skipped == [f"{a.path}: changed since it was favourited"]
    (run / c.path).unlink()
    with pytest.raises(FinetuneError, match="no favourited images to train on .2 skipped"):
        feedback_examples(run, 1.0)


def test_rejected_prompts(reviewed):
    run, *_ = reviewed
    assert rejected_prompts(run) == {"a photo of ohwx person"}  # the beach image's reject was overruled


def test_errors_name_the_problem(tmp_path, reviewed):
    with pytest.raises(FinetuneError, match="no such run folder"):
        feedback_examples(tmp_path / "nope")
    (tmp_path / "unrated").mkdir()
    with pytest.raises(FinetuneError, match="no ratings in .* yet"):
        rejected_prompts(tmp_path / "unrated")
    with pytest.raises(FinetuneError, match="weight must be above 0"):
        feedback_examples(reviewed[0], weight=0)

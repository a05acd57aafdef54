"""feedback.sqlite: WAL + synchronous=FULL, one row per rating, progress, and the preference-pairs export."""

import json
import sqlite3

import pytest
from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.review.images import scan_run
from finetune.ratings import DB_NAME, Store, export_pairs, progress


@pytest.fixture()
def rated(fake_run):
    """The fake run's images by path and an open store."""
    return {img.path: img for img in scan_run(fake_run).images}, Store(fake_run / DB_NAME)


def test_database_is_wal_with_full_sync_and_versioned(rated, fake_run):
    _, store = rated
    with store.connect() as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    Store(fake_run / DB_NAME)  # opening again keeps it as it is


def test_one_row_per_rating_and_the_newest_counts(rated):
    images, store = rated
    a, b = images["samples/step-000100/0-1.png"], images["gallery/20250101-120000/p01/scale-0_8-seed1.png"]
    store.rate(a, "favourite")
    store.rate(a, "reject")
    store.rate(b, "neutral")
    assert store.verdicts() == {(a.path, a.sha256): "reject", (b.path, b.sha256): "neutral"}
    with store.connect() as con:
        rows = con.execute("SELECT image, sha256, prompt, seed, scale, checkpoint, verdict FROM ratings ORDER BY id")
        rows = rows.fetchall()
    assert [tuple(r) for r in rows] == [
        (a.path, a.sha256, "a photo of ohwx person", 1, 1.0, "step-000100", "favourite"),
        (a.path, a.sha256, "a photo of ohwx person", 1, 1.0, "step-000100", "reject"),
        (b.path, b.sha256, "a photo of ohwx person", 1, 0.8, None, "neutral")]
    p = progress(list(images.values()), store.verdicts(), store.compared())
    assert p == {"total": 6, "rated": 2, "favourites": 0, "rejects": 1, "pairs_compared": 0, "pairs_total": 7}


def test_bad_ratings_are_refused(rated):
    images, store = rated
    a = images["samples/step-000100/0-1.png"]
    with pytest.raises(ValueError, match="'love' is not one of favourite, reject, neutral"):
        store.rate(a, "love")
    with pytest.raises(ValueError, match="different prompts"):
        store.compare(a, images["samples/step-000100/1-1.png"], "a")
    with pytest.raises(ValueError, match="with itself"):
        store.compare(a, a, "a")
    with pytest.raises(sqlite3.IntegrityError):  # the schema guards the values too
        with store.connect() as con:
            con.execute("INSERT INTO ratings (rated_at, prompt, image, sha256, negative_prompt, parameters, verdict)"
                        " VALUES ('t', 'p', 'i', 's', '', '', 'maybe')")


def test_export_pairs_from_comparisons_and_verdicts(rated, fake_run, tmp_path):
    images, store = rated
    red, green = images["samples/step-000100/0-1.png"], images["samples/step-000100/0-2.png"]
    yellow, orange = images["samples/step-000200/0-1.png"], images["gallery/20250101-120000/p01/scale-0_8-seed1.png"]
    blue, purple = images["samples/step-000100/1-1.png"], images["samples/step-000200/1-1.png"]
    store.compare(red, green, "b")        # green over red ...
    store.compare(red, green, "a")        # ... changed my mind: red over green (the newest choice counts)
    store.compare(blue, purple, "tie")    # ties are no preference
    store.rate(yellow, "favourite")
    store.rate(orange, "favourite")
    store.rate(red, "reject")
    store.rate(green, "reject")
    store.rate(blue, "reject")            # no favourite of its prompt: no pair

    out = tmp_path / "pairs.jsonl"
    result = export_pairs(fake_run, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (result.from_comparisons, result.from_verdicts, result.skipped) == (1, 4, [])
    assert rows[0]["source"] == "comparison"
    assert (rows[0]["chosen"]["image"], rows[0]["rejected"]["image"]) == (red.path, green.path)
    derived = {(r["chosen"]["image"], r["rejected"]["image"]) for r in rows[1:]}
    assert derived == {(f.path, r.path) for f in (yellow, orange) for r in (red, green)}
    for row in rows:
        assert row["prompt"] == "a photo of ohwx person"
        for side in (row["chosen"], row["rejected"]):
            img = images[side["image"]]
            assert side["path"] == str(fake_run.resolve() / img.path)
            assert (side["sha256"], side["seed"], side["scale"], side["checkpoint"]) == (
                img.sha256, img.seed, img.scale, img.checkpoint)
            assert side["negative_prompt"] == "blurry" and side["parameters"] == img.parameters

    # A regenerated image is not the one that was rated: its pairs are left out, with the reason.
    Image.new("RGB", (64, 64), "black").save(fake_run / orange.path)
    result = export_pairs(fake_run, out)
    assert result.written == 3 and result.skipped == [f"{orange.path}: changed since it was rated"]


def test_export_errors_name_the_run_and_the_fix(fake_run, tmp_path):
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(FinetuneError, match=r"no ratings in .*run yet \(feedback.sqlite is missing\)"):
        export_pairs(fake_run, out)
    images = {img.path: img for img in scan_run(fake_run).images}
    Store(fake_run / DB_NAME).rate(images["gallery/20250101-120000/p01/scale-0_8-seed1.png"], "favourite")
    with pytest.raises(FinetuneError, match="no preference pairs in .*feedback.sqlite yet"):
        export_pairs(fake_run, out)
    assert not out.exists()


def test_cli_export(rated, fake_run, tmp_path):
    images, store = rated
    store.compare(images["samples/step-000100/0-1.png"], images["samples/step-000100/0-2.png"], "a")
    out = tmp_path / "pairs.jsonl"
    res = CliRunner().invoke(cli, ["review", str(fake_run), "--export", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 1 preference pairs" in res.output and len(out.read_text().splitlines()) == 1
    res = CliRunner().invoke(cli, ["review", str(fake_run / "nope"), "--export", str(out)])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("error: run folder")

"""prepare knows who the subject is: identity per photo, strangers flagged or rejected, group photos
framed on the subject, distances in the report. On real photographs (tests/real_photos.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from finetune import identity
from finetune.data import process
from finetune.data.faces import detect_faces
from finetune.data.prepare import prepare
from finetune.errors import FinetuneError

from photo_helpers import config

pytestmark = pytest.mark.skipif(not identity.available(), reason=f"identity models not installed: {identity.INSTALL}")

RES = 128


def rows(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture()
def planted(real_photos, tmp_path):
    """Three photos of one man and, among them, a stranger's portrait."""
    src = tmp_path / "photos"
    src.mkdir()
    for i, name in enumerate(["obama.jpg", "obama2.jpg", "biden.jpg", "obama3.jpg"]):
        shutil.copy(real_photos / name, src / f"{i}-{name}")
    return src


def test_stranger_is_flagged_and_distances_reported(planted, tmp_path):
    out = tmp_path / "ds"
    result = prepare(planted, out, config(resolution=RES), progress=False)
    assert result.kept == 4
    by_source = {r["source"].rsplit("/", 1)[1]: r for r in rows(out)}
    stranger = by_source["2-biden.jpg"]
    assert stranger["subject_distance"] > identity.SAME_PERSON
    assert all(by_source[n]["subject_distance"] < identity.SAME_PERSON - 0.1
               for n in ("0-obama.jpg", "1-obama2.jpg", "3-obama3.jpg"))
    assert all(len(r["identity"]) == 128 for r in by_source.values())
    html = (out / "report.html").read_text()
    assert "not the same person as the other 3 photos" in html
    assert html.count("distance to the subject: ") == 4
    assert f"distance to the subject: {stranger['subject_distance']:.2f}" in html
    assert any("1 look like someone else" in n for n in result.notices), result.notices
    subject = json.loads((out / "dataset.json").read_text())["subject"]
    assert subject["photos"] == 3 and len(subject["embedding"]) == 128


def test_require_subject_rejects_the_stranger(planted, tmp_path):
    result = prepare(planted, tmp_path / "ds", config(resolution=RES, require_subject=True), progress=False)
    assert result.kept == 3
    assert [(p.name, reason.split(" (")[0]) for p, reason in result.rejected] == [
        ("2-biden.jpg", "not the same person as the other 3 photos")]
    assert "1 not the subject" in result.summary


def test_group_photo_is_framed_on_the_subject(real_photos, tmp_path, monkeypatch):
    """A 'group photo' of two real portraits side by side, the stranger's face the larger: the crop
    must frame the subject's face, not the largest."""
    biden = Image.open(real_photos / "biden.jpg").convert("RGB")
    obama = Image.open(real_photos / "obama3.jpg").convert("RGB")
    (bx, by, bw, bh), (ox, oy, ow, oh) = detect_faces(biden)[0], detect_faces(obama)[0]
    # faces above a fifth of the short side: prepare's detector looks for smaller ones only when it
    # finds no large one (finetune.data.faces)
    left = biden.crop((bx - bw, by - bh // 2, bx + 2 * bw, by + 3 * bh)).resize((990, 1155))  # face ~330 px
    right = obama.crop((ox - ow, oy - oh // 2, ox + 2 * ow, oy + 3 * oh)).resize((810, 945))  # face ~270 px
    group = Image.new("RGB", (1900, 1100), (90, 90, 90))
    group.paste(left, (10, 0))
    group.paste(right, (1050, 100))
    src = tmp_path / "photos"
    src.mkdir()
    group.save(src / "0-group.jpg", quality=92)
    for name in ("obama.jpg", "obama2.jpg"):
        shutil.copy(real_photos / name, src / name)

    out = tmp_path / "ds"
    embedded = []  # three photos: analysed in this process, so the count is seen here
    real = process.face_embeddings
    monkeypatch.setattr(process, "face_embeddings", lambda dec, faces: embedded.append(len(faces)) or real(dec, faces))
    prepare(src, out, config(resolution=RES), progress=False)
    assert embedded == [2, 1, 1]  # framing the group photo again on its second face reuses its vectors
    row = rows(out)[0]
    assert row["source"].endswith("0-group.jpg") and row["faces"] == 2
    x, y, w, h = row["face_box"]
    assert x > 1050 and w < 300, row["face_box"]  # the subject on the right, not the larger face on the left
    assert row["subject_distance"] < identity.SAME_PERSON
    crop = np.asarray(Image.open(out / row["image"]).convert("RGB").resize((512, 512)))
    face = detect_faces(Image.fromarray(crop))[0]
    subject = json.loads((out / "dataset.json").read_text())["subject"]["embedding"]
    assert identity.distance(identity.embed(crop, face), subject) < identity.SAME_PERSON  # the crop is him
    # the re-framing is cached like any crop: a re-run analyses nothing
    again = prepare(src, out, config(resolution=RES), progress=False)
    assert again.processed == 0 and rows(out)[0]["face_box"] == row["face_box"]


def test_without_identity_prepare_says_what_to_install(example_photos, tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "available", lambda: False)
    result = prepare(example_photos, tmp_path / "ds", config(resolution=RES), progress=False)
    assert result.notices == [f"identity: not checked (the face identity models are not installed: {identity.INSTALL})"]
    with pytest.raises(FinetuneError, match=r"data.require_subject = true needs face identity models.*pip install"):
        prepare(example_photos, tmp_path / "ds2", config(resolution=RES, require_subject=True), progress=False)


def test_identity_can_be_turned_off(example_photos, tmp_path):
    result = prepare(example_photos, tmp_path / "ds", config(resolution=RES, identity=False), progress=False)
    assert result.notices == ["identity: off (data.identity = false): strangers are not flagged"]
    assert all(json.loads(line)["identity"] is None for line in (tmp_path / "ds" / "manifest.jsonl").open())
    with pytest.raises(FinetuneError, match=r"data.require_subject = true needs data.crop = 'face' and data.identity"):
        prepare(example_photos, tmp_path / "ds2", config(identity=False, require_subject=True), progress=False)

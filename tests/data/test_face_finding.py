"""Face finding beyond the Haar cascade, on real photos: dlib's HOG detector when the cascade finds
nothing (tilted heads), photos turned sideways or upside down without an EXIF tag, and tilted heads
straightened on the eyes in the crop."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from finetune import identity
from finetune.data.faces import detect_faces, haar_faces
from finetune.data.prepare import prepare

from photo_helpers import config

pytestmark = pytest.mark.skipif(not identity.available(), reason=f"identity models not installed: {identity.INSTALL}")

GREY = (128, 128, 128)


def tilted(path, angle):
    return Image.open(path).convert("RGB").rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=GREY)


def test_hog_finds_tilted_heads_the_cascade_misses(real_photos):
    """Before (the cascade alone) and after (the cascade, then HOG): bench/faces.py measures the rest."""
    photos = [tilted(real_photos / n, a) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg") for a in (25, -30)]
    before = sum(bool(haar_faces(p)) for p in photos)
    after = sum(bool(detect_faces(p)) for p in photos)
    assert before <= 2 and after == len(photos), (before, after)


def rows(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def eye_angle(image: Image.Image) -> float:
    pixels = np.asarray(image.convert("RGB"))
    (ax, ay), (bx, by) = identity.eyes(pixels, identity.detect(pixels, 1)[0])
    return math.degrees(math.atan2(by - ay, bx - ax))


def test_sideways_and_tilted_photos_come_out_upright_and_level(real_photos, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    shutil.copy(real_photos / "obama.jpg", src / "0-upright.jpg")
    # stored sideways with no EXIF orientation tag (as some apps and scanners write them)
    Image.open(real_photos / "obama2.jpg").transpose(Image.Transpose.ROTATE_90).save(src / "1-sideways.jpg", quality=92)
    tilted(real_photos / "obama3.jpg", 20).save(src / "2-tilted.jpg", quality=92)
    out = tmp_path / "ds"
    prepare(src, out, config(resolution=256), progress=False)
    upright, sideways, tilt = rows(out)
    assert sideways["faces"] == 1 and any(n.startswith("turned 90° clockwise") for n in sideways["notes"])
    assert sideways["original_size"] == list(Image.open(real_photos / "obama2.jpg").size)  # upright size
    # turned 20° here, plus the head's own lean in the photo
    assert any(re.fullmatch(r"head tilted 1\d°: straightened on the eyes", n) for n in tilt["notes"]), tilt["notes"]
    for row in (upright, sideways, tilt):
        crop = Image.open(out / row["image"])
        assert haar_faces(crop), row["source"]  # an upright frontal face in the training image
        assert abs(eye_angle(crop)) < 6, (row["source"], eye_angle(crop))
        assert row["subject_distance"] < identity.SAME_PERSON

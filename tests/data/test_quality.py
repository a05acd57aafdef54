"""finetune.data.quality: the blur measure and its default threshold, perceptual and pixel hashes."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageEnhance, ImageFilter

from finetune.config import DataConfig
from finetune.data.prepare import hamming
from finetune.data.quality import phash, sharpness


@pytest.fixture(scope="module")
def crop(example_photos):
    """A 512 px face crop like prepare writes."""
    return Image.open(example_photos / "IMG_0001.jpg").convert("RGB").crop((83, 0, 366, 283)).resize((512, 512))


def test_default_blur_threshold_separates_blurry_from_sharp(crop):
    threshold = DataConfig().blur_threshold
    assert sharpness(crop) > 10 * threshold
    assert sharpness(crop.filter(ImageFilter.GaussianBlur(3))) < threshold  # clearly out of focus: rejected
    assert sharpness(crop.filter(ImageFilter.GaussianBlur(2))) > threshold  # soft but usable: kept
    assert sharpness(ImageEnhance.Contrast(crop).enhance(0.25)) > threshold  # dim yet sharp: kept
    values = [sharpness(crop.filter(ImageFilter.GaussianBlur(r))) for r in (0.5, 1, 2, 4)]
    assert values == sorted(values, reverse=True)


def test_sharpness_does_not_depend_on_resolution(crop):
    assert sharpness(crop.resize((1024, 1024), Image.Resampling.LANCZOS)) == pytest.approx(sharpness(crop), rel=0.25)


def test_phash_near_for_copies_far_for_other_photos(crop, example_photos):
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=60)
    recompressed = Image.open(buf)
    assert hamming(phash(crop), phash(recompressed)) <= 2
    assert hamming(phash(crop), phash(crop.resize((300, 300)))) <= 2
    other = Image.open(example_photos / "IMG_0004.png").convert("RGB")  # mirrored
    assert hamming(phash(crop), phash(other)) > 12
    assert hamming(phash(crop), phash(crop.filter(ImageFilter.GaussianBlur(1)))) <= DataConfig().near_duplicate_distance

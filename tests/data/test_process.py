"""finetune.data.process: one photo in a worker. What makes a 12 MP photo cheap is checked here: one
reduced-size decode, area resampling that matches Lanczos, sharpness from the crop, and a main
process that never loads the imaging libraries."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from finetune import identity
from finetune.config import DataConfig
from finetune.data import process
from finetune.data.quality import sharpness
from finetune.data.versions import analysis_settings, opencv_version


def big_jpeg(example_photos, face_zoom: float) -> bytes:
    """A 2400x1800 JPEG of the example portrait; `face_zoom` < 1 shrinks the subject into a wider frame."""
    photo = Image.open(example_photos / "IMG_0006.jpg").convert("RGB")  # 4:3, face near the top middle
    frame = Image.new("RGB", (2400, 1800), (96, 100, 104))
    w, h = round(2400 * face_zoom), round(1800 * face_zoom)
    frame.paste(photo.resize((w, h), Image.Resampling.BICUBIC), ((2400 - w) // 2, 0))
    buf = io.BytesIO()
    frame.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def count_decodes(monkeypatch) -> list:
    scales = []
    real = process.decode

    def counting(*args, **kwargs):
        dec = real(*args, **kwargs)
        scales.append(dec.scale)
        return dec

    monkeypatch.setattr(process, "decode", counting)
    return scales


def test_a_selfie_sized_face_is_decoded_once_at_reduced_size(example_photos, monkeypatch):
    scales = count_decodes(monkeypatch)
    result = process.analyze(big_jpeg(example_photos, 1.0), analysis_settings(DataConfig(resolution=256)))
    left, top, right, bottom = result["crop_box"]
    assert result["face_box"] is not None and (right - left) * 0.5 >= 256
    assert scales == [0.5]  # one decode, 1200x900: room for a crop of half the short side at 256 px
    assert not any("upscaled" in note for note in result["notes"])


def test_a_small_face_is_decoded_again_larger_rather_than_upscaled(example_photos, monkeypatch):
    scales = count_decodes(monkeypatch)
    # a face of 6% of the short side (the detector itself is tested in test_faces.py)
    monkeypatch.setattr(process, "detect_faces", lambda small: [(small.width // 2, small.height // 4,
                                                                 small.height // 16, small.height // 16)])
    result = process.analyze(big_jpeg(example_photos, 1.0), analysis_settings(DataConfig(resolution=256)))
    left, top, right, bottom = result["crop_box"]
    assert (right - left) * 0.5 < 256  # too small at the first scale
    assert len(scales) == 2 and scales[1] > scales[0] and (right - left) * scales[1] >= 256
    assert not any("upscaled" in note for note in result["notes"])


@pytest.mark.parametrize("mode, expected", [("face", 1024), ("center", 512), ("none", 449)])
def test_each_crop_mode_decodes_at_what_it_needs(mode, expected):
    # face: room for a crop of half the short side; centre: the whole short side at 512; none: the
    # 576x448 bucket nearest 4:3 (the box is the whole height), over DETECT_SIDE
    assert process.decode_short((4000, 3000), 512, mode) == expected


def test_area_resampling_matches_lanczos_and_enlarging_uses_lanczos(example_photos):
    photo = Image.open(example_photos / "IMG_0006.jpg").convert("RGB").resize((1600, 1200), Image.Resampling.LANCZOS)
    box = (300, 100, 1300, 1100)
    ours = np.asarray(process.resize_region(photo, box, (384, 384)), dtype=np.float64)
    lanczos = np.asarray(photo.resize((384, 384), Image.Resampling.LANCZOS, box=box), dtype=np.float64)
    assert ours.shape == lanczos.shape and np.abs(ours - lanczos).mean() < 1.5
    small_box = (300, 100, 500, 300)  # 200 px, enlarged to 384
    assert np.array_equal(np.asarray(process.resize_region(photo, small_box, (384, 384))),
                          np.asarray(photo.resize((384, 384), Image.Resampling.LANCZOS, box=small_box)))
    edge = process.resize_region(photo, (1000, 800, 1601, 1201), (256, 256))  # a box a pixel past the edge
    assert edge.size == (256, 256) and np.asarray(edge)[-1, -1].max() > 0  # clamped, not padded with black


def test_sharpness_from_the_crop_agrees_with_the_photo(example_photos):
    photo = Image.open(example_photos / "IMG_0006.jpg").convert("RGB").resize((1600, 1200), Image.Resampling.LANCZOS)
    box = (300.0, 100.0, 1300.0, 1100.0)
    crop = process.resize_region(photo, (300, 100, 1300, 1100), (512, 512))
    assert process.sharpness_of_crop(photo, box, crop) == pytest.approx(sharpness(photo, box), rel=0.2)
    tiny = process.resize_region(photo, (300, 100, 1300, 1100), (64, 64))  # too small to measure: the photo is
    assert process.sharpness_of_crop(photo, box, tiny) == sharpness(photo, box)


def test_the_main_process_needs_no_imaging_library():
    code = ("import sys; from finetune.config import DataConfig; from finetune.data.prepare import prepare; "
            "from finetune.data.versions import analysis_settings; analysis_settings(DataConfig()); "
            "print(sorted(m for m in ('cv2', 'numpy', 'PIL.Image') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_opencv_version_read_without_importing_it():
    import cv2

    assert opencv_version().startswith(cv2.__version__)


@pytest.mark.skipif(not identity.available(), reason=f"identity models not installed: {identity.INSTALL}")
def test_identity_reads_a_region_of_the_reduced_decode(example_photos, monkeypatch):
    """The descriptor's aligned chip and the eye landmarks come from the reduced decode, and only from
    the region around the face: the same vector as from the whole decode, at a fraction of the pixels."""
    shapes = []
    real = identity.embed
    monkeypatch.setattr(identity, "embed", lambda pixels, box: shapes.append(pixels.shape) or real(pixels, box))
    settings = analysis_settings(DataConfig(resolution=256))
    data = big_jpeg(example_photos, 1.0)  # 2400x1800, decoded at 1200x900
    result = process.analyze(data, settings)
    (h, w, _), = shapes
    assert h * w < 1200 * 900 / 4
    x, y, fw, fh = result["face_box"]
    assert max(h, w) <= 3 * max(fw, fh) * 0.5 + 4  # the face and one face size around it, at the decode's scale
    whole = Image.open(io.BytesIO(data))
    whole.draft("RGB", (1200, 900))
    vector = real(np.asarray(whole.convert("RGB")), tuple(v * 0.5 for v in result["face_box"]))
    assert np.linalg.norm(np.asarray(result["embeddings"][0]) - vector) < 1e-3  # stored rounded to 4 decimals

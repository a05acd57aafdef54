"""The descriptor network run by NumPy gives dlib's own vectors, from dlib's own model file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune import identity
from finetune.data.faces import detect_faces

pytestmark = pytest.mark.skipif(not identity.available(), reason=f"identity models not installed: {identity.INSTALL}")

MODEL = "dlib_face_recognition_resnet_model_v1.dat"


def chip_of(path):
    import dlib

    pixels = np.asarray(Image.open(path).convert("RGB"))
    x, y, w, h = detect_faces(Image.fromarray(pixels))[0]
    shape = identity.landmarks(pixels, (x, y, w, h))
    return dlib.get_face_chip(pixels, shape, size=identity.CHIP, padding=0.25)


def test_same_vectors_as_dlib_on_real_photos(real_photos, example_photos):
    import dlib

    ours = identity._network()[0]
    theirs = dlib.face_recognition_model_v1(identity._model_file(MODEL))
    paths = [real_photos / n for n in ("obama.jpg", "biden.jpg", "hanks.png")] + [example_photos / "IMG_0001.jpg"]
    for path in paths:
        chip = chip_of(path)
        a = np.asarray(theirs.compute_face_descriptor(chip), dtype=np.float32)
        b = ours(chip)
        # measured: 1e-6 apart (float rounding); faces of one person lie 0.3-0.45 apart
        assert b.shape == (128,) and b.dtype == np.float32
        assert np.linalg.norm(a - b) < 1e-4, path.name


def test_embed_reads_an_aligned_chip_of_the_model_size(real_photos, monkeypatch):
    seen = []
    real = identity.descriptor
    monkeypatch.setattr(identity, "descriptor", lambda chip: seen.append(chip.shape) or real(chip))
    image = Image.open(real_photos / "obama.jpg").convert("RGB")
    identity.embed(np.asarray(image), detect_faces(image)[0])
    assert seen == [(identity.CHIP, identity.CHIP, 3)]


def test_the_network_runs_on_one_blas_thread(real_photos, monkeypatch):
    """prepare runs one worker per core: OpenBLAS's own threads on top cost many times the CPU."""
    from pathlib import Path

    from threadpoolctl import threadpool_info

    numpy_dir = Path(np.__file__).parent.parent  # site-packages: numpy/ and its bundled numpy.libs/
    net = identity._network()[0]
    threads = []
    monkeypatch.setattr(type(net), "__call__", lambda self, chip: threads.append(
        [p["num_threads"] for p in threadpool_info()
         if p["user_api"] == "blas" and Path(p["filepath"]).parent.name.startswith("numpy")]) or np.zeros(128, np.float32))
    identity.descriptor(np.zeros((identity.CHIP, identity.CHIP, 3), np.uint8))
    assert threads and threads[0] and set(threads[0]) == {1}


def test_a_file_that_is_not_the_network_is_refused(tmp_path):
    from finetune.face_resnet import FaceResNet, FormatError

    with open(identity._model_file(MODEL), "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(data[: len(data) // 2])  # a download that stopped half way
    with pytest.raises(FormatError):
        FaceResNet(str(cut))
    other = tmp_path / "landmarks.dat"
    other.write_bytes(open(identity._model_file("shape_predictor_5_face_landmarks.dat"), "rb").read())
    with pytest.raises(FormatError):
        FaceResNet(str(other))
    with pytest.raises(ValueError, match="150x150"):
        FaceResNet(identity._model_file(MODEL))(np.zeros((100, 100, 3), np.uint8))

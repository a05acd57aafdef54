"""Identity embeddings on real photographs: same person near, different people far, with a margin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from finetune import identity
from finetune.data.faces import detect_faces

pytestmark = pytest.mark.skipif(not identity.available(), reason=f"identity models not installed: {identity.INSTALL}")

MARGIN = 0.1
"""Same-person pairs must lie at least this far under SAME_PERSON, different people this far over it."""


def face_vector(path):
    image = Image.open(path).convert("RGB")
    boxes = detect_faces(image)  # the detector prepare uses
    assert boxes, path
    return identity.embed(np.asarray(image), boxes[0])


@pytest.fixture(scope="module")
def vectors(real_photos, example_photos):
    names = {"obama": "obama.jpg", "obama2": "obama2.jpg", "obama3": "obama3.jpg", "biden": "biden.jpg",
             "hanks": "hanks.png"}
    out = {k: face_vector(real_photos / f) for k, f in names.items()}
    out["collins"] = face_vector(example_photos / "IMG_0001.jpg")
    return out


def test_same_person_near_different_people_far(vectors):
    same = [identity.distance(vectors[a], vectors[b]) for a, b in itertools.combinations(["obama", "obama2", "obama3"], 2)]
    others = ["obama", "biden", "hanks", "collins"]
    different = [identity.distance(vectors[a], vectors[b]) for a, b in itertools.combinations(others, 2)]
    different += [identity.distance(vectors[a], vectors[b]) for a in ("obama2", "obama3") for b in others[1:]]
    # measured: same 0.33-0.44, different 0.75-0.90
    assert max(same) < identity.SAME_PERSON - MARGIN, same
    assert min(different) > identity.SAME_PERSON + MARGIN, different
    assert identity.likeness(vectors["obama"], vectors["obama2"]) > 1 - identity.SAME_PERSON + MARGIN


def test_subject_is_the_identity_most_photos_share(vectors):
    # photo 2 is a group photo: a stranger's face is the larger, listed first
    faces = [[vectors["obama"]], [vectors["biden"]], [vectors["hanks"], vectors["obama2"]], [vectors["obama3"]], []]
    found = identity.find_subject(faces)
    assert found["choice"] == [0, 0, 1, 0, None]
    assert found["photos"] == 3
    assert found["distance"][1] > identity.SAME_PERSON + MARGIN  # Biden: not the subject
    assert all(found["distance"][i] < identity.SAME_PERSON - MARGIN for i in (0, 2, 3))


def test_no_subject_when_no_two_photos_share_a_face(vectors):
    assert identity.find_subject([[vectors["obama"]], [vectors["biden"]], [vectors["hanks"]]]) is None
    assert identity.find_subject([[], []]) is None


def test_the_hog_detector_is_kept_in_binary_form_and_finds_the_same_faces(real_photos, tmp_path, monkeypatch):
    import dlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    identity._hog.cache_clear()
    try:
        pixels = np.asarray(Image.open(real_photos / "obama.jpg").convert("RGB"))
        first = identity.detect(pixels)  # builds dlib's detector and saves it
        assert identity.hog_cache_file().is_file() and identity.hog_cache_file().parent.parent == tmp_path
        identity._hog.cache_clear()
        loaded = identity._hog()
        assert isinstance(loaded, dlib.fhog_object_detector)
        assert identity.detect(pixels) == first and first
        identity.hog_cache_file().write_bytes(b"damaged")
        identity._hog.cache_clear()
        assert identity.detect(pixels) == first  # rebuilt
    finally:
        identity._hog.cache_clear()

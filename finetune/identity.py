"""Who is in a photo: face identity embeddings, and which identity a set of photos shares.

The model is dlib's ResNet face descriptor (a 128-d vector per face; two photos of one person lie
under SAME_PERSON apart in Euclidean distance) with its 5-point landmark model to align the face
first. Both ship in the `face-recognition-models` package (CC0 weights; the 68-point model in it,
trained on iBUG 300-W, is not used). dlib (`dlib-bin`: prebuilt wheels for Linux, macOS and Windows,
Boost licence) finds the landmarks and cuts the aligned chip; the descriptor network itself runs in
NumPy (`finetune.face_resnet`: the same weights and vector, five times faster than the BLAS-less
dlib-bin build), one BLAS thread per call (`threadpoolctl`): prepare already runs a worker per core,
and OpenBLAS's threads on a busy machine cost 25x the CPU. They are the optional extra
`finetune[identity]`: without it the commands that need identity say so in one line (`require()`).

Measured on real photographs from public packages (tests/test_identity.py): three different photos
of one man 0.33-0.43 apart, different people 0.65-0.98 apart.

`likeness` is 1 - distance: same-person pairs score above 1 - SAME_PERSON = 0.4, and about 0.6-0.7
for different photos of one person; strangers score about 0.1-0.35.
"""

from __future__ import annotations

import os
from functools import cache
from importlib.util import find_spec

from finetune.errors import FinetuneError

SAME_PERSON = 0.6
"""Distance under which two faces are the same person (dlib's own threshold for this model)."""
INSTALL = "pip install 'finetune[identity]'  (dlib-bin + face-recognition-models + threadpoolctl)"
MAX_FACES = 4
"""Faces embedded per photo: the largest ones (a group photo's subject is rarely smaller than the fourth)."""
CHIP = 150
"""Side of the aligned face the descriptor reads (the model's input size)."""

Box = tuple[int, int, int, int]
# NumPy and dlib are imported inside the functions: prepare's main process asks `version()` before
# its workers start, and leaves those imports to them.


def available() -> bool:
    """Whether dlib and the model files are installed (checked without importing them)."""
    return all(find_spec(m) is not None for m in ("dlib", "face_recognition_models", "threadpoolctl"))


def require(what: str) -> None:
    """Raise the one-line 'what to install' error when identity is unavailable."""
    if not available():
        raise FinetuneError(f"{what} needs face identity models, which are not installed: {INSTALL}")


def version() -> str | None:
    """The identity stack's version (part of prepare's cache key), None when not installed."""
    if not available():
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    parts = []
    for dist in ("dlib-bin", "dlib", "face-recognition-models", "face_recognition_models"):
        try:
            parts.append(f"{dist}={dist_version(dist)}")
        except PackageNotFoundError:
            continue
    return " ".join(parts) or "unknown"


def _model_file(name: str) -> str:
    # located, not imported: face_recognition_models' __init__ needs pkg_resources (setuptools)
    spec = find_spec("face_recognition_models")
    for folder in spec.submodule_search_locations or []:
        path = os.path.join(folder, "models", name)
        if os.path.isfile(path):
            return path
    raise FinetuneError(f"face-recognition-models is installed without {name}; reinstall it: {INSTALL}")


@cache
def _landmarker():
    """dlib's 5-point landmark predictor (all that levelling a tilted head needs)."""
    require("face identity")
    import dlib

    return dlib.shape_predictor(_model_file("shape_predictor_5_face_landmarks.dat"))


@cache
def _network():
    """(the descriptor network run by NumPy, the BLAS pools to limit around it)."""
    require("face identity")
    from threadpoolctl import ThreadpoolController

    from finetune.face_resnet import FaceResNet

    return FaceResNet(_model_file("dlib_face_recognition_resnet_model_v1.dat")), ThreadpoolController()


@cache
def _hog():
    """dlib's frontal-face HOG detector. dlib builds it from a text form compiled into the library
    (0.3 s, paid by every prepare worker that meets a photo the Haar cascade misses); the same
    detector saved in dlib's binary form loads in a millisecond, so it is kept in the user's cache."""
    import dlib

    path = hog_cache_file()
    if path.is_file():
        try:
            return dlib.fhog_object_detector(str(path))
        except RuntimeError:  # damaged: built again below
            pass
    detector = dlib.get_frontal_face_detector()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        detector.save(str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the detector is the same, only slower to build next time
    return detector


def hog_cache_file():
    """Where the binary HOG detector is kept: $XDG_CACHE_HOME (or ~/.cache)/finetune, per dlib version."""
    from pathlib import Path

    import dlib

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "finetune" / f"dlib-{dlib.__version__}-frontal-face-hog.svm"


def landmarks(pixels, box: Box):
    """dlib's 5 landmarks (eye corners and nose) of the face in `box` (x, y, w, h) of RGB `pixels`."""
    import dlib

    x, y, w, h = (int(round(v)) for v in box)
    return _landmarker()(pixels, dlib.rectangle(x, y, x + w, y + h))


def eyes(pixels, box: Box) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of the (image-left, image-right) eyes of the face in `box`."""
    shape = landmarks(pixels, box)
    p = [(shape.part(i).x, shape.part(i).y) for i in range(4)]
    a = ((p[0][0] + p[1][0]) / 2, (p[0][1] + p[1][1]) / 2)  # points 0-1: one eye's corners, 2-3: the other's
    b = ((p[2][0] + p[3][0]) / 2, (p[2][1] + p[3][1]) / 2)
    return (a, b) if a[0] <= b[0] else (b, a)


def embed(pixels, box: Box):
    """The 128-d identity vector of the face in `box` (x, y, w, h) of RGB uint8 `pixels` (H, W, 3)."""
    import dlib
    import numpy as np

    pixels = np.ascontiguousarray(pixels)
    shape = landmarks(pixels, box)
    return descriptor(dlib.get_face_chip(pixels, shape, size=CHIP, padding=0.25))


def descriptor(chip):
    """The 128-d vector of an aligned CHIP x CHIP face (dlib.get_face_chip), on one BLAS thread."""
    net, pools = _network()
    with pools.limit(limits=1, user_api="blas"):
        return net(chip)


def detect(pixels, upsample: int = 1) -> list[Box]:
    """dlib's HOG frontal-face detector: faces as (x, y, w, h), largest first."""
    import numpy as np

    found = _hog()(np.ascontiguousarray(pixels), upsample)
    H, W = pixels.shape[:2]
    boxes = []
    for r in found:
        x, y = max(0, r.left()), max(0, r.top())
        boxes.append((x, y, min(r.right(), W) - x, min(r.bottom(), H) - y))
    return sorted((b for b in boxes if b[2] > 0 and b[3] > 0), key=lambda b: (-b[2] * b[3], b[1], b[0]))


def distance(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)))


def likeness(a, b) -> float:
    """1 - distance, floored at 0: same person above 1 - SAME_PERSON."""
    return max(0.0, 1.0 - distance(a, b))


def rounded(vector) -> list[float]:
    """A vector as stored in JSON (4 decimals: distances move by under 1e-3)."""
    return [round(float(v), 4) for v in vector]


# ---------------------------------------------------------------- who the subject is
def find_subject(faces: list[list]) -> dict | None:
    """The identity most photos share, from each photo's face embeddings (several for a group photo).

    Every face is a candidate; its support is the number of other photos holding a face within
    SAME_PERSON of it. The best-supported face seeds the subject (ties: the earlier photo, its larger
    face); the subject is the mean of each photo's face nearest the seed within SAME_PERSON. Each photo
    then gets the face nearest that mean and its distance. None when no two photos share a face.

    Returns {"embedding", "photos": how many photos hold the subject, "choice": per photo the chosen
    face index (None: no face), "distance": per photo that face's distance (None: no face)}.
    """
    import numpy as np

    vectors = [[np.asarray(v, dtype=np.float32) for v in photo] for photo in faces]
    best = None
    for i, photo in enumerate(vectors):
        for j, v in enumerate(photo):
            support = sum(1 for k, other in enumerate(vectors)
                          if k != i and other and min(distance(v, o) for o in other) < SAME_PERSON)
            if best is None or support > best[0]:
                best = (support, i, j)
    if best is None or best[0] == 0:
        return None
    seed = vectors[best[1]][best[2]]
    members = []
    for photo in vectors:
        if photo:
            near = min(photo, key=lambda o: distance(seed, o))
            if distance(seed, near) < SAME_PERSON:
                members.append(near)
    centre = np.mean(members, axis=0)
    choice, dist = [], []
    for photo in vectors:
        if not photo:
            choice.append(None)
            dist.append(None)
            continue
        d = [distance(centre, o) for o in photo]
        j = int(np.argmin(d))
        choice.append(j)
        dist.append(round(d[j], 4))
    return {"embedding": centre, "photos": sum(1 for d in dist if d is not None and d < SAME_PERSON),
            "choice": choice, "distance": dist}

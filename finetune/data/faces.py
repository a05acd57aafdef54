"""Finding the subject's face and framing a square crop around it.

The detector is OpenCV's frontal-face Haar cascade, which ships inside opencv-python-headless 4.x
(no download). It runs on a grey copy whose short side is DETECT_SIDE pixels, looking for faces of at
least a tenth of that side (32 px; the cascade's window is 24): smaller faces are too small to frame a
training crop around anyway, and the small copy keeps detection cheap on 12 MP photos. On 40 synthetic
portraits (faces 10-40% of the short side) 320 px with a scale step of 1.2 found as many faces as
384 px with OpenCV's usual 1.1, less two, in under half the time; 256 px missed twice as many.

Most of the cascade's time goes to the smallest window sizes, and a selfie's face is rarely small, so
it looks for faces of at least LARGE_FACE of the short side first (about a third of the time) and
searches down to MIN_FACE only when none is found; a face found near that first pass's smallest size
is measured again around itself (`_refine`). The cost of that: when a large face is found, a second
face smaller than LARGE_FACE is not counted in the "several faces" note.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

DETECT_SIDE = 320
SCALE_STEP = 1.2
MIN_FACE = 0.1
"""Smallest face looked for, as a share of the photo's short side."""
LARGE_FACE = 0.2
"""Faces at least this share of the short side are looked for first; smaller ones only if none is found."""
FACE_ROW = 0.42
"""Where the face's centre sits in the crop, from the top (a little above the middle: room for shoulders)."""

Box = tuple[int, int, int, int]


@cache
def _cascade():
    import cv2

    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load {path}; reinstall opencv-python-headless<5")
    return cascade


def detect_faces(image: Image.Image) -> list[Box]:
    """Faces as integer (x, y, w, h) in `image` pixels, inside the image, largest first: the Haar
    cascade, then, when it finds none and finetune[identity] is installed, dlib's HOG detector (which
    finds faces looking down or turned that the cascade misses; bench/faces.py measures both)."""
    boxes = haar_faces(image)
    if not boxes and hog_available():
        boxes = hog_faces(image)
    return boxes


@cache
def hog_available() -> bool:
    from finetune import identity

    return identity.available()


def hog_faces(image: Image.Image) -> list[Box]:
    """dlib's HOG detector on a copy whose short side is DETECT_SIDE, upsampled once (its window is
    80 px: faces down to an eighth of the short side); boxes in `image` pixels, largest first."""
    from finetune import identity

    k = min(1.0, DETECT_SIDE / min(image.size))
    small = image.convert("RGB")
    if k < 1.0:
        small = small.resize((max(1, round(image.width * k)), max(1, round(image.height * k))), Image.Resampling.BOX)
    boxes = []
    for x, y, w, h in identity.detect(np.asarray(small), upsample=1):
        x, y = round(x / k), round(y / k)
        boxes.append((x, y, min(round(w / k), image.width - x), min(round(h / k), image.height - y)))
    return boxes


def haar_faces(image: Image.Image) -> list[Box]:
    """The Haar cascade's faces as integer (x, y, w, h) in `image` pixels, largest first."""
    import cv2

    short = min(image.size)
    if short < 24:  # smaller than the cascade's window
        return []
    k = min(1.0, DETECT_SIDE / short)
    gray = image.convert("L")
    if k < 1.0:
        gray = gray.resize((max(1, round(image.width * k)), max(1, round(image.height * k))), Image.Resampling.BOX)
    a = cv2.equalizeHist(np.asarray(gray))
    large = max(24, round(min(a.shape) * LARGE_FACE))
    found = _cascade().detectMultiScale(a, scaleFactor=SCALE_STEP, minNeighbors=5, minSize=(large, large))
    if len(found):
        found = [_refine(a, tuple(box), large) for box in found]
    else:
        side = max(24, round(min(a.shape) * MIN_FACE))
        found = _cascade().detectMultiScale(a, scaleFactor=SCALE_STEP, minNeighbors=5, minSize=(side, side))
    boxes = []
    for x, y, w, h in np.asarray(found, dtype=np.float64).reshape(-1, 4) / k:
        x, y = max(0, round(x)), max(0, round(y))
        boxes.append((x, y, min(round(w), image.width - x), min(round(h), image.height - y)))
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[1], b[0]))


def _refine(a: np.ndarray, box: Box, large: int) -> Box:
    """A face found by the first pass, measured again around itself with every window size.

    The first pass has no window under `large`, so a face just smaller than that is found by the
    windows above it and comes out too big (up to a fifth), which would frame it too loosely. Looking
    again in a region twice its size costs a small fraction of a whole-image pass."""
    x, y, w, h = (int(v) for v in box)
    if w >= large * SCALE_STEP:  # inside the first pass's range: measured by windows on both sides
        return box
    left, top = max(0, x - w // 2), max(0, y - h // 2)
    region = a[top:y + h + h // 2, left:x + w + w // 2]
    smallest = max(24, round(w / SCALE_STEP**3))
    again = _cascade().detectMultiScale(region, scaleFactor=SCALE_STEP, minNeighbors=5, minSize=(smallest, smallest),
                                        maxSize=(w, w))
    centre = (x + w / 2, y + h / 2)
    inside = [(rx + left, ry + top, rw, rh) for rx, ry, rw, rh in again
              if abs(rx + left + rw / 2 - centre[0]) < w / 4 and abs(ry + top + rh / 2 - centre[1]) < h / 4]
    return max(inside, key=lambda b: b[2]) if inside else box


def face_crop(face: Box, size: tuple[int, int], share: float) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) in which `face` takes `share` of the side, inside the image."""
    W, H = size
    x, y, w, h = face
    side = min(max(w, h) / share, W, H)
    side = max(side, min(max(w, h), W, H))
    side = int(round(side))
    cx = x + w / 2
    left = cx - side / 2
    top = y + h / 2 - FACE_ROW * side
    # keep the whole face in the square, then the square in the image
    left = min(max(left, x + w - side), x)
    top = min(max(top, y + h - side), y)
    left = int(round(min(max(left, 0), W - side)))
    top = int(round(min(max(top, 0), H - side)))
    return left, top, left + side, top + side


def center_crop(size: tuple[int, int]) -> tuple[int, int, int, int]:
    W, H = size
    side = min(W, H)
    left, top = (W - side) // 2, (H - side) // 2
    return left, top, left + side, top + side

"""One photo -> its training crop and everything the report and the checks need (runs in a worker).

The result depends only on the file's bytes and `versions.analysis_settings(cfg)`, so `prepare` caches it by
(source sha256, those settings) and a change of caption or threshold reuses it. Checks that depend
on other settings (min_side, blur_threshold, require_face, duplicates) are applied afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finetune.data.buckets import bucket_crop, nearest_bucket
from finetune.data.faces import DETECT_SIDE, center_crop, detect_faces, face_crop, haar_faces
from finetune.data.images import Rejected, decode
from finetune.data.png import encode_png
from finetune.data.quality import SHARPNESS_SIDE, phash, sharpness
from finetune.data.sources import read_source
from finetune.identity import MAX_FACES

THUMB_SIDE = 224


def process_photo(path: str, settings: dict) -> dict:
    """Decode, frame, crop and measure one photo. Never raises: a problem comes back as kind + reason."""
    import cv2

    cv2.setNumThreads(1)  # one process per core already; also keeps detection order-stable
    try:
        data = read_source(Path(path))
    except OSError as e:
        from finetune.data.sources import read_error

        return {"kind": "unreadable", "reason": read_error(Path(path), e)}
    out = {"source_sha256": hashlib.sha256(data).hexdigest()}
    try:
        out.update(analyze(data, settings))
    except Rejected as r:
        out.update(kind=r.kind, reason=r.reason)
    except Exception as e:  # one bad file never stops the run; say what happened
        out.update(kind="unreadable", reason=f"could not be processed ({type(e).__name__}: {e})")
    return out


def _to_source(box, scale: float, size: tuple[int, int]) -> list[int]:
    x, y, w, h = (round(v / scale) for v in box)
    x, y = min(max(0, x), size[0] - 1), min(max(0, y), size[1] - 1)
    return [x, y, max(1, min(w, size[0] - x)), max(1, min(h, size[1] - y))]


def decode_short(size: tuple[int, int], res: int, mode: str) -> int:
    """The short side to decode a photo of upright `size` at, so that its crop needs no second decode.

    JPEG decoding time is mostly entropy decoding, the same at every reduced scale: one decode at 1/2
    costs about half of a 1/4 decode followed by a 1/2 one. Centre crops and buckets are known from the
    size; a face crop is not known until the face is found, so room is left for one half the short side
    wide (a selfie's head and shoulders). A smaller face is decoded again, larger, in `analyze`.
    """
    need = max(res, SHARPNESS_SIDE)
    if mode == "face":
        return max(2 * need, DETECT_SIDE)
    if mode == "center":
        return max(need, DETECT_SIDE)
    bucket = nearest_bucket(size, res)
    left, top, right, bottom = bucket_crop(size, bucket)
    k = max(bucket[0] / (right - left), bucket[1] / (bottom - top), SHARPNESS_SIDE / max(right - left, bottom - top))
    return max(math.ceil(min(size) * k), DETECT_SIDE)


def analyze(data: bytes, settings: dict) -> dict:
    """`settings` may add "main_face": the index of the face to frame (default 0, the largest; prepare
    asks again for another when identity shows that the subject is not the largest face), with
    "embeddings": the faces' vectors from the first framing (not computed again)."""
    res, mode = settings["resolution"], settings["crop"]
    main = settings.get("main_face", 0)
    dec = decode(data, max_megapixels=settings["max_megapixels"], target_short=lambda size: decode_short(size, res, mode))
    W, H = size = dec.original_size
    notes = list(dec.notes)
    # one small copy serves the detector, the perceptual hash and the report's thumbnail
    small = shrink(dec.image, DETECT_SIDE)
    faces: list[list[int]] = []
    embeddings: list[list[float]] | None = None
    turn = None
    if mode == "face":
        found, turn = find_faces(small)
        if turn is not None:  # a photo stored sideways or upside down without an EXIF tag: turn it upright
            dec.image, small = dec.image.transpose(turn), small.transpose(turn)
            if turn != Image.Transpose.ROTATE_180:
                W, H = size = (H, W)
            notes.append(f"turned {TURN_WORDS[turn]}: the face was "
                         f"{'upside down' if turn == Image.Transpose.ROTATE_180 else 'sideways'} (no EXIF orientation)")
        faces = [_to_source(f, small.width / W, size) for f in found]
        if faces and settings.get("identity"):
            # a second framing of the same bytes (prepare's recrop) passes the vectors it already has
            embeddings = settings.get("embeddings") or face_embeddings(dec, faces[:MAX_FACES])
        main = min(main, len(faces) - 1) if faces else 0
        if faces:
            box = face_crop(tuple(faces[main]), size, settings["face_share"])
            if len(faces) > 1:
                notes.append(f"{len(faces)} faces found: framed " + ("the largest" if main == 0 else "the subject's"))
        else:
            box = center_crop(size)
            notes.append("no face found: centre crop")
        bucket = (res, res)
    elif mode == "center":
        box, bucket = center_crop(size), (res, res)
    else:
        bucket = nearest_bucket(size, res)
        box = bucket_crop(size, bucket)
    crop_w = box[2] - box[0]
    need = max(bucket[0], SHARPNESS_SIDE)
    if dec.scale < 1 and crop_w * dec.scale < min(need, crop_w):
        # a small face in a big JPEG: decode again, large enough that the crop is not upscaled
        dec = decode(data, max_megapixels=settings["max_megapixels"], target_short=math.ceil(min(size) * need / crop_w))
        if turn is not None:
            dec.image = dec.image.transpose(turn)
    s = dec.scale
    if faces and settings.get("identity"):
        angle = straighten(dec, faces[main], box)
        if angle:
            notes.append(f"head tilted {abs(angle):.0f}°: straightened on the eyes")
    crop = resize_region(dec.image, tuple(round(v * s) for v in box), bucket)
    if crop_w < bucket[0]:
        notes.append(f"crop is {crop_w} px wide: upscaled to {bucket[0]}")
    return {
        "original_size": [W, H],
        "faces": faces,
        "face_box": faces[main] if faces else None,
        "main_face": main,
        "embeddings": embeddings,
        "crop_box": list(box),
        "bucket": list(bucket),
        "sharpness": round(sharpness_of_crop(dec.image, tuple(v * s for v in box), crop), 3),
        "phash": f"{phash(small):016x}",
        "notes": notes,
        "thumb": thumbnail(small, W, box, faces, main),
        "crop_thumb": _jpeg_b64(crop.resize(_fit(crop.size, THUMB_SIDE), Image.Resampling.BICUBIC, reducing_gap=1.0)),
        "png": encode_png(crop),
    }


TURNS = (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180)
"""Tried in this order when no face is found upright: phones most often store a photo sideways."""
TURN_WORDS = {Image.Transpose.ROTATE_270: "90° clockwise", Image.Transpose.ROTATE_90: "90° counter-clockwise",
              Image.Transpose.ROTATE_180: "180°"}
STRAIGHTEN = (8.0, 45.0)
"""Eye lines tilted by this range of degrees are levelled (under 8°: a natural pose, not worth resampling)."""


def find_faces(small: Image.Image) -> tuple[list, Image.Transpose | None]:
    """Faces on the small copy, upright first (Haar, then HOG); if none, with the Haar cascade on the
    copy turned 90° either way and 180° (a photo without its EXIF tag). Returns (boxes on the copy as
    turned, the turn or None)."""
    found = detect_faces(small)
    if found:
        return found, None
    for turn in TURNS:
        found = haar_faces(small.transpose(turn))
        if found:
            return found, turn
    return [], None


def straighten(dec, face: list[int], box) -> float:
    """Level a tilted head: rotate `dec.image` about the face's centre so that its eyes (dlib's
    landmarks) are horizontal, when the tilt is in STRAIGHTEN and the crop square, turned, stays inside
    the photo (no filled corners). Returns the angle applied (0: left as it was)."""
    from finetune.identity import eyes

    s = dec.scale
    pixels, (left, top), box_in = face_region(dec.image, tuple(v * s for v in face))
    (ax, ay), (bx, by) = ((x + left, y + top) for x, y in eyes(pixels, box_in))
    angle = math.degrees(math.atan2(by - ay, bx - ax))
    if not STRAIGHTEN[0] <= abs(angle) <= STRAIGHTEN[1]:
        return 0.0
    cx, cy = (face[0] + face[2] / 2) * s, (face[1] + face[3] / 2) * s
    a = math.radians(angle)
    for x, y in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])):
        dx, dy = x * s - cx, y * s - cy
        for sign in (1, -1):
            rx = cx + dx * math.cos(a) - sign * dy * math.sin(a)
            ry = cy + sign * dx * math.sin(a) + dy * math.cos(a)
            if not (0 <= rx <= dec.image.width and 0 <= ry <= dec.image.height):
                return 0.0
    dec.image = dec.image.rotate(angle, Image.Resampling.BICUBIC, center=(cx, cy))
    return angle


def face_embeddings(dec, faces: list[list[int]]) -> list[list[float]]:
    """Identity vectors of `faces` (boxes in full-size pixels), read from the decoded copy."""
    from finetune.identity import embed, rounded

    s = dec.scale
    return [rounded(embed(*face_region(dec.image, tuple(v * s for v in f))[::2])) for f in faces]


def face_region(image: Image.Image, face: tuple[float, ...]) -> tuple[np.ndarray, tuple[int, int], tuple[float, ...]]:
    """The pixels dlib's landmarks and aligned chip read around `face` (x, y, w, h in `image`): the face
    and one face size on each side, as an array, with its (left, top) in `image` and the face's box in it.
    The same landmarks and chip as from the whole image (tests/data/test_process.py), without converting
    a 3 MP decode to an array for each face."""
    x, y, w, h = face
    # even offsets: landmarks() rounds the box half to even, which an even shift leaves alone
    left, top = max(0, 2 * math.floor((x - w) / 2)), max(0, 2 * math.floor((y - h) / 2))
    right, bottom = min(image.width, math.ceil(x + 2 * w)), min(image.height, math.ceil(y + 2 * h))
    return np.asarray(image.crop((left, top, right, bottom))), (left, top), (x - left, y - top, w, h)


def sharpness_of_crop(image: Image.Image, box: tuple[float, ...], crop: Image.Image) -> float:
    """Sharpness of the photo's pixels in `box`. A training crop at least SHARPNESS_SIDE wide holds all
    the detail that measure sees, and is four times cheaper to measure; a smaller one (a 64 px training
    crop of a sharp photo is still a sharp photo) is measured on the photo itself."""
    if min(crop.size) >= SHARPNESS_SIDE and box[2] - box[0] >= crop.width:
        return sharpness(crop)
    return sharpness(image, box)


def resize_region(image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
    """The `box` region of `image` resampled to `size`.

    Shrinking (the usual case) averages areas: whole-pixel binning down to under twice the size, then
    OpenCV's area interpolation, where each output pixel is the exact mean of the source area it covers
    (no ringing; what kohya's scripts use). That costs a third of Pillow's Lanczos, whose kernel widens
    with the ratio. Enlarging a region smaller than `size` uses Lanczos.
    """
    import cv2

    left, top, right, bottom = box = (max(0, box[0]), max(0, box[1]), min(image.width, box[2]), min(image.height, box[3]))
    if right - left < size[0] or bottom - top < size[1]:
        return image.resize(size, Image.Resampling.LANCZOS, box=box)
    factor = int(min((right - left) / size[0], (bottom - top) / size[1]))
    region = image.reduce(factor, box=box) if factor > 1 else image.crop(box)
    if region.size == size:
        return region
    return Image.fromarray(cv2.resize(np.asarray(region), size, interpolation=cv2.INTER_AREA))


def shrink(image: Image.Image, short: int) -> Image.Image:
    """`image` binned by a whole factor to a short side between `short` and twice that (cheap; each
    user of the small copy resamples it to its own size)."""
    factor = int(min(image.size) // short)
    return image.reduce(factor) if factor > 1 else image


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    k = side / max(size)
    return max(1, round(size[0] * k)), max(1, round(size[1] * k))


def _jpeg_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=82)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(image: Image.Image, original_width: int, box, faces, main: int = 0) -> str:
    """The source, small, with the crop (white) and the faces (main green, others orange) drawn on it."""
    small = image.resize(_fit(image.size, THUMB_SIDE), Image.Resampling.BILINEAR)
    k = small.width / original_width
    draw = ImageDraw.Draw(small)
    width = max(2, small.width // 100)
    l, t, r, b = (v * k for v in box)
    draw.rectangle((l, t, r - 1, b - 1), outline=(255, 255, 255), width=width)
    for i, (x, y, w, h) in enumerate(faces):
        draw.rectangle((x * k, y * k, (x + w) * k - 1, (y + h) * k - 1),
                       outline=(40, 220, 80) if i == main else (255, 150, 0), width=width)
    return _jpeg_b64(small)


"""One photo -> its training crop and everything the report and the checks need (runs in a worker).

The result depends only on the file's bytes and `analysis_settings(cfg)`, so `prepare` caches it by
(source sha256, those settings) and a change of caption or threshold reuses it. Checks that depend
on other settings (min_side, blur_threshold, require_face, duplicates) are applied afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.data.buckets import bucket_crop, nearest_bucket
from finetune.data.faces import DETECT_SIDE, center_crop, detect_faces, face_crop
from finetune.data.images import Rejected, decode
from finetune.data.quality import SHARPNESS_SIDE, phash, pixel_digest, sharpness
from finetune.data.sources import read_source

PROCESS_VERSION = 1
"""Bump when the crops or measurements change, so cached results are rebuilt."""
THUMB_SIDE = 224
# Huffman-only deflate: on photos it is within 2% of level 6's size at a fraction of the time
# (deflate's string matching finds little in camera noise).
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}


def analysis_settings(cfg) -> dict:
    """The settings a photo's crop depends on (its cache key), with the library versions that compute it."""
    import cv2
    import PIL

    return {"resolution": cfg.resolution, "crop": cfg.crop, "face_share": cfg.face_share,
            "max_megapixels": cfg.max_megapixels, "version": PROCESS_VERSION,
            "pillow": PIL.__version__, "opencv": cv2.__version__}


def init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; also keeps detection order-stable


def process_photo(path: str, settings: dict) -> dict:
    """Decode, frame, crop and measure one photo. Never raises: a problem comes back as kind + reason."""
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


def analyze(data: bytes, settings: dict) -> dict:
    res, mode = settings["resolution"], settings["crop"]
    # A JPEG is decoded at the smallest scale that still gives `res` pixels (and the face detector its
    # 320) across the short side; a face crop narrower than `res` (or the sharpness check's 256) is
    # decoded again, larger, below. Selfies rarely need the second pass, and resampling a crop from
    # just above its final size is several times cheaper than from 2-4x.
    dec = decode(data, max_megapixels=settings["max_megapixels"], target_short=max(res, DETECT_SIDE))
    W, H = size = dec.original_size
    notes = list(dec.notes)
    # one small copy serves the detector, the perceptual hash and the report's thumbnail
    small = shrink(dec.image, DETECT_SIDE)
    faces: list[list[int]] = []
    if mode == "face":
        faces = [_to_source(f, small.width / W, size) for f in detect_faces(small)]
        if faces:
            box = face_crop(tuple(faces[0]), size, settings["face_share"])
            if len(faces) > 1:
                notes.append(f"{len(faces)} faces found: framed the largest")
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
    s = dec.scale
    crop = dec.image.resize(bucket, Image.Resampling.LANCZOS, box=tuple(v * s for v in box), reducing_gap=3.0)
    if crop_w < bucket[0]:
        notes.append(f"crop is {crop_w} px wide: upscaled to {bucket[0]}")
    png = io.BytesIO()
    crop.save(png, "PNG", **PNG_OPTIONS)
    return {
        "original_size": [W, H],
        "faces": faces,
        "face_box": faces[0] if faces else None,
        "crop_box": list(box),
        "bucket": list(bucket),
        # measured on the photo's pixels in the crop, not the resized crop: a 64 px training crop of a
        # sharp photo is still a sharp photo
        "sharpness": round(sharpness(dec.image.crop(tuple(round(v * s) for v in box))), 3),
        "phash": f"{phash(small):016x}",
        "pixels": pixel_digest(dec.image),
        "notes": notes,
        "thumb": thumbnail(small, W, box, faces),
        "crop_thumb": _jpeg_b64(crop.resize(_fit(crop.size, THUMB_SIDE), Image.Resampling.BICUBIC, reducing_gap=2.0)),
        "png": png.getvalue(),
    }


def shrink(image: Image.Image, short: int) -> Image.Image:
    """`image` with its short side reduced to `short` (box filter: fast, and fine for analysis)."""
    k = short / min(image.size)
    if k >= 1:
        return image
    size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
    return image.resize(size, Image.Resampling.BOX, reducing_gap=2.0)


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    k = side / max(size)
    return max(1, round(size[0] * k)), max(1, round(size[1] * k))


def _jpeg_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=82)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(image: Image.Image, original_width: int, box, faces) -> str:
    """The source, small, with the crop (white) and the faces (main green, others orange) drawn on it."""
    small = image.resize(_fit(image.size, THUMB_SIDE), Image.Resampling.BILINEAR)
    k = small.width / original_width
    draw = ImageDraw.Draw(small)
    width = max(2, small.width // 100)
    l, t, r, b = (v * k for v in box)
    draw.rectangle((l, t, r - 1, b - 1), outline=(255, 255, 255), width=width)
    for i, (x, y, w, h) in enumerate(faces):
        draw.rectangle((x * k, y * k, (x + w) * k - 1, (y + h) * k - 1),
                       outline=(40, 220, 80) if i == 0 else (255, 150, 0), width=width)
    return _jpeg_b64(small)


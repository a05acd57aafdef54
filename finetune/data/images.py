"""Decoding a photo into an upright RGB image, whatever the camera or phone wrote.

Handles EXIF orientation, every Pillow mode (alpha composited on grey, 16-bit scaled, CMYK), ICC
profiles (converted to sRGB), HEIC through pillow-heif, reduced-size JPEG decodes (`draft`), and
decompression bombs. Every failure is a `Rejected` with a short kind and a sentence for the report.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

# Transparent pixels become this grey: neutral, so no colour cast leaks into the subject's edges.
BACKGROUND = (128, 128, 128)

HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")

# EXIF orientation -> the transpose that makes the pixels upright.
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Rejected(Exception):
    """A photo that cannot be used: `kind` groups it in counts, the message explains it."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class Decoded:
    image: Image.Image
    """Upright RGB pixels, possibly reduced (see `scale`)."""
    original_size: tuple[int, int]
    """(width, height) of the full-size photo after EXIF orientation."""
    scale: float
    """image width / original width (1.0 unless a JPEG was decoded at reduced size)."""
    notes: list[str] = field(default_factory=list)


def is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS


def heif_support() -> bool:
    """Register pillow-heif's opener if it is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@contextmanager
def own_pixel_limit():
    """Pillow's decompression-bomb check off while we apply ours (data.max_megapixels) to the header."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _orientation(im: Image.Image, notes: list[str]) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF blocks come in many shapes; the pixels are still fine
        notes.append("unreadable EXIF data ignored")
        return 1
    return value if value in ORIENTATION else 1


def decode(data: bytes, *, max_megapixels: float,
           target_short: int | Callable[[tuple[int, int]], int] | None = None) -> Decoded:
    """Open `data`, decoding a JPEG at the smallest reduced size whose short side is >= target_short.

    `target_short` may be a function of the upright full size (width, height), read from the header
    before any pixel is decoded, for callers whose need depends on the photo's shape.
    """
    notes: list[str] = []
    if is_heif(data) and not heif_support():
        raise Rejected("unsupported", "HEIC/HEIF photo, but pillow-heif is not installed: pip install finetune[heif]")
    limit = int(max_megapixels * 1_000_000)
    with own_pixel_limit():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not an image", "not an image (no known image format inside)") from None
        except Exception as e:
            raise Rejected("unreadable", f"unreadable image header ({type(e).__name__}: {e})") from None
        w, h = im.size
        if w * h > limit:
            raise Rejected("too large", f"claims {w}x{h} pixels ({w * h / 1e6:.0f} MP), over data.max_megapixels = "
                           f"{max_megapixels:g}: refused as a possible decompression bomb (raise the limit if the "
                           "photo is genuine)")
        orientation = _orientation(im, notes)
        original = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        # MPO is how many cameras write JPEG: the photo plus previews or a depth map, not an animation
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and im.format != "MPO":
            notes.append(f"animated ({frames} frames): used the first frame")
        if callable(target_short):
            target_short = target_short(original)
        if im.format in ("JPEG", "MPO") and target_short and min(w, h) > target_short:
            k = target_short / min(w, h)
            im.draft(im.mode, (math.ceil(w * k), math.ceil(h * k)))
        try:
            im.load()
        except Exception as e:
            raise Rejected("unreadable", f"truncated or corrupt {im.format or 'image'} ({type(e).__name__}: {e})") from None
    icc = im.info.get("icc_profile")
    if orientation != 1:
        im = im.transpose(ORIENTATION[orientation])
        notes.append(f"EXIF orientation {orientation} applied")
    rgb = to_rgb(im, icc, notes)
    return Decoded(rgb, original, rgb.width / original[0], notes)


_SRGB = None


def _to_srgb(im: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    global _SRGB
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in (ImageCms.getProfileDescription(profile) or "").lower().replace(" ", ""):
            return im  # already sRGB: skip an identity transform
        _SRGB = _SRGB or ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(im, profile, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        notes.append(f"ICC profile ignored ({e})")
        return im


def to_rgb(im: Image.Image, icc: bytes | None = None, notes: list[str] | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha composited on grey, 16/32-bit scaled, colour managed."""
    notes = notes if notes is not None else []
    mode = im.mode
    if mode in ("RGB", "CMYK") and icc:
        im = _to_srgb(im, icc, notes)
        mode = im.mode
    if mode == "RGB":
        return im
    if (mode == "P" and "transparency" in im.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparency composited on grey")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im).astype(np.float64)
        # 16-bit data (I;16*, or I as Pillow reads 16-bit PNGs) spans 0..65535, not 0..255.
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        if mode != "F" and top == 65535.0:
            notes.append("16-bit image scaled to 8 bits")
        return Image.fromarray(a, "L").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise Rejected("unsupported", f"colour mode {mode} cannot be converted to RGB ({e})") from None

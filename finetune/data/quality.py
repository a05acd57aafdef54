"""Image quality measures: sharpness (variance of the Laplacian), perceptual hash, exact-pixel digest."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

SHARPNESS_SIDE = 256
"""Sharpness is measured at this size so the threshold means the same for every photo size and resolution."""


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the image fitted into SHARPNESS_SIDE² (higher = sharper)."""
    import cv2

    gray = image.convert("L")
    k = SHARPNESS_SIDE / max(gray.size)
    gray = gray.resize((max(1, round(gray.width * k)), max(1, round(gray.height * k))), Image.Resampling.LANCZOS)
    return float(cv2.Laplacian(np.asarray(gray, dtype=np.float64), cv2.CV_64F).var())


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: signs of the 8x8 lowest DCT frequencies of a 32x32 grey copy vs their median."""
    import cv2

    small = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def pixel_digest(image: Image.Image) -> str:
    """Identical for identical pixels, whatever file or format they came from."""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height} ".encode())
    h.update(image.tobytes())
    return h.hexdigest()

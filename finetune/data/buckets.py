"""Aspect-ratio buckets for `data.crop = "none"`: whole photos at about resolution² pixels.

As kohya and OneTrainer do it: sides are multiples of 64, between half and twice the resolution,
each bucket as large as fits in resolution² pixels; a photo goes to the bucket nearest its aspect
ratio (compared in log space, so 2:1 and 1:2 are equally far from square) and loses only the thin
strips that differ.
"""

from __future__ import annotations

import math
from functools import cache

STEP = 64


@cache
def buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """Every (width, height) bucket for a training resolution, sorted by aspect ratio."""
    area = resolution * resolution
    lo, hi = max(STEP, resolution // 2 // STEP * STEP), 2 * resolution
    found = set()
    for w in range(lo, hi + 1, STEP):
        h = min(hi, area // w // STEP * STEP)
        if h >= lo:
            found.update({(w, h), (h, w)})
    return tuple(sorted(found, key=lambda b: (b[0] / b[1], b[0])))


def nearest_bucket(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size`'s; ties go to the larger bucket."""
    ratio = math.log(size[0] / size[1])
    return min(buckets(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred (left, top, right, bottom) of `size` with the bucket's aspect ratio."""
    W, H = size
    bw, bh = bucket
    if W * bh > H * bw:  # wider than the bucket: trim the sides
        w = max(1, round(H * bw / bh))
        left = (W - w) // 2
        return left, 0, left + w, H
    h = max(1, round(W * bh / bw))
    top = (H - h) // 2
    return 0, top, W, top + h

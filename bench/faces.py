"""Face finding recall: OpenCV's Haar cascade vs dlib's HOG detector vs what prepare uses, on real photos
of people, at the sizes and rotations phones produce. Prints one table of recall and time per photo.

Photos: the bundled example photos (Eileen Collins, NASA) and the real photos the tests take from PyPI
packages (tests/real_photos.py: Barack Obama x3, Joe Biden, Tom Hanks). Variants of each:
  as is | small face (the photo shrunk to a third on a canvas of its size) | turned 90 / 180 / 270
  degrees with no EXIF tag | head tilted 20 and 35 degrees.
A variant counts as found when the detector's largest face contains the true face's centre (the true
face: the Haar box on the upright photo, moved as the variant moves it).

Run: .venv/bin/python bench/faces.py   (needs finetune[identity] for the dlib columns)
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from finetune import identity  # noqa: E402
from finetune.data import faces  # noqa: E402
from finetune.data.process import shrink  # noqa: E402

GREY = (128, 128, 128)


def photos() -> list[tuple[str, Image.Image]]:
    from real_photos import extract_photos

    out = [(p.name, ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
           for p in sorted((REPO / "datasets" / "example-photos").glob("IMG_*"))]
    folder = extract_photos(Path(tempfile.mkdtemp(prefix="faces-bench-")))
    out += [(p.name, Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
    return out


def variants(image: Image.Image, centre: tuple[float, float]):
    """(name, image, where the face's centre is now)."""
    W, H = image.size
    x, y = centre
    yield "as is", image, centre
    small = Image.new("RGB", (W, H), GREY)
    small.paste(image.resize((W // 3, H // 3), Image.Resampling.LANCZOS), (W // 3, H // 3))
    yield "small face", small, (W / 3 + x / 3, H / 3 + y / 3)
    yield "turned 90", image.transpose(Image.Transpose.ROTATE_90), (y, W - x)
    yield "turned 180", image.transpose(Image.Transpose.ROTATE_180), (W - x, H - y)
    yield "turned 270", image.transpose(Image.Transpose.ROTATE_270), (H - y, x)
    for angle in (20, 35):
        turned = image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=GREY)
        a = math.radians(angle)
        dx, dy = x - W / 2, y - H / 2  # PIL turns counter-clockwise (y down)
        rx, ry = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
        yield f"tilted {angle}", turned, (turned.width / 2 + rx, turned.height / 2 + ry)


def on_small(detect, image):
    """As prepare runs a detector: on the binned copy, boxes back in photo pixels."""
    small = shrink(image, faces.DETECT_SIDE)
    k = image.width / small.width
    return [tuple(round(v * k) for v in b) for b in detect(small)]


def haar(image):
    return on_small(faces.haar_faces, image)


def hog(image):
    return on_small(faces.hog_faces, image)


def prepare_detector(image):
    """What prepare does: Haar, then HOG, then Haar on the photo turned (finetune.data.process)."""
    from finetune.data.process import find_faces

    small = shrink(image, faces.DETECT_SIDE)
    found, turn = find_faces(small)
    if turn is not None:  # boxes on the turned photo: turn the face centre back for the check
        small_t = small.transpose(turn)
        k = image.width / small.width
        return [_turn_back(b, turn, small_t.size, k) for b in found]
    return on_small(lambda _: found, image)


def _turn_back(box, turn, size, k):
    x, y, w, h = box
    W, H = size
    T = Image.Transpose
    if turn == T.ROTATE_180:
        x, y = W - x - w, H - y - h
    elif turn == T.ROTATE_90:  # counter-clockwise: (x, y) on the turned copy came from (W - y - h... )
        x, y, w, h = H - y - h, x, h, w
    elif turn == T.ROTATE_270:
        x, y, w, h = y, W - x - w, h, w
    return tuple(round(v * k) for v in (x, y, w, h))


def main() -> None:
    detectors = {"haar": haar, "prepare (haar, hog, turned)": prepare_detector}
    if identity.available():
        detectors = {"haar": haar, "hog": hog, "prepare (haar, hog, turned)": prepare_detector}
    results: dict[tuple[str, str], list[bool]] = {}
    times: dict[str, list[float]] = {}
    for name, image in photos():
        truth = haar(image)
        if not truth:
            print(f"  {name}: no face on the upright photo, left out")
            continue
        x, y, w, h = truth[0]
        for vname, v, (cx, cy) in variants(image, (x + w / 2, y + h / 2)):
            for dname, detect in detectors.items():
                t = time.perf_counter()
                found = detect(v)
                times.setdefault(dname, []).append(time.perf_counter() - t)
                ok = bool(found) and found[0][0] <= cx <= found[0][0] + found[0][2] and \
                    found[0][1] <= cy <= found[0][1] + found[0][3]
                results.setdefault((vname, dname), []).append(ok)
    names, kinds = list(detectors), list(dict.fromkeys(v for v, _ in results))
    print(f"{'variant':<14}" + "".join(f"{d:>28}" for d in names))
    for vname in kinds:
        row = [results[vname, d] for d in names]
        print(f"{vname:<14}" + "".join(f"{sum(r):>22d} of {len(r):<3d}" for r in row))
    total = [sum(sum(results[v, d]) for v in kinds) for d in names]
    count = sum(len(results[v, names[0]]) for v in kinds)
    print(f"{'all':<14}" + "".join(f"{t:>22d} of {count:<3d}" for t in total))
    print(f"{'ms per photo':<14}" + "".join(f"{1000 * np.median(times[d]):>28.1f}" for d in names))


if __name__ == "__main__":
    main()

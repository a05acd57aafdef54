"""`finetune score RUN`: does the LoRA look like the subject, at which checkpoint and LoRA scale?

For the images of a run's gallery (`finetune sample`), against the subject that `prepare` found in
the run's dataset (finetune.identity):
- likeness: 1 - identity distance of each generated face to the subject, over the images whose prompt
  holds the trigger word, with the share of those images where a face was found at all;
- class leak: the same likeness over images whose prompt lacks the trigger ("a photo of a person"):
  an overfit LoRA turns everyone into the subject;
- copying: generated images that are near-duplicates of a training crop, by perceptual hash
  (COPY_BITS) or by identity (COPY_DISTANCE: closer than two different photos of one person are).

Aggregated per checkpoint x LoRA scale into scores.json (in the gallery and, for `export --checkpoint
best`, in the run folder), shown in the gallery's index.html beside each image and on a plot against
the training step. `recommend` picks one cell: the highest likeness among those whose class leak stays
under LEAK_LIMIT and that copy nothing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune import identity, runs
from finetune.errors import FinetuneError
from finetune.words import plural

SCORES = "scores.json"
LEAK_LIMIT = 1 - identity.SAME_PERSON
"""A class image this like the subject is recognised as the subject: the LoRA leaks."""
COPY_BITS = 6
"""Perceptual hashes this close (of 64 bits) = the same picture."""
COPY_DISTANCE = 0.2
"""Identity closer than this to a training crop's face: a copy (different photos of one person: 0.33-0.44)."""
MIN_FACE_SHARE = 0.5
"""A cell is recommended only if a face was found in at least this share of its trigger images."""
TIE = 0.005
"""Likeness within this of the best counts as a tie (then: less leak, earlier step, lower scale)."""


@dataclass
class Cell:
    """The scores of one checkpoint x LoRA scale."""

    checkpoint: str | None
    """step-NNNNNN, or None for the run's final LoRA (and the base row)."""
    step: int | None
    scale: float
    images: int = 0
    """Images whose prompt holds the trigger."""
    faces: int = 0
    """Of those, images where a face was found."""
    likeness: float | None = None
    class_images: int = 0
    class_faces: int = 0
    class_leak: float | None = None
    copies: int = 0

    @property
    def label(self) -> str:
        if self.scale == 0:
            return "the base model"
        return f"{self.checkpoint or 'final'} at scale {self.scale:g}"


# ---------------------------------------------------------------- the recommendation
def recommend(cells: list[Cell]) -> tuple[Cell | None, str]:
    """The cell to use, with the line that says so; (None, why) when none can be recommended."""
    tuned = [c for c in cells if c.scale > 0]
    images = sum(c.images + c.class_images for c in tuned)
    faces = sum(c.faces + c.class_faces for c in tuned)
    if not tuned:
        return None, "no LoRA images to score (only the base model was sampled)"
    if faces == 0:
        return None, f"no face found in {images} of {plural(images, 'sample')}: no recommendation"
    usable = [c for c in tuned if c.likeness is not None and c.faces >= MIN_FACE_SHARE * c.images]
    if not usable:
        return None, (f"a face was found in under {MIN_FACE_SHARE:.0%} of the trigger images of every checkpoint "
                      "and scale: no recommendation")
    clean = [c for c in usable if (c.class_leak is None or c.class_leak < LEAK_LIMIT) and not c.copies]
    if not clean:
        return None, (f"every checkpoint and scale with faces leaks the subject into the class prompt (likeness "
                      f">= {LEAK_LIMIT:.2f}) or copies a training photo: no recommendation; train fewer steps or "
                      "with prior preservation")
    top = max(c.likeness for c in clean)
    best = min((c for c in clean if c.likeness >= top - TIE),
               key=lambda c: (c.class_leak or 0.0, c.step if c.step is not None else float("inf"), c.scale))
    return best, line(best)


def line(c: Cell) -> str:
    leak = f"class leak {c.class_leak:.2f}" if c.class_leak is not None else "class leak not measured (no class prompt)"
    return f"{c.checkpoint or 'final'} at scale {c.scale:g}: likeness {c.likeness:.2f}, {leak}"


# ---------------------------------------------------------------- measuring images
def subject_of(run: Path) -> tuple[dict | None, Path | None, str]:
    """(dataset.json's subject, the dataset folder, why there is none) for a run folder."""
    try:
        info = json.loads((run / runs.RUN_INFO).read_text())
    except (OSError, ValueError):
        raise FinetuneError(f"{run} is not a run folder (no readable run.json): pass a folder that "
                            "`finetune train` wrote") from None
    dataset = Path(info.get("dataset") or "")
    try:
        data = json.loads((dataset / "dataset.json").read_text())
    except (OSError, ValueError):
        return None, None, f"its dataset {dataset} has no readable dataset.json"
    if not data.get("subject"):
        crop = data.get("settings", {}).get("crop")
        why = ("the dataset was prepared without face crops" if crop != "face" else
               "prepare found no face shared by several photos (not a person, or prepared without identity)")
        return None, dataset, why
    return data["subject"], dataset, ""


def face_vector(image) -> list[float] | None:
    """The identity vector of the largest face in a PIL image, None when no face is found."""
    import numpy as np

    from finetune.data.faces import detect_faces

    pixels = np.asarray(image.convert("RGB"))
    boxes = identity.detect(pixels, upsample=1) or detect_faces(image)  # HOG, then the Haar cascade
    return identity.embed(pixels, boxes[0]) if boxes else None


def training_crops(dataset: Path) -> list[dict]:
    """The dataset's training images: {"image", "phash", "identity"} (identity None without a face)."""
    from PIL import Image

    from finetune.data.quality import phash

    crops = []
    for text in (dataset / "manifest.jsonl").read_text().splitlines():
        row = json.loads(text)
        with Image.open(dataset / row["image"]) as im:
            crops.append({"image": row["image"], "phash": phash(im), "identity": row.get("identity")})
    return crops


def measure(path: Path, subject: list[float], crops: list[dict]) -> dict:
    """One generated image: {"face", "likeness", "copy_of"}."""
    from PIL import Image

    from finetune.data.quality import phash

    with Image.open(path) as im:
        im.load()
        vector = face_vector(im)
        h = phash(im)
    copy_of = next((c["image"] for c in crops if (h ^ c["phash"]).bit_count() <= COPY_BITS), None)
    if vector is not None and copy_of is None:
        copy_of = next((c["image"] for c in crops if c["identity"] is not None
                        and identity.distance(vector, c["identity"]) < COPY_DISTANCE), None)
    return {"face": vector is not None,
            "likeness": round(identity.likeness(vector, subject), 4) if vector is not None else None,
            "copy_of": copy_of}


def step_of(checkpoint: str | None) -> int | None:
    m = re.fullmatch(r"step-(\d+)", checkpoint or "")
    return int(m.group(1)) if m else None


def aggregate(images: list[dict]) -> list[Cell]:
    """Per checkpoint x scale: image records {"checkpoint", "scale", "class_prompt", "face", "likeness", "copy_of"}."""
    cells: dict[tuple, Cell] = {}
    sums: dict[tuple, list[float]] = {}
    for im in images:
        key = (im["checkpoint"] if im["scale"] else None, im["scale"])
        c = cells.setdefault(key, Cell(key[0], step_of(key[0]), im["scale"]))
        kind = "class" if im["class_prompt"] else "instance"
        if kind == "class":
            c.class_images += 1
            c.class_faces += im["face"]
        else:
            c.images += 1
            c.faces += im["face"]
            c.copies += im["copy_of"] is not None
        if im["likeness"] is not None:
            sums.setdefault(key + (kind,), []).append(im["likeness"])
    for key, c in cells.items():
        if values := sums.get(key + ("instance",)):
            c.likeness = round(sum(values) / len(values), 4)
        if values := sums.get(key + ("class",)):
            c.class_leak = round(sum(values) / len(values), 4)
    order = lambda c: (c.scale > 0, c.step if c.step is not None else float("inf"), c.scale)  # noqa: E731
    return sorted(cells.values(), key=order)


def latest_gallery(run: Path) -> Path:
    galleries = sorted((p.parent for p in (run / runs.GALLERY).glob("*/gallery.json")), key=lambda p: p.stat().st_mtime)
    if not galleries:
        raise FinetuneError(f"{run} has no gallery to score: run `finetune sample {run}` first "
                            "(e.g. with --checkpoints all)")
    return galleries[-1]


def score(run: Path | str, gallery: Path | str | None = None, progress: bool = True) -> dict | None:
    """Score a run's gallery (default: its newest), write scores.json there and in the run folder and
    show the scores in the gallery's index.html. None (and nothing written) when the run has no face
    subject; the reason is then in `skip_reason(run)`."""
    from tqdm import tqdm

    run = Path(run)
    subject, dataset, why = subject_of(run)
    if subject is None:
        return None
    identity.require("finetune score")
    gallery = Path(gallery) if gallery else latest_gallery(run)
    try:
        record = json.loads((gallery / "gallery.json").read_text())
    except (OSError, ValueError) as e:
        raise FinetuneError(f"cannot read {gallery}/gallery.json ({e}): pass a folder `finetune sample` wrote") from None
    info = runs.read_info(run)
    trigger = info.get("trigger") or ""
    crops = training_crops(dataset)
    images = []
    todo = [(p, im) for p in record["prompts"] for im in p["images"]]
    for prompt, im in tqdm(todo, desc="scoring", unit="img", disable=not progress):
        found = measure(gallery / im["file"], subject["embedding"], crops)
        images.append({"file": im["file"], "checkpoint": im.get("checkpoint"), "scale": im["scale"],
                       "prompt": prompt["prompt"], "class_prompt": not _has_word(prompt["prompt"], trigger), **found})
    cells = aggregate(images)
    for c in cells:
        if c.checkpoint is None and c.scale > 0:
            c.step = info.get("steps")  # the run's final LoRA: its last step
    best, text = recommend(cells)
    faces = sum(1 for im in images if im["face"] and im["scale"] > 0)
    tuned = sum(1 for im in images if im["scale"] > 0)
    result = {"schema": 1, "run": str(run), "gallery": str(gallery), "trigger": trigger,
              "same_person_under": identity.SAME_PERSON, "leak_limit": LEAK_LIMIT,
              "faces_found": f"{faces} of {tuned}", "cells": [asdict(c) | {"label": c.label} for c in cells],
              "recommendation": ({"checkpoint": best.checkpoint, "step": best.step, "scale": best.scale,
                                  "likeness": best.likeness, "class_leak": best.class_leak} if best else None),
              "summary": text, "images": images}
    data = (json.dumps(result, indent=1) + "\n").encode()
    for folder in (gallery, run):
        _write(folder / SCORES, data)
    show_in_gallery(gallery, result)
    return result


def dataset_subject(dataset: Path) -> dict | None:
    """The subject prepare recorded in a dataset's dataset.json, None without one."""
    try:
        return json.loads((Path(dataset) / "dataset.json").read_text()).get("subject") or None
    except (OSError, ValueError):
        return None


def training_scores(images: list[tuple[Path, str]], subject: dict, trigger: str) -> dict:
    """Likeness and class leak of one step's training samples ((path, prompt) pairs), for metrics.jsonl:
    {"likeness", "class_leak", "faces", "identity"} (means None where no face was found)."""
    likes: dict[bool, list[float]] = {True: [], False: []}
    for path, prompt in images:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            vector = face_vector(im)
        if vector is not None:
            likes[not _has_word(prompt, trigger)].append(identity.likeness(vector, subject["embedding"]))
    mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
    found = len(likes[True]) + len(likes[False])
    return {"likeness": mean(likes[False]), "class_leak": mean(likes[True]), "faces": f"{found} of {len(images)}",
            "identity": (f"no face found in {len(images)} of {plural(len(images), 'sample')}" if not found else
                         f"faces found in {found} of {plural(len(images), 'sample')}")}


def skip_reason(run: Path | str) -> str:
    """The one-line notice for a run without a face subject ('' when it has one)."""
    subject, _, why = subject_of(Path(run))
    return "" if subject else f"identity scores skipped: no face subject in this run ({why})"


def _has_word(text: str, word: str) -> bool:
    return bool(word) and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def show_in_gallery(gallery: Path, result: dict) -> None:
    """Re-render the gallery's index.html with each image's scores and the plot (if it recorded how)."""
    from finetune.gallery import index_html

    record = json.loads((gallery / "gallery.json").read_text())
    if "summary" not in record:  # a gallery from before scores: its page stays as it is
        return
    _write(gallery / "index.html", index_html(record["title"], record["summary"], record["prompts"],
                                              scores=result).encode("utf-8"))

"""Favourites -> training data: what `finetune train --feedback RUN` adds to (and drops from) a run's data.

`feedback_examples(run, weight)` turns the images a person favourited in `finetune review RUN` into
manifest-like rows (the image, its prompt as the caption, a per-row loss weight); `rejected_prompts(run)`
names the prompts that person rejected images of, so prior-preservation images made from them are not
reused. Both read the run's feedback.sqlite (finetune.review.store), where an image's current verdict is
its newest rating; a rating counts only while the image on disk is still the one that was rated.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.review.images import sha256_file
from finetune.review.store import DB_NAME, Store


def _store(run_dir: Path) -> tuple[Path, Store]:
    run = Path(run_dir)
    if not run.is_dir():
        raise FinetuneError(f"--feedback {run}: no such run folder; give the outputs/<run> folder whose samples "
                            "you rated with `finetune review`")
    run = run.resolve()
    return run, Store(run / DB_NAME, create=False)


def feedback_examples(run_dir: Path, weight: float = 1.0, skipped: list[str] | None = None) -> list[dict]:
    """One row per favourited image of `run_dir`, in rating order:

        {"image": absolute path, "caption": the prompt it was made from, "sha256", "bucket": [w, h],
         "weight": the loss weight, "source": "feedback:<run>/<image>", "seed", "scale", "checkpoint"}

    Favourites whose file is gone, changed since it was rated, or outside the run are left out with a
    reason appended to `skipped`. Raises when the run has no ratings or no usable favourite.
    """
    from PIL import Image

    if not weight > 0:
        raise FinetuneError(f"the feedback weight must be above 0, got {weight}: it multiplies the loss of the "
                            "favourited images (1 = like a dataset photo)")
    run, store = _store(run_dir)
    skipped = [] if skipped is None else skipped
    rows = []
    for r in store.current_ratings():
        if r["verdict"] != "favourite":
            continue
        path = (run / r["image"]).resolve()
        if not path.is_relative_to(run) or not path.is_file():
            skipped.append(f"{r['image']}: favourited but gone")
            continue
        if sha256_file(path) != r["sha256"]:
            skipped.append(f"{r['image']}: changed since it was favourited")
            continue
        with Image.open(path) as im:
            size = list(im.size)
        rows.append({"image": str(path), "caption": r["prompt"], "sha256": r["sha256"], "bucket": size,
                     "weight": float(weight), "source": f"feedback:{run.name}/{r['image']}", "seed": r["seed"],
                     "scale": r["scale"], "checkpoint": r["checkpoint"]})
    if not rows:
        reason = f" ({len(skipped)} skipped: {skipped[0]})" if skipped else ""
        raise FinetuneError(f"--feedback {run_dir}: no favourited images to train on{reason}; mark favourites "
                            f"with `finetune review {run_dir}` first")
    return rows


def rejected_prompts(run_dir: Path) -> set[str]:
    """The prompts of which the person currently rejects at least one image of `run_dir`."""
    _, store = _store(run_dir)
    return {r["prompt"] for r in store.current_ratings() if r["verdict"] == "reject"}

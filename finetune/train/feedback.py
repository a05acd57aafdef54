"""Favourites -> training data: what `finetune train --feedback RUN` adds to (and drops from) a run's data.

`feedback_examples(run, weight)` turns the images a person favourited in `finetune review RUN` into
manifest-like rows (the image, its prompt as the caption, a per-row loss weight); `rejected_prompts(run)`
names the prompts that person rejected images of, so prior-preservation images made from them are not
reused; `rejects_note` says in one line what the rejects change in a given run (often nothing: they
only renew class images, so without prior preservation they are for `train-dpo`). Both read the run's feedback.sqlite (finetune.ratings), where an image's current verdict is
its newest rating; a rating counts only while the image on disk is still the one that was rated.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.hashing import sha256_file
from finetune.ratings import DB_NAME, Store


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
    return set(_rejected(run_dir))


def _rejected(run_dir: Path) -> list[str]:
    """The prompt of each image of `run_dir` the person currently rejects."""
    _, store = _store(run_dir)
    return [r["prompt"] for r in store.current_ratings() if r["verdict"] == "reject"]


def _images(n: int, verb: str = "") -> str:
    """"1 rejected image changes" / "2 rejected images change"."""
    text = f"{n} rejected image" + ("" if n == 1 else "s")
    return text + (f" {verb}s" if n == 1 else f" {verb}") if verb else text


def rejects_note(run_dir: Path, prior_preservation: bool, class_prompt: str) -> str | None:
    """One line saying what the rejected images of `run_dir` change in a run with these settings, or None
    when there are none. Rejects never leave the data (they were never in it): their only use in
    `train` is to make the class images of a rejected class prompt afresh."""
    prompts = _rejected(run_dir)
    if not prompts:
        return None
    dpo = f"to learn from them, tune the run with preference pairs: finetune train-dpo --from {run_dir}"
    if not prior_preservation:
        return (f"--feedback: the {_images(len(prompts), 'change')} nothing in this run: rejects only renew class "
                f"images, and train.prior_preservation is off; {dpo}")
    unused = sum(1 for p in prompts if p != class_prompt)
    if unused == len(prompts):
        return (f"--feedback: the {_images(len(prompts), 'change')} nothing in this run: none is of the class prompt "
                f"{class_prompt!r}, whose class images are the only thing rejects renew; {dpo}")
    used = len(prompts) - unused
    return (f"--feedback: {_images(used)} of the class prompt {class_prompt!r}: its class images are made afresh"
            + (f"; the other {_images(unused, 'change')} nothing here ({dpo})" if unused else ""))

"""Helpers for the training tests: a small prepared dataset in the contract layout, tiny-base configs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from PIL import Image, ImageOps

from finetune.config import load_config

CAPTION = "a photo of ohwx person"
# The watermark module belongs to the sample stage; until it exists, samples are written without it.
HAVE_WATERMARK = importlib.util.find_spec("finetune.watermark") is not None


def write_dataset(photos: Path, out: Path, buckets: dict[str, tuple[int, int]] | None = None, size: int = 64) -> Path:
    """A prepared dataset as `prepare` writes it (manifest.jsonl, images/NNNN.png + .txt, dataset.json):
    centre crops of the photos resized to `size` (or to the bucket named for a photo); dataset.json says it
    was prepared at `size` px, as the training run checks against data.resolution."""
    buckets = buckets or {}
    (out / "images").mkdir(parents=True)
    rows = []
    for n, src in enumerate(sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".png")), 1):
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = buckets.get(src.name, (size, size))
        scale = max(w / im.width, h / im.height)
        cw, ch = round(w / scale), round(h / scale)
        left, top = (im.width - cw) // 2, (im.height - ch) // 2
        box = [left, top, left + cw, top + ch]
        crop = im.crop(box).resize((w, h), Image.LANCZOS)
        name = f"images/{n:04d}.png"
        crop.save(out / name)
        (out / name).with_suffix(".txt").write_text(CAPTION)
        rows.append({"image": name, "caption": CAPTION, "source": str(src),
                     "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                     "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
                     "original_size": [im.width, im.height], "crop_box": box, "face_box": None, "faces": 0,
                     "bucket": [w, h]})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "dataset.json").write_text(json.dumps({"schema": 1, "tool": "finetune", "version": "test",
                                                  "settings": {"resolution": size},
                                                  "counts": {"kept": len(rows)}}))
    return out


def tiny_config(*overrides: str):
    """The tiny-demo preset made quick: few steps, one checkpoint (at the end), no sample images unless a
    test sets `sample.prompts`."""
    base = ["train.max_steps=4", "train.log_every=1", "train.save_every=0", "sample.every=0",
            "sample.prompts=[]", "sample.seeds=[1]",
            f"sample.watermark={'true' if HAVE_WATERMARK else 'false'}"]
    return load_config("tiny-demo", [*base, *overrides])


def tiny_sdxl_config(*overrides: str):
    """The tiny-sdxl-demo preset made quick: 3 steps of batch 1, plain AdamW, no checkpoints before the
    end, no sample images unless a test sets `sample.prompts`."""
    base = ["train.max_steps=3", "train.log_every=1", "train.save_every=0", "sample.every=0", "sample.prompts=[]",
            "sample.seeds=[1]", "train.optimizer=adamw", "train.batch_size=1",
            f"sample.watermark={'true' if HAVE_WATERMARK else 'false'}"]
    return load_config("tiny-sdxl-demo", [*base, *overrides])


def assert_equal_state(a, b, path="optimizer"):
    """Same structure, and every tensor equal bit for bit (torch.equal)."""
    import torch

    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_equal_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_half_resume_is_exact(cfg, dataset: Path, run_dir: Path, family: str, parts: set[str]) -> None:
    """`cfg` (train.max_steps=4, save_every=2, batches of 2 of 6 images) trained straight equals the same
    run resumed from its step-2 checkpoint, in the middle of an epoch: the LoRA weights of `parts` (the
    components that carry one) and the optimizer state, bit for bit."""
    import copy

    import torch

    from finetune.train.checkpoint import load_checkpoint
    from finetune.train.lora import fit, setup, trainable

    straight = setup(cfg, dataset, run_dir)
    assert straight.family.name == family
    fit(straight)
    weights = {k: v.detach().clone() for k, v in trainable(straight).items()}
    assert {k.split(".")[0] for k in weights} == parts
    optimizer = copy.deepcopy(straight.optimizer.state_dict())

    half = run_dir / "checkpoints" / "step-000002"
    saved = load_checkpoint(half)
    assert (saved["sampler"]["epoch"], saved["sampler"]["position"]) == (0, 2)  # mid-epoch (3 batches of 2)
    resumed = setup(cfg, dataset, run_dir, resume=half)
    assert resumed.step == 2
    fit(resumed)
    got = trainable(resumed)
    assert list(got) == list(weights)
    for name, weight in weights.items():
        assert torch.equal(got[name], weight), name
    assert_equal_state(resumed.optimizer.state_dict(), optimizer)

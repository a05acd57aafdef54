"""The prepared dataset as training examples, and a resumable per-bucket batch order.

`read_dataset` reads what `prepare` wrote (manifest.jsonl, images/NNNN.png, the editable
images/NNNN.txt captions). `BucketBatchSampler` decides which examples go together: its order is a
pure function of (seed, epoch), and `state_dict()` is just (epoch, position), so a run stopped in the
middle of an epoch continues with exactly the batches it would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.hashing import sha256_file

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Example:
    """One training image of a prepared dataset."""

    image: Path
    caption: str
    bucket: tuple[int, int]
    """(width, height): the image's size, which is its aspect-ratio bucket."""
    sha256: str
    """Of the image file as it is now (users may replace a crop; caches must notice)."""
    crop_box: tuple[int, ...] | None = None
    """(left, top, right, bottom) in the source photo's pixels: the region resized to `bucket`."""
    weight: float = 1.0
    """Multiplies this example's loss (favourites added with `--feedback` carry `train.feedback_weight`)."""
    original_size: tuple[int, int] | None = None
    """(width, height) of the source photo, as the manifest records it."""


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def substitute(text: str, trigger: str, class_word: str) -> str:
    return text.replace("[trigger]", trigger).replace("[class]", class_word)


def read_dataset(folder: Path, trigger: str = "", class_word: str = "") -> list[Example]:
    """The examples of a prepared dataset; every problem names the file and line."""
    from PIL import Image

    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise FinetuneError(f"dataset folder {folder} does not exist")
    if not manifest.is_file():
        raise FinetuneError(f"{folder} has no {MANIFEST}: run `finetune prepare PHOTOS --out {folder}` first, "
                            "or pass a folder of photos to train on directly")
    examples = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            row = json.loads(line)
            image = folder / row["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FinetuneError(f"{where} is not a manifest line with an \"image\" ({e}); "
                                "re-run `finetune prepare`") from None
        if not image.is_file():
            raise FinetuneError(f"{where}: image {image} is missing; re-run `finetune prepare`")
        with Image.open(image) as im:
            size = im.size
        bucket = tuple(row.get("bucket") or size)
        if tuple(size) != bucket:
            raise FinetuneError(f"{image} is {size[0]}x{size[1]} but the manifest says bucket {bucket[0]}x{bucket[1]}; "
                                "re-run `finetune prepare`")
        if size[0] % 8 or size[1] % 8:
            raise FinetuneError(f"{image} is {size[0]}x{size[1]}: both sides must be multiples of 8 for the VAE")
        txt = image.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else str(row.get("caption", ""))
        examples.append(Example(image=image, caption=substitute(caption, trigger, class_word), bucket=bucket,
                                sha256=sha256_file(image),
                                crop_box=tuple(row["crop_box"]) if row.get("crop_box") else None,
                                original_size=tuple(row["original_size"]) if row.get("original_size") else None))
    if not examples:
        raise FinetuneError(f"{manifest} lists no images: nothing to train on (see {folder / 'report.html'})")
    return examples


def prepared_settings(folder: Path) -> dict:
    """The [data] settings a dataset was prepared with (dataset.json's `settings`; {} if unknown)."""
    try:
        settings = json.loads((Path(folder) / "dataset.json").read_text()).get("settings") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def prepared_target(photos: Path) -> Path:
    """Where a folder of photos is prepared: datasets/<name>, or datasets/<name>-prepared when the
    photos themselves are in datasets/<name> (a source folder is never written to)."""
    target = Path("datasets") / Path(photos).resolve().name
    if target.resolve() == Path(photos).resolve():
        target = target.with_name(f"{target.name}-prepared")
    return target


def prepared_at(folder: Path) -> tuple[int | None, Path | None]:
    """(the `data.resolution` a dataset was prepared at, the photo folder it was prepared from).

    The resolution is dataset.json's `settings.resolution`; a dataset without one (made by hand or by
    another tool) is taken at its images' size when they are all the same square, else None (with
    `crop = "none"` the buckets only approximate resolution² in area). The photo folder is the one
    holding every `source` of the manifest, or None."""
    folder = Path(folder)
    settings = prepared_settings(folder)
    rows = []
    for line in (folder / MANIFEST).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # read_dataset has refused broken lines already
    resolution = settings.get("resolution")
    if not isinstance(resolution, int):
        sizes = {tuple(r.get("bucket") or ()) for r in rows}
        size = sizes.pop() if len(sizes) == 1 else ()
        resolution = size[0] if len(size) == 2 and size[0] == size[1] else None
    photos = None
    sources = [str(Path(r["source"]).parent) for r in rows if isinstance(r.get("source"), str)]
    if sources and len(sources) == len(rows):
        try:
            photos = Path(os.path.commonpath(sources))
        except ValueError:  # absolute and relative paths mixed
            pass
    return resolution, photos


def micro_conditioning(ex: Example) -> tuple[int, int, int, int, int, int]:
    """SDXL's six `time_ids` for an example: original size (h, w), crop top-left (top, left), target size (h, w).

    SDXL was trained with the photo resized (aspect kept) so that it covers the target, then cropped;
    `crops_coords_top_left` is where that crop starts, in the resized photo's pixels. `prepare` crops
    first (`crop_box`, in source pixels) and resizes the crop to the bucket, which is the same image:
    the crop's top-left scaled by bucket / crop size. The original size is the source photo's.
    Without that record (class images, feedback favourites) the image is its own uncropped original."""
    w, h = ex.bucket
    if ex.crop_box is None or ex.original_size is None:
        return (h, w, 0, 0, h, w)
    left, top, right, bottom = ex.crop_box[:4]
    top_px = round(top * h / (bottom - top))
    left_px = round(left * w / (right - left))
    orig_w, orig_h = ex.original_size
    return (orig_h, orig_w, top_px, left_px, h, w)


def dataset_hash(examples: list[Example]) -> str:
    """What was trained on: each image's bytes and caption, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.sha256}\t{ex.caption}\n".encode())
    return h.hexdigest()


def tag_frequency(examples: list[Example]) -> dict[str, int]:
    """Caption tags (split on commas) and their counts, as kohya's ss_tag_frequency."""
    counts = Counter(tag.strip() for ex in examples for tag in ex.caption.split(",") if tag.strip())
    return dict(counts.most_common())


def load_pixels(path: Path):
    """An image as a float tensor (3, H, W) in [-1, 1], what the VAE encodes."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


@dataclass(frozen=True)
class Batch:
    instance: tuple[int, ...]
    """Indices into the training examples."""
    prior: tuple[int, ...] = ()
    """Indices into the class images (prior preservation), same bucket, as many as instance images."""


class BucketBatchSampler:
    """Batches of same-size examples; the order of epoch e is a pure function of (seed, e).

    Each epoch shuffles every bucket's examples (each repeated `repeats` times), cuts them into
    batches, and shuffles the batches. Under data parallelism every process computes the same list
    and takes every `num_replicas`-th batch (the list is padded by wrapping so each gets as many).
    With `prior_buckets` (one bucket per class image), each batch also names as many class images
    of its bucket, drawn from a per-epoch permutation of that bucket's class images.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, repeats: int = 1,
                 num_replicas: int = 1, rank: int = 0, prior_buckets: list[tuple[int, int]] | None = None):
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.num_replicas = num_replicas
        self.rank = rank
        self.prior_buckets = [tuple(b) for b in prior_buckets] if prior_buckets is not None else None
        if self.prior_buckets is not None:
            missing = set(self.buckets) - set(self.prior_buckets)
            if missing:
                raise ValueError(f"no class images for buckets {sorted(missing)}")
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[Batch]] | None = None

    def epoch_batches(self, epoch: int) -> list[Batch]:
        """This process's batches of `epoch`, in order."""
        import numpy as np  # here, not at the top: `finetune train` reads datasets before the heavy imports

        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        by_bucket: dict[tuple, list[int]] = {}
        for i, b in enumerate(self.buckets):
            by_bucket.setdefault(b, []).extend([i] * self.repeats)
        chunks = []
        for b in sorted(by_bucket):
            ids = rng.permutation(by_bucket[b]).tolist()
            chunks += [(b, ids[k:k + self.batch_size]) for k in range(0, len(ids), self.batch_size)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        pad = -len(chunks) % self.num_replicas
        chunks = chunks + chunks[:pad]
        batches = []
        taken: Counter = Counter()
        prior_perm = {}
        if self.prior_buckets is not None:
            prng = np.random.default_rng([self.seed, epoch, 1])
            for b in sorted(set(self.prior_buckets)):
                pool = [i for i, pb in enumerate(self.prior_buckets) if pb == b]
                prior_perm[b] = prng.permutation(pool).tolist()
        for b, ids in chunks:
            prior = ()
            if prior_perm:
                pool = prior_perm[b]
                start = taken[b]
                prior = tuple(pool[(start + k) % len(pool)] for k in range(len(ids)))
                taken[b] += len(ids)
            batches.append(Batch(tuple(ids), prior))
        mine = batches[self.rank::self.num_replicas]
        self._cache = (epoch, mine)
        return mine

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return len(self.epoch_batches(0))

    def next(self) -> Batch:
        """The next batch; moves to the next epoch after the last one."""
        batches = self.epoch_batches(self.epoch)
        batch = batches[self.position]
        self.position += 1
        if self.position == len(batches):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the saved data order used seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

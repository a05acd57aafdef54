"""Ratings in `<run>/feedback.sqlite`: one row per rating, never updated, so the history stays.

Below both `finetune review` (which writes them) and training from feedback (which reads them), so
that `train --feedback` and `train-dpo` never import the review's HTTP server.


- `ratings`: a verdict on one image (favourite | reject | neutral); an image's current verdict is its newest row.
- `comparisons`: a choice between two images of the same prompt (winner a | b | tie).
Each row keeps the image's path, sha256 and settings as they were when it was rated, so the rows stand on
their own when samples are regenerated. WAL lets readers and one writer work at once across tabs and
processes; `synchronous=FULL` makes every acknowledged rating survive a crash or power cut.
`export_pairs` turns the rows into the preference pairs (chosen, rejected) a DPO recipe trains on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from finetune import runs
from finetune.errors import FinetuneError
from finetune.hashing import sha256_file
from finetune.words import plural

if TYPE_CHECKING:
    from finetune.review.images import ReviewImage

DB_NAME = runs.FEEDBACK
SCHEMA_VERSION = 1
VERDICTS = ("favourite", "reject", "neutral")
WINNERS = ("a", "b", "tie")

_IMAGE_COLUMNS = """
    {p}image TEXT NOT NULL,          -- path relative to the run folder, '/'-separated
    {p}sha256 TEXT NOT NULL,         -- of the PNG file when it was rated
    {p}seed INTEGER,
    {p}scale REAL,                   -- LoRA scale; NULL when the prompt named no LoRA
    {p}checkpoint TEXT,              -- e.g. step-000200; NULL for a final gallery image without one
    {p}negative_prompt TEXT NOT NULL,
    {p}parameters TEXT NOT NULL,     -- the whole A1111 parameters text"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    rated_at TEXT NOT NULL,          -- UTC, ISO 8601
    prompt TEXT NOT NULL,            -- without <lora:...> tags
    {_IMAGE_COLUMNS.format(p="")}
    verdict TEXT NOT NULL CHECK (verdict IN {VERDICTS})
);
CREATE INDEX IF NOT EXISTS ratings_by_image ON ratings (image, sha256, id);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    rated_at TEXT NOT NULL,
    prompt TEXT NOT NULL,            -- both images were made from it
    {_IMAGE_COLUMNS.format(p="a_")}
    {_IMAGE_COLUMNS.format(p="b_")}
    winner TEXT NOT NULL CHECK (winner IN {WINNERS})
);
PRAGMA user_version = {SCHEMA_VERSION};
"""

_CURRENT_VERDICTS = """
    SELECT r.* FROM ratings r
    JOIN (SELECT MAX(id) AS id FROM ratings GROUP BY image, sha256) newest ON r.id = newest.id
    ORDER BY r.id
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# The columns describing one image, in _IMAGE_COLUMNS' order, and their values.
_SIDE = ("image", "sha256", "seed", "scale", "checkpoint", "negative_prompt", "parameters")


def _image_values(img: ReviewImage) -> tuple:
    return (img.path, img.sha256, img.seed, img.scale, img.checkpoint, img.negative_prompt, img.parameters)


class Store:
    """The feedback database of one run. Thread-safe: every call opens its own connection."""

    def __init__(self, path: Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FinetuneError(f"no ratings in {self.path.parent} yet ({self.path.name} is missing): "
                                f"rate its images first with `finetune review {self.path.parent}`")
        with self.connect() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FinetuneError(f"{self.path} was written by a newer finetune (schema {version}, this one "
                                    f"reads {SCHEMA_VERSION}); upgrade finetune")
            if version < SCHEMA_VERSION:
                # WAL is a property of the file: set once, every later connection uses it.
                con.execute("PRAGMA journal_mode = WAL")
                con.executescript(SCHEMA)

    @contextlib.contextmanager
    def connect(self):
        # Autocommit (isolation_level=None): each INSERT is its own transaction, committed (and with
        # synchronous=FULL, fsynced) before the call returns, i.e. before the HTTP answer acknowledges it.
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous = FULL")
            yield con
        finally:
            con.close()

    def rate(self, img: ReviewImage, verdict: str) -> int:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        with self.connect() as con:
            cur = con.execute(
                f"INSERT INTO ratings (rated_at, prompt, {', '.join(_SIDE)}, verdict) VALUES ({', '.join('?' * 10)})",
                (_now(), img.prompt, *_image_values(img), verdict))
            return cur.lastrowid

    def compare(self, a: ReviewImage, b: ReviewImage, winner: str) -> int:
        if winner not in WINNERS:
            raise ValueError(f"winner {winner!r} is not one of {', '.join(WINNERS)}")
        if a.prompt != b.prompt:
            raise ValueError(f"{a.path} and {b.path} were made from different prompts; compare images of one prompt")
        if (a.path, a.sha256) == (b.path, b.sha256):
            raise ValueError(f"cannot compare {a.path} with itself")
        cols = ", ".join(f"{side}{c}" for side in ("a_", "b_") for c in _SIDE)
        with self.connect() as con:
            cur = con.execute(
                f"INSERT INTO comparisons (rated_at, prompt, {cols}, winner) VALUES ({', '.join('?' * 17)})",
                (_now(), a.prompt, *_image_values(a), *_image_values(b), winner))
            return cur.lastrowid

    def verdicts(self) -> dict[tuple[str, str], str]:
        """{(image path, sha256): current verdict} for every image rated at least once."""
        with self.connect() as con:
            return {(r["image"], r["sha256"]): r["verdict"] for r in con.execute(_CURRENT_VERDICTS)}

    def current_ratings(self) -> list[sqlite3.Row]:
        """The newest rating row of each image (favourites for training data, rejects to leave out)."""
        with self.connect() as con:
            return con.execute(_CURRENT_VERDICTS).fetchall()

    def compared(self) -> dict[frozenset, str]:
        """{frozenset of the two (path, sha256): newest winner} of every pair compared at least once."""
        with self.connect() as con:
            rows = con.execute("SELECT a_image, a_sha256, b_image, b_sha256, winner FROM comparisons ORDER BY id")
            return {frozenset({(r[0], r[1]), (r[2], r[3])}): r[4] for r in rows}


def progress(images: list[ReviewImage], verdicts: dict, compared: dict) -> dict:
    """Counts for the page's progress line, over the images on disk now."""
    keys = {(img.path, img.sha256) for img in images}
    current = [v for k, v in verdicts.items() if k in keys]
    by_prompt: dict[str, int] = {}
    for img in images:
        by_prompt[img.prompt] = by_prompt.get(img.prompt, 0) + 1
    return {
        "total": len(images),
        "rated": len(current),
        "favourites": current.count("favourite"),
        "rejects": current.count("reject"),
        "pairs_compared": sum(1 for pair in compared if pair <= keys),
        "pairs_total": sum(n * (n - 1) // 2 for n in by_prompt.values()),
    }


# ---------------------------------------------------------------- preference pairs


@dataclass
class Export:
    path: Path
    from_comparisons: int = 0
    from_verdicts: int = 0
    skipped: list[str] = field(default_factory=list)
    """One reason per rating left out (image gone or changed since it was rated)."""

    @property
    def written(self) -> int:
        return self.from_comparisons + self.from_verdicts


def _side(run: Path, row, prefix: str = "") -> dict:
    side = {c: row[prefix + c] for c in _SIDE}
    side["path"] = str(run / side["image"])
    return side


def export_pairs(run: Path, out: Path) -> Export:
    """Write the run's preference pairs as JSONL, one {"prompt", "chosen", "rejected", ...} object a line.

    Pairs come from the comparisons (newest choice per pair; ties left out) and, within each prompt, from
    every current favourite against every current reject (unless the two were compared directly). Each side
    holds the image's path (absolute), its path in the run, sha256, seed, LoRA scale, checkpoint, negative
    prompt and the whole parameters text. Ratings of an image that is gone or changed since are skipped.
    """
    if not Path(run).is_dir():
        raise FinetuneError(f"run folder {run} not found: give the outputs/<run> folder whose images you rated")
    run = Path(run).resolve()
    store = Store(run / DB_NAME, create=False)
    result = Export(Path(out))
    hashes: dict[str, str | None] = {}

    def still_there(image: str, sha: str) -> bool:
        if image not in hashes:
            path = run / image
            hashes[image] = sha256_file(path) if path.is_file() and path.resolve().is_relative_to(run) else None
        if hashes[image] == sha:
            return True
        reason = f"{image}: {'changed' if hashes[image] else 'gone'} since it was rated"
        if reason not in result.skipped:
            result.skipped.append(reason)
        return False

    lines: list[str] = []
    with store.connect() as con:
        comparisons = con.execute("SELECT * FROM comparisons ORDER BY id").fetchall()
        verdicts = con.execute(_CURRENT_VERDICTS).fetchall()
    newest: dict[frozenset, sqlite3.Row] = {}
    for row in comparisons:
        newest[frozenset({(row["a_image"], row["a_sha256"]), (row["b_image"], row["b_sha256"])})] = row
    for row in sorted(newest.values(), key=lambda r: r["id"]):
        if row["winner"] == "tie":
            continue
        if not (still_there(row["a_image"], row["a_sha256"]) and still_there(row["b_image"], row["b_sha256"])):
            continue
        win, lose = ("a_", "b_") if row["winner"] == "a" else ("b_", "a_")
        lines.append(json.dumps({"prompt": row["prompt"], "chosen": _side(run, row, win),
                                 "rejected": _side(run, row, lose), "source": "comparison",
                                 "rated_at": row["rated_at"]}))
        result.from_comparisons += 1

    by_prompt: dict[str, dict[str, list]] = {}
    for row in verdicts:
        if row["verdict"] != "neutral" and still_there(row["image"], row["sha256"]):
            by_prompt.setdefault(row["prompt"], {"favourite": [], "reject": []})[row["verdict"]].append(row)
    for prompt in sorted(by_prompt):
        for fav in by_prompt[prompt]["favourite"]:
            for rej in by_prompt[prompt]["reject"]:
                if frozenset({(fav["image"], fav["sha256"]), (rej["image"], rej["sha256"])}) in newest:
                    continue  # a direct comparison of the two says more than their separate verdicts
                lines.append(json.dumps({"prompt": prompt, "chosen": _side(run, fav), "rejected": _side(run, rej),
                                         "source": "verdicts", "rated_at": max(fav["rated_at"], rej["rated_at"])}))
                result.from_verdicts += 1

    if not lines:
        raise FinetuneError(
            f"no preference pairs in {store.path} yet: compare images in the pairwise view of `finetune review "
            f"{run}`, or mark favourites and rejects among images of the same prompt"
            + (f" ({plural(len(result.skipped), 'rating')} skipped: {result.skipped[0]})" if result.skipped else ""))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return result

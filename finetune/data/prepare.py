"""The prepare stage: a folder of photos -> datasets/<name>/ (what `finetune train` reads).

    prepare(source, out, cfg.data) -> PrepareResult

Steps, top to bottom in `prepare`: check the folders; list the photos; hash each one; reuse cached
per-photo results (keyed by source sha256 + the crop settings) and compute the rest in worker
processes; apply the checks (size, blur, face, duplicates); number the kept photos in input order;
write images/NNNN.png + NNNN.txt, dataset.json, report.html and manifest.jsonl (last: a folder with
a manifest is a prepared dataset). Files whose content would not change are left untouched, so a
re-run with the same inputs and settings changes nothing on disk. The source folder is only read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune import __version__
from finetune.data import report
from finetune.data.captions import compose, fill
from finetune.data.quality import hamming
from finetune.data.sources import IMAGE_EXTENSIONS, display, file_sha256, list_inputs, read_error
from finetune.errors import FinetuneError

SCHEMA = 1
MANIFEST = "manifest.jsonl"
CACHE = ".prepare-cache"
OUTPUT_NAME = re.compile(r"^\d{4,}\.(png|txt)$")
POOL_MIN_PHOTOS = 4
"""Fewer photos than this are analysed in this process: starting workers would cost more than it saves."""

# How each rejection kind reads in the summary line: (one, several).
KIND_WORDS = {
    "unreadable": ("unreadable", "unreadable"),
    "not an image": ("not an image", "not images"),
    "too large": ("too large", "too large"),
    "unsupported": ("unsupported", "unsupported"),
    "too small": ("too small", "too small"),
    "no face": ("without a face", "without a face"),
    "blurry": ("blurry", "blurry"),
    "duplicate": ("duplicate", "duplicates"),
    "near-duplicate": ("near-duplicate", "near-duplicates"),
}


@dataclass
class PrepareResult:
    out: Path
    kept: int
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    """(source file, reason) for every photo left out."""
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    """Files that are not photos (by extension), with why."""
    counts: dict = field(default_factory=dict)
    summary: str = ""
    report: Path | None = None
    processed: int = 0
    """Photos decoded and cropped in this run."""
    reused: int = 0
    """Photos whose cached crop was reused (unchanged file, unchanged crop settings)."""


def prepare(source: Path, out: Path, cfg, *, overwrite_captions: bool = False, progress: bool = True) -> PrepareResult:
    """Turn the photos under `source` into a training dataset in `out` (`cfg` is a DataConfig)."""
    from finetune.data.process import analysis_settings

    source, out = Path(source), Path(out)
    src = check_folders(source, out)
    listing = list_inputs(src)
    if not listing.photos:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise FinetuneError(f"no photos found in {display(source)} (searched recursively for {exts})")
    created = not out.exists()
    (out / CACHE).mkdir(parents=True, exist_ok=True)
    try:
        return _prepare(src, out, listing, cfg, analysis_settings(cfg), overwrite_captions, progress)
    except FinetuneError:
        if created:  # nothing half-written: a failed first run leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(src: Path, out: Path, listing, cfg, settings: dict, overwrite_captions: bool,
             progress: bool) -> PrepareResult:
    cache = Cache(out / CACHE, settings)
    photos = [{"index": i, "path": p, "name": display(p.relative_to(src))} for i, p in enumerate(listing.photos)]

    # 1. hash each photo; reuse what an earlier run computed for the same bytes and crop settings, and
    #    hand the rest to the workers at once (they decode while this process hashes the next files)
    n = min(cfg.workers or available_cores(), len(photos)) if len(photos) >= POOL_MIN_PHOTOS else 1
    with Workers(settings, cache, n, len(photos), progress) as workers:
        for rec in photos:
            try:
                st = os.stat(rec["path"])
                if not stat.S_ISREG(st.st_mode):
                    rec.update(kind="unreadable", reason="not a regular file")
                elif st.st_size == 0:
                    rec.update(kind="unreadable", reason="empty file (0 bytes)")
                else:
                    rec["sha"] = file_sha256(rec["path"])
            except OSError as e:
                rec.update(kind="unreadable", reason=read_error(rec["path"], e))
            if "sha" in rec and (hit := cache.get(rec["sha"])) is not None:
                rec["result"] = hit
                workers.skip(reused=True)
            elif "sha" in rec:
                workers.submit(rec)
            else:
                workers.skip()

    # 2. the checks that depend on settings outside the cache key, then duplicates
    min_side = cfg.min_side or cfg.resolution // 2
    candidates = []
    for rec in photos:
        r = rec.get("result", {})
        if "kind" in rec or "kind" in r:
            rec.setdefault("kind", r.get("kind"))
            rec.setdefault("reason", r.get("reason"))
        elif min(r["original_size"]) < min_side:
            w, h = r["original_size"]
            rec.update(kind="too small", reason=f"too small: {w}x{h}, short side under data.min_side = {min_side} px"
                       + ("" if cfg.min_side else " (half of data.resolution)"))
        elif cfg.crop == "face" and cfg.require_face and not r["faces"]:
            rec.update(kind="no face", reason="no face found, and data.require_face = true")
        elif cfg.blur_threshold and r["sharpness"] < cfg.blur_threshold:
            rec.update(kind="blurry", reason=f"blurry: sharpness {r['sharpness']:.1f} is under data.blur_threshold = "
                       f"{cfg.blur_threshold:g}")
        else:
            candidates.append(rec)
    kept = deduplicate(candidates, cfg.near_duplicate_distance)
    rejected = [rec for rec in photos if "kind" in rec]
    if not kept:
        kinds = _breakdown(rejected)
        examples = "; ".join(f"{rec['name']}: {rec['reason']}" for rec in rejected[:3])
        raise FinetuneError(f"no usable photo in {display(src)} ({kinds}): {examples}"
                            + ("; ..." if len(rejected) > 3 else ""))

    # 3. captions (users' edits survive re-runs), then the files
    previous = read_previous(out)
    base = fill(cfg.caption_template, cfg.trigger, cfg.class_word)
    model_captions = caption_with_model(kept, cache, cfg, progress) if cfg.captioner else {}
    rows, files = [], {}
    for n, rec in enumerate(kept, 1):
        r = rec["result"]
        stem = f"{n:04d}"
        generated = compose(base, model_captions.get(r["png_sha256"], ""))
        old = previous.get(rec["sha"])
        caption, edited = generated, False
        user_text = old["text"] if old and not overwrite_captions else None
        if user_text is not None and user_text.strip() != old["generated"].strip():
            caption, edited = user_text.strip(), True
        files[f"{stem}.png"] = cache.png(rec["sha"])
        files[f"{stem}.txt"] = (old["text"] if edited else caption).encode("utf-8")
        rows.append({
            "image": f"images/{stem}.png", "caption": caption, "caption_generated": generated,
            "caption_edited": edited, "source": str(rec["path"]), "source_sha256": rec["sha"],
            "sha256": r["png_sha256"], "original_size": r["original_size"], "crop_box": r["crop_box"],
            "face_box": r["face_box"], "faces": len(r["faces"]), "bucket": r["bucket"],
            "sharpness": r["sharpness"], "phash": r["phash"], "notes": r["notes"],
        })
        rec.update(stem=stem, caption=caption, edited=edited)
    write_images(out / "images", files)

    counts = count(photos, kept, rejected, listing.ignored, cfg, rows)
    report_path = out / "report.html"
    summary = summary_line(len(photos), len(kept), rejected, report_path)
    settings_used = dataclasses.asdict(cfg)
    dataset = {"schema": SCHEMA, "tool": "finetune", "version": __version__, "source": str(src),
               "settings": settings_used, "counts": counts}
    write_if_changed(out / "dataset.json", (json.dumps(dataset, indent=2) + "\n").encode())
    page = report.render(
        out.name, summary, counts, settings_used,
        kept=[{"image": f"images/{rec['stem']}.png", "source": rec["name"], "caption": rec["caption"],
               "caption_edited": rec["edited"], "thumb": rec["result"]["thumb"],
               "crop_thumb": rec["result"]["crop_thumb"], "notes": rec["result"]["notes"]} for rec in kept],
        rejected=[{"source": rec["name"], "reason": rec["reason"], "thumb": rec.get("result", {}).get("thumb")}
                  for rec in rejected],
        ignored=[(display(p.relative_to(src)), why) for p, why in listing.ignored])
    write_if_changed(report_path, page.encode("utf-8"))
    write_if_changed(out / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows).encode())
    cache.prune()
    return PrepareResult(out=out, kept=len(kept), rejected=[(rec["path"], rec["reason"]) for rec in rejected],
                         ignored=list(listing.ignored), counts=counts, summary=summary, report=report_path,
                         processed=workers.processed, reused=workers.reused)


# ---------------------------------------------------------------- folders
def check_folders(source: Path, out: Path) -> Path:
    """The source folder, absolute; refuses outputs that would write into it or into a stranger's folder."""
    if not source.exists():
        raise FinetuneError(f"source folder {display(source)} does not exist")
    if not source.is_dir():
        raise FinetuneError(f"{display(source)} is a file: give the folder that holds the photos")
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise FinetuneError(f"output {display(out)} is inside the source folder {display(source)}, which is never "
                            "written to; choose another --out (default: datasets/<name>)")
    if dst in src.parents:
        raise FinetuneError(f"output {display(out)} contains the source folder {display(source)}; choose another --out")
    if out.exists():
        if not out.is_dir():
            raise FinetuneError(f"output {display(out)} is a file; choose another --out")
        ours = (out / MANIFEST).is_file() or (out / CACHE).is_dir()
        if not ours and any(out.iterdir()):
            raise FinetuneError(f"output {display(out)} exists and is not a prepared dataset (no {MANIFEST}); "
                                "choose another --out or empty it")
    return src


# ---------------------------------------------------------------- per-photo results
class Cache:
    """Per-photo results in out/.prepare-cache: <key>.json (+ <key>.png, the crop), key = sha256(photo, settings)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder = folder
        self.settings = json.dumps(settings, sort_keys=True)
        self.used: set[str] = set()

    def key(self, sha: str) -> str:
        return hashlib.sha256(f"{sha} {self.settings}".encode()).hexdigest()[:32]

    def get(self, sha: str) -> dict | None:
        key = self.key(sha)
        try:
            result = json.loads((self.folder / f"{key}.json").read_text())
            if "kind" not in result and sha256_file(self.folder / f"{key}.png") != result["png_sha256"]:
                return None
        except (OSError, ValueError, KeyError):
            return None
        self.used.add(key)
        return result

    def put(self, sha: str, result: dict) -> dict:
        result = dict(result)
        if result.get("kind") == "unreadable":
            return result  # may pass next time (a crash, a file still being copied): not remembered
        key = self.key(sha)
        png = result.pop("png", None)
        if png is not None:
            result["png_sha256"] = hashlib.sha256(png).hexdigest()
            write_if_changed(self.folder / f"{key}.png", png)
        write_if_changed(self.folder / f"{key}.json", json.dumps(result, sort_keys=True).encode())
        self.used.add(key)
        return result

    def png(self, sha: str) -> bytes:
        return (self.folder / f"{self.key(sha)}.png").read_bytes()

    def captions(self) -> dict:
        try:
            return json.loads((self.folder / "captions.json").read_text())
        except (OSError, ValueError):
            return {}

    def save_captions(self, captions: dict) -> None:
        write_if_changed(self.folder / "captions.json", json.dumps(captions, sort_keys=True, indent=1).encode())

    def prune(self) -> None:
        """Forget photos that are gone or were computed with other settings."""
        for path in self.folder.iterdir():
            if path.suffix in (".json", ".png") and path.stem not in self.used and path.name != "captions.json":
                path.unlink()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class Workers:
    """Analyses submitted photos in worker processes (or in this one, for one worker or a few photos).

    Results land in rec["result"] (and the cache) by the end of the `with` block, whatever the order
    in which the workers finish, so the output never depends on the number of workers.
    """

    def __init__(self, settings: dict, cache: Cache, n: int, total: int, progress: bool):
        """`n` worker processes (1: analyse here); `total` photos for the progress bar."""
        from tqdm import tqdm

        self.settings, self.cache, self.n = settings, cache, n
        self.pool = None
        self.futures: dict = {}
        self.processed = self.reused = 0
        self.bar = tqdm(total=total, desc="prepare", unit="photo", disable=not progress)

    def __enter__(self):
        return self

    def skip(self, reused: bool = False) -> None:
        """A photo that needs no analysis (cached, or unreadable)."""
        self.reused += reused
        self.bar.update()

    def submit(self, rec: dict) -> None:
        from finetune.data.process import init_worker, process_photo

        self.processed += 1
        if self.n <= 1:
            import cv2

            threads = cv2.getNumThreads()
            init_worker()
            try:
                self._finish(rec, process_photo(str(rec["path"]), self.settings))
            finally:
                cv2.setNumThreads(threads)
            return
        if self.pool is None:
            self.pool = self._new_pool(self.n)
        self.futures[self.pool.submit(process_photo, str(rec["path"]), self.settings)] = rec

    def _new_pool(self, n: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from finetune.data.process import init_worker

        # Not plain fork: the caller may hold threads (torch's OpenMP pool when `train` prepares raw
        # photos, OpenCV's pool after an in-process run) and a forked child can deadlock on their locks.
        # A fork server is a fresh process that preloads only the worker module (not the caller's
        # __main__, so unguarded scripts still work) and forks cheap, clean workers from it.
        if sys.platform == "linux":
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["finetune.data.process"])
        else:
            ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker)

    def _finish(self, rec: dict, result: dict) -> None:
        if result.get("source_sha256", rec["sha"]) != rec["sha"]:  # changed while we worked: key by what was read
            rec["sha"] = result["source_sha256"]
        rec["result"] = self.cache.put(rec["sha"], result)
        self.bar.update()

    def __exit__(self, *exc) -> None:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        from finetune.data.process import process_photo

        try:
            if self.pool is None or exc[0] is not None:
                return
            crashed = []
            for fut in as_completed(self.futures):
                try:
                    self._finish(self.futures[fut], fut.result())
                except BrokenProcessPool:
                    crashed.append(self.futures[fut])
            for rec in sorted(crashed, key=lambda r: r["index"]):
                # a decoder crash takes the whole pool down: retry each photo alone to find the culprit
                with self._new_pool(1) as pool:
                    try:
                        self._finish(rec, pool.submit(process_photo, str(rec["path"]), self.settings).result())
                    except BrokenProcessPool:
                        self._finish(rec, {"kind": "unreadable", "reason": "the worker reading it crashed (a "
                                           "decoder bug, or out of memory)"})
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
            self.bar.close()


def deduplicate(candidates: list[dict], distance: int) -> list[dict]:
    """Keep one of each group of same-pixel or near-identical photos: the largest, then the first.

    Not the sharpest: JPEG artefacts raise the Laplacian's variance, so a worse copy can measure sharper.
    """
    kept: list[dict] = []
    area = lambda r: r["result"]["original_size"][0] * r["result"]["original_size"][1]  # noqa: E731
    for rec in sorted(candidates, key=lambda r: (-area(r), r["index"])):
        r = rec["result"]
        same = next((k for k in kept if k["result"]["pixels"] == r["pixels"]), None)
        if same:
            rec.update(kind="duplicate", reason=f"duplicate of {same['name']} (same pixels)")
            continue
        if distance:
            h = int(r["phash"], 16)
            near = min(((hamming(h, int(k["result"]["phash"], 16)), k["index"], k) for k in kept), default=None,
                       key=lambda t: t[:2])
            if near and near[0] <= distance:
                rec.update(kind="near-duplicate", reason=f"near-duplicate of {near[2]['name']} (perceptual hashes "
                           f"differ in {near[0]} of 64 bits; data.near_duplicate_distance = {distance})")
                continue
        kept.append(rec)
    return sorted(kept, key=lambda r: r["index"])


# ---------------------------------------------------------------- captions
def read_previous(out: Path) -> dict:
    """source sha256 -> {"text": the .txt as it is now (None if gone), "generated": what prepare wrote}."""
    previous = {}
    try:
        lines = (out / MANIFEST).read_text().splitlines()
    except OSError:
        return previous
    for line in lines:
        try:
            row = json.loads(line)
            txt = out / Path(row["image"]).with_suffix(".txt")
            text = txt.read_text(encoding="utf-8") if txt.is_file() else None
            previous[row["source_sha256"]] = {"text": text, "generated": row.get("caption_generated", row["caption"])}
        except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
            continue  # a damaged line only loses its edit-tracking
    return previous


def caption_with_model(kept: list[dict], cache: Cache, cfg, progress: bool) -> dict:
    """png sha256 -> the captioner's text, computed once per crop and model."""
    from io import BytesIO

    from PIL import Image
    from tqdm import tqdm

    from finetune.data.captions import Captioner

    known = cache.captions()
    tag = f"{cfg.captioner}|{cfg.captioner_prompt}"
    missing = [rec for rec in kept if f"{rec['result']['png_sha256']}|{tag}" not in known]
    if missing:
        model = Captioner(cfg.captioner, cfg.captioner_prompt)
        for rec in tqdm(missing, desc="captions", unit="photo", disable=not progress):
            image = Image.open(BytesIO(cache.png(rec["sha"]))).convert("RGB")
            known[f"{rec['result']['png_sha256']}|{tag}"] = model([image])[0]
    wanted = {f"{rec['result']['png_sha256']}|{tag}" for rec in kept}
    cache.save_captions({k: v for k, v in known.items() if k in wanted})
    return {k.split("|", 1)[0]: v for k, v in known.items() if k in wanted}


# ---------------------------------------------------------------- writing
def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically (temporary name + rename), and not at all when the file already holds `data`."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def write_images(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_if_changed(folder / name, data)
    for path in folder.iterdir():
        if OUTPUT_NAME.match(path.name) and path.name not in files:
            path.unlink()  # left from an earlier run with more photos


# ---------------------------------------------------------------- counts and summary
def _breakdown(rejected: list[dict]) -> str:
    by_kind: dict[str, int] = {}
    for rec in rejected:
        by_kind[rec["kind"]] = by_kind.get(rec["kind"], 0) + 1
    parts = []
    for kind in sorted(by_kind, key=lambda k: (-by_kind[k], list(KIND_WORDS).index(k) if k in KIND_WORDS else 99)):
        one, several = KIND_WORDS.get(kind, (kind, kind))
        parts.append(f"{by_kind[kind]} {one if by_kind[kind] == 1 else several}")
    return ", ".join(parts)


def summary_line(total: int, kept: int, rejected: list[dict], report_path: Path) -> str:
    why = f": {_breakdown(rejected)}" if rejected else ""
    return f"kept {kept} of {total} photos{why}; report: {display(report_path)}"


def count(photos, kept, rejected, ignored, cfg, rows) -> dict:
    counts = {"photos": len(photos), "kept": len(kept), "rejected": len(rejected), "ignored": len(ignored)}
    reasons: dict[str, int] = {}
    for rec in rejected:
        reasons[rec["kind"]] = reasons.get(rec["kind"], 0) + 1
    counts["rejected_by_reason"] = dict(sorted(reasons.items()))
    if cfg.crop == "face":
        counts["faces"] = {"found": sum(1 for r in rows if r["faces"]),
                           "several": sum(1 for r in rows if r["faces"] > 1),
                           "none (centre crop)": sum(1 for r in rows if not r["faces"])}
    counts["captions_edited"] = sum(1 for r in rows if r["caption_edited"])
    counts["buckets"] = {f"{w}x{h}": n for (w, h), n in sorted(_buckets(rows).items())}
    return counts


def _buckets(rows) -> dict:
    found: dict[tuple[int, int], int] = {}
    for row in rows:
        key = tuple(row["bucket"])
        found[key] = found.get(key, 0) + 1
    return found

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

import contextlib
import dataclasses
import hashlib
import importlib
import json
import multiprocessing.context as mp_context
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune import __version__, identity
from finetune.data import report
from finetune.data.captions import compose, fill, mentions, replace_word
from finetune.data.sources import IMAGE_EXTENSIONS, display, file_sha256, list_inputs, read_error
from finetune.data.versions import analysis_settings
from finetune.errors import FinetuneError
from finetune.hashing import sha256_file
from finetune.words import plural

SCHEMA = 1
MANIFEST = "manifest.jsonl"
CACHE = ".prepare-cache"
OUTPUT_NAME = re.compile(r"^\d{4,}\.(png|txt)$")
POOL_MIN_PHOTOS = 4
"""Fewer photos than this are analysed in this process: starting workers would cost more than it saves."""

CRASHED = "the worker reading it crashed (a decoder bug, or out of memory)"

CAPTION_SETTINGS = ("trigger", "class_word", "caption_template", "captioner", "captioner_prompt")
"""The data settings a generated caption is made from."""

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
    "not the subject": ("not the subject", "not the subject"),
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
    notices: list[str] = field(default_factory=list)
    """One-line notes for the user beside the summary (e.g. how identity went)."""


def prepare(source: Path, out: Path, cfg, *, overwrite_captions: bool = False, replace: bool = False,
            progress: bool = True) -> PrepareResult:
    """Turn the photos under `source` into a training dataset in `out` (`cfg` is a DataConfig).

    `replace`: allow replacing a dataset that was prepared from another photo folder (else refused)."""
    source, out = Path(source), Path(out)
    if cfg.require_subject:
        if cfg.crop != "face" or not cfg.identity:
            raise FinetuneError("data.require_subject = true needs data.crop = 'face' and data.identity = true "
                                f"(they are {cfg.crop!r} and {str(cfg.identity).lower()})")
        identity.require("data.require_subject = true")
    src = check_folders(source, out)
    if not replace:
        check_same_source(src, out)
    listing = list_inputs(src)
    if not listing.photos:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise FinetuneError(f"no photos found in {display(source)} (searched recursively for {exts})")
    created = not out.exists()
    (out / CACHE).mkdir(parents=True, exist_ok=True)
    cached = sum(1 for _ in (out / CACHE).glob("*.json"))
    if worker_count(cfg, len(listing.photos)) > 1 and cached < len(listing.photos):
        start_fork_server()  # some photo needs analysing: let the workers' server boot meanwhile

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
    #    hand the rest to the workers at once (they decode while this process hashes the next files).
    #    With nothing cached there is nothing to look up: the workers hash what they read. A file as
    #    large as an earlier one is hashed here, so that a byte-identical copy (a folder copied twice)
    #    is analysed once, for both.
    lookup = cache.has_results()
    same_size: dict[int, list[dict]] = {}
    with Workers(settings, cache, worker_count(cfg, len(photos)), len(photos), progress) as workers:
        for rec in photos:
            original = None
            try:
                st = os.stat(rec["path"])
                if not stat.S_ISREG(st.st_mode):
                    rec.update(kind="unreadable", reason="not a regular file")
                elif st.st_size == 0:
                    rec.update(kind="unreadable", reason="empty file (0 bytes)")
                else:
                    peers = same_size.setdefault(st.st_size, [])
                    rec["sha"] = file_sha256(rec["path"]) if lookup or peers else None
                    original = next((p for p in peers if rec["sha"] == main_sha(p)), None)
                    peers.append(rec)
            except OSError as e:
                rec.update(kind="unreadable", reason=read_error(rec["path"], e))
            if original is not None:
                rec["copy_of"] = original
                workers.skip()
            elif rec.get("sha") and (hit := cache.get(rec["sha"])) is not None:
                rec["result"] = hit
                workers.skip(reused=True)
            elif "sha" in rec:
                workers.submit(rec)
            else:
                workers.skip()
        workers.finish()
        for rec in photos:
            if "copy_of" in rec:
                rec["result"] = rec["copy_of"].get("result", {})

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
        kept = deduplicate(candidates, cfg.near_duplicate_distance, cfg.max_megapixels)
        # a group photo whose subject is not its largest face is framed again, by the warm workers
        subject, notices = identify(kept, cfg, settings, cache, workers.analyse)
    kept = [rec for rec in kept if "kind" not in rec]
    rejected = [rec for rec in photos if "kind" in rec]
    if not kept:
        kinds = _breakdown(rejected)
        examples = "; ".join(f"{rec['name']}: {rec['reason']}" for rec in rejected[:3])
        raise FinetuneError(f"no usable photo in {display(src)} ({kinds}): {examples}"
                            + ("; ..." if len(rejected) > 3 else ""))

    # 3. captions (users' edits survive re-runs, with a changed trigger word changed in them too),
    #    then the files
    previous = read_previous(out)
    old_settings = recorded(out).get("settings") or {}
    old_trigger = old_settings.get("trigger")
    retrigger = isinstance(old_trigger, str) and old_trigger.strip() and cfg.trigger.strip() \
        and not mentions(cfg.trigger, old_trigger)
    base = fill(cfg.caption_template, cfg.trigger, cfg.class_word)
    model_captions = caption_with_model(kept, cache, cfg, progress) if cfg.captioner else {}
    rows, files = [], {}
    for n, rec in enumerate(kept, 1):
        r = rec["result"]
        stem = f"{n:04d}"
        generated = compose(base, model_captions.get(r["png_sha256"], ""))
        old = previous.get(rec["sha"])
        caption, edited, text = generated, False, generated
        rec["recaptioned"] = bool(old) and old["generated"].strip() != generated.strip()
        user_text = old["text"] if old and not overwrite_captions else None
        if user_text is not None and user_text.strip() != old["generated"].strip():
            caption, edited, text = user_text.strip(), True, user_text
            if retrigger and mentions(text, old_trigger):
                # the user edited the caption, not the word: a caption still naming the old trigger would
                # teach the subject under a word that no run, model card or sample prompt uses
                text = replace_word(text, old_trigger, cfg.trigger)
                caption = text.strip()
                rec["retriggered"] = True
        files[f"{stem}.png"] = cache.png(rec.get("cache_key", rec["sha"]))
        files[f"{stem}.txt"] = text.encode("utf-8")
        rows.append({
            "image": f"images/{stem}.png", "caption": caption, "caption_generated": generated,
            "caption_edited": edited, "source": str(rec["path"]), "source_sha256": rec["sha"],
            "sha256": r["png_sha256"], "original_size": r["original_size"], "crop_box": r["crop_box"],
            "face_box": r["face_box"], "faces": len(r["faces"]), "bucket": r["bucket"],
            "sharpness": r["sharpness"], "phash": r["phash"], "notes": r["notes"],
            "subject_distance": rec.get("subject_distance"), "identity": rec.get("identity"),
        })
        notes = r["notes"] + ([rec["dedup_note"]] if rec.get("dedup_note") else []) + (
            [f"the trigger word in your edited caption was changed from {old_trigger!r} to data.trigger = "
             f"{cfg.trigger!r}"] if rec.get("retriggered") else [])
        rec.update(stem=stem, caption=caption, edited=edited, notes=notes)
    write_images(out / "images", files)

    counts = count(photos, kept, rejected, listing.ignored, cfg, rows)
    if subject:
        counts["subject"] = {"photos": subject["photos"], "someone else (flagged)": sum(1 for r in kept if r.get("flag"))}
    report_path = out / "report.html"
    also = []
    faceless = [rec for rec in kept if cfg.crop == "face" and not rec["result"]["faces"]]
    for rec in faceless:
        rec["no_face"] = True
    if faceless:  # a screenshot or a pet captioned as the person, unless the user looks: say so up front
        also.append(f"{len(faceless)} kept without a face (centre-cropped: check "
                    f"{'it' if len(faceless) == 1 else 'them'} in the report)")
    recaptioned = sum(1 for rec in kept if rec["recaptioned"] and not rec["edited"])
    changed = [f"data.{k} = {getattr(cfg, k)!r} (was {old_settings[k]!r})" for k in CAPTION_SETTINGS
               if k in old_settings and old_settings[k] != getattr(cfg, k)]
    if recaptioned and changed:  # re-running without the --set of the first run rewrites every caption: say so
        also.append(f"{plural(recaptioned, 'caption')} rewritten for {', '.join(changed)}")
    if retriggered := sum(1 for rec in kept if rec.get("retriggered")):
        also.append(f"{plural(retriggered, 'edited caption')} now say{'s' if retriggered == 1 else ''} "
                    f"{cfg.trigger!r} instead of {old_trigger!r}")
    summary = summary_line(len(photos), len(kept), rejected, report_path, also)
    settings_used = dataclasses.asdict(cfg)
    dataset = {"schema": SCHEMA, "tool": "finetune", "version": __version__, "source": str(src),
               "settings": settings_used, "counts": counts, "subject": subject}
    write_if_changed(out / "dataset.json", (json.dumps(dataset, indent=2) + "\n").encode())
    page = report.render(
        out.name, summary, counts, settings_used,
        kept=[{"image": f"images/{rec['stem']}.png", "source": rec["name"], "caption": rec["caption"],
               "caption_edited": rec["edited"], "thumb": rec["result"]["thumb"],
               "crop_thumb": rec["result"]["crop_thumb"], "notes": rec["notes"],
               "distance": rec.get("subject_distance"), "flag": rec.get("flag"),
               "no_face": rec.get("no_face", False)} for rec in kept],
        rejected=[{"source": rec["name"], "reason": rec["reason"], "thumb": rec.get("result", {}).get("thumb")}
                  for rec in rejected],
        ignored=[(display(p.relative_to(src)), why) for p, why in listing.ignored], notices=notices)
    write_if_changed(report_path, page.encode("utf-8"))
    write_if_changed(out / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows).encode())
    cache.prune()
    return PrepareResult(out=out, kept=len(kept), rejected=[(rec["path"], rec["reason"]) for rec in rejected],
                         ignored=list(listing.ignored), counts=counts, summary=summary, report=report_path,
                         processed=workers.processed, reused=workers.reused, notices=notices)


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


class SourceMismatch(FinetuneError):
    """`out` holds a dataset prepared from another photo folder than `source`."""

    def __init__(self, out: Path, previous: str | None, source: Path):
        self.out, self.previous, self.source = out, previous, source
        self.free = free_name(out)
        self.was = f"prepared from {previous}" if previous else "prepared from an unknown folder (no dataset.json)"
        where = (f"--name {self.free.name}" if self.free.parent.resolve() == Path("datasets").resolve()
                 else f"--out {display(self.free)}")
        super().__init__(f"{display(out)} holds a dataset {self.was}, not from {display(source)}: prepare these "
                         f"photos under another name ({where}), or add --replace to replace that dataset")


def recorded(out: Path) -> dict:
    """What an earlier run wrote to out/dataset.json ({} if nothing readable)."""
    try:
        data = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_source(out: Path) -> str | None:
    """The photo folder a prepared dataset was made from, as its dataset.json records it."""
    source = recorded(out).get("source")
    return source if isinstance(source, str) else None


def check_same_source(src: Path, out: Path) -> None:
    """Refuse to replace a dataset prepared from other photos: its images, the captions edited there
    and the reproducibility of every run trained on it would be lost. Re-preparing from the same
    folder is the normal update; after moving the folder, --replace (edited captions follow each
    photo's bytes, so they survive the move)."""
    if not (out / MANIFEST).is_file():
        return  # nothing prepared yet (or only the cache of an interrupted first run)
    previous = recorded_source(out)
    if previous is None or Path(previous).resolve() != src:
        raise SourceMismatch(out, previous, src)


def free_name(out: Path) -> Path:
    """`out` with the first suffix -2, -3, ... that names no existing folder."""
    n = 2
    while (candidate := out.with_name(f"{out.name}-{n}")).exists():
        n += 1
    return candidate


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

    def has_results(self) -> bool:
        """Whether an earlier run left any per-photo result here (else there is nothing to look up)."""
        return any(p.name != "captions.json" for p in self.folder.glob("*.json"))

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


WORKER = "finetune.data.process:process_photo"
"""What a worker runs on each photo, named rather than imported: workers import it themselves (their
fork server preloads it), and this process never loads OpenCV, NumPy or Pillow's imaging core."""


def run_worker(target: str, path: str, settings: dict) -> dict:
    """In a worker: `target` ("module:function") applied to one photo."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(path, settings)


def worker_count(cfg, photos: int) -> int:
    """Worker processes for `photos` photos: data.workers, or one per core; none (1) for a handful."""
    return min(cfg.workers or available_cores(), photos) if photos >= POOL_MIN_PHOTOS else 1


def worker_context():
    """Not plain fork: the caller may hold threads (torch's OpenMP pool when `train` prepares raw
    photos, OpenCV's pool after an in-process run) and a forked child can deadlock on their locks.
    A fork server is a fresh process that preloads only the worker module and forks cheap, clean
    workers from it (elsewhere: spawn). Either would also run the caller's script again in every worker
    (multiprocessing's "import __main__"): a script that calls `prepare` outside an
    `if __name__ == "__main__":` block would call it again there and every worker would die. The
    workers run only finetune's code, so they start without the caller's __main__ (WorkerProcess)."""
    ctx = WorkerContext()
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["finetune.data.prepare", WORKER.split(":")[0]])
    return ctx


_Start = mp_context.ForkServerProcess if sys.platform == "linux" else mp_context.SpawnProcess


class WorkerProcess(_Start):
    """A worker process told nothing about the caller's __main__ (see `worker_context`)."""

    @staticmethod
    def _Popen(process_obj):
        with _caller_main_hidden():  # what the new process is to import is read while it starts
            return _Start._Popen(process_obj)


class WorkerContext(mp_context.ForkServerContext if sys.platform == "linux" else mp_context.SpawnContext):
    Process = WorkerProcess


@contextlib.contextmanager
def _caller_main_hidden():
    """The caller's __main__ without what tells multiprocessing to import it in a new process."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__dict__["__spec__"] = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def start_fork_server() -> None:
    """Boot the workers' fork server now, in the background (it takes ~0.25 s to import the worker
    module), so that it is ready by the time the first photo has been hashed."""
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class Workers:
    """Analyses submitted photos in `n` worker processes (or in this one, for n = 1).

    Workers isolate crashes: a decoder that segfaults on one file loses that photo, not the run. A
    feeder thread starts the pool on the first photo to analyse (the fork server takes a third of a
    second to start, a large share of a 30-photo run) while this process goes on hashing the rest,
    and keeps each worker AHEAD photos ahead. Results land in rec["result"] (and the cache) by the end
    of the `with` block, whatever the order in which they finish, so the output never depends on the
    number of workers.
    """

    AHEAD = 2
    """Photos in flight per worker process: one being analysed, one waiting in its pipe."""

    def __init__(self, settings: dict, cache: Cache, n: int, total: int, progress: bool):
        """`n` worker processes (1: analyse here); `total` photos for the progress bar."""
        import queue
        import threading
        from collections import deque

        from tqdm import tqdm

        self.settings, self.cache, self.n = settings, cache, n
        self.pools: list = []
        self.futures: dict = {}
        self.processed = self.reused = 0
        self.bar = tqdm(total=total, desc="prepare", unit="photo", disable=not progress)
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.feeder: threading.Thread | None = None
        self.feed_error: BaseException | None = None
        self.finished = False
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        """Futures as they complete (their callbacks put them here), for this thread to collect."""

    def __enter__(self):
        return self

    def skip(self, reused: bool = False) -> None:
        """A photo that needs no analysis (cached, or unreadable)."""
        self.reused += reused
        self.bar.update()

    def submit(self, rec: dict) -> None:
        import threading

        self.processed += 1
        if self.n <= 1:
            self._analyse_here(rec)
            return
        with self.cond:
            self.queue.append(rec)
            self.cond.notify()
        if self.feeder is None:
            self.feeder = threading.Thread(target=self._feed, name="prepare-feeder", daemon=True)
            self.feeder.start()

    def _take(self) -> dict | None:
        """The next queued photo, waiting for one; None once the queue is empty and closed."""
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            return self.queue.popleft() if self.queue else None

    def _feed(self) -> None:
        """Feeder thread: start a pool and hand it photos, AHEAD per worker. A worker crash breaks the
        pool: the photos then in flight are retried one by one at the end, the rest go to a fresh pool."""
        import threading
        from concurrent.futures.process import BrokenProcessPool

        rec = None
        try:
            while True:
                pool = self._new_pool(self.n)
                self.pools.append(pool)
                slots = threading.Semaphore(self.AHEAD * self.n)
                while True:
                    slots.acquire()
                    if (rec := self._take()) is None:
                        return
                    try:
                        future = pool.submit(run_worker, WORKER, str(rec["path"]), self.settings)
                    except BrokenProcessPool:
                        break
                    with self.cond:
                        self.futures[future] = rec  # before the callbacks: one may run at once
                    future.add_done_callback(lambda _, slots=slots: slots.release())
                    future.add_done_callback(self.done.put)
                    rec = None
                with self.cond:
                    self.queue.appendleft(rec)
                rec = None
        except BaseException as e:  # e.g. no process could be started: raised in the caller's thread
            self.feed_error = e

    def _analyse_here(self, rec: dict) -> None:
        self._finish(rec, self._here(str(rec["path"]), self.settings))

    @staticmethod
    def _here(path: str, settings: dict) -> dict:
        import cv2

        threads = cv2.getNumThreads()  # the worker function sets 1: give the caller its own back
        try:
            return run_worker(WORKER, path, settings)
        finally:
            cv2.setNumThreads(threads)

    def _new_pool(self, n: int):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(n, mp_context=worker_context())

    def _finish(self, rec: dict, result: dict) -> None:
        # keyed by what the worker read: the file may have changed since this process hashed it (or it
        # was not hashed here, with nothing cached); a file the worker could not read has no key
        rec["sha"] = result.get("source_sha256", rec["sha"])
        rec["result"] = self.cache.put(rec["sha"], result) if rec["sha"] else result
        self.bar.update()

    def finish(self) -> None:
        """Wait until every submitted photo is analysed (results in rec["result"] and the cache). The
        pool stays up, warm, for `analyse`, until the `with` block ends."""
        import queue
        from concurrent.futures.process import BrokenProcessPool

        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.finished:
            return
        self.finished = True
        if self.feeder is None:  # nothing went to a pool
            return
        crashed, collected = [], 0
        while self.feeder.is_alive() or collected < len(self.futures):
            try:
                future = self.done.get(timeout=0.05)
            except queue.Empty:
                continue
            collected += 1
            try:
                self._finish(self.futures[future], future.result())
            except BrokenProcessPool:
                crashed.append(self.futures[future])
        if self.feed_error is not None:
            raise self.feed_error
        for rec in sorted(crashed, key=lambda r: r["index"]):
            # retried alone, each in a pool of its own, to tell the culprit from its bystanders
            with self._new_pool(1) as pool:
                try:
                    self._finish(rec, pool.submit(run_worker, WORKER, str(rec["path"]), self.settings).result())
                except BrokenProcessPool:
                    self._finish(rec, {"kind": "unreadable", "reason": CRASHED})

    def analyse(self, jobs: list[tuple[str, dict]]) -> list[dict]:
        """More analyses after `finish`, each (path, its own settings): prepare's second framings of group
        photos. They go to the pool when one is up (its workers have their models loaded already, and
        they run side by side), else they run in this process."""
        from concurrent.futures.process import BrokenProcessPool

        pool = self.pools[-1] if self.pools else None
        futures = []
        for path, settings in jobs:
            try:
                futures.append(pool.submit(run_worker, WORKER, path, settings) if pool else None)
            except BrokenProcessPool:
                pool = None
                futures.append(None)
        results = []
        for (path, settings), future in zip(jobs, futures):
            try:
                results.append(future.result() if future else self._here(path, settings))
            except BrokenProcessPool:
                results.append({"kind": "unreadable", "reason": CRASHED})
        return results

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.finish()
                return
            with self.cond:
                self.closed = True
                self.queue.clear()
                self.cond.notify_all()
            if self.feeder is not None:
                for pool in self.pools:  # cancel what is queued; the feeder then finds the queue closed
                    pool.shutdown(wait=False, cancel_futures=True)
                self.feeder.join()
        finally:
            for pool in self.pools:
                pool.shutdown(cancel_futures=True)
            self.bar.close()


DETAIL_SIDE = 1024
"""Near-duplicates are compared for detail at this size (long side): enough to tell a 12 MP photo from
a copy of it that went through 640 px, cheap enough to decode for the few photos that have a twin."""
FULL_DETAIL = 0.8
"""A photo with at least this share of the best detail measured in its group counts as full detail."""


def deduplicate(candidates: list[dict], distance: int, max_megapixels: float) -> list[dict]:
    """Keep the best photo of each group of copies and near-copies; each one left out names the photo
    kept and why that one, and the kept photo's notes say what it was preferred to.

    Byte-identical files (same sha256, known from reading them) are copies: the first is kept, and
    nothing is decoded. The others are visited best first, each left out if it matches a photo kept
    before it: the same pixels (only photos sharing size and perceptual hash are decoded again to
    compare), or perceptual hashes within `distance` bits. Best: of the photos that have a near twin,
    those with full detail at DETAIL_SIDE px (a 640 px photo upscaled to 12 MP has the pixels but not
    the detail), then the largest, then the first. Not simply the sharpest: JPEG artefacts raise the
    Laplacian's variance too, so a worse copy of the same size can measure a little sharper.
    """
    first: dict[str, dict] = {}
    unique = []
    for rec in sorted(candidates, key=lambda r: r["index"]):
        same = first.setdefault(rec["sha"], rec) if rec.get("sha") else rec
        if same is rec:
            unique.append(rec)
        else:
            rec.update(kind="duplicate", reason=f"duplicate of {same['name']} (the same file: identical bytes)")
    hashes = [int(rec["result"]["phash"], 16) for rec in unique]
    twins = [[j for j, h in enumerate(hashes) if j != i and hamming(hashes[i], h) <= distance] for i in range(len(unique))]
    detail = {i: measure_detail(unique[i]["path"], max_megapixels) for i, t in enumerate(twins) if t}
    for i, rec in enumerate(unique):
        rec["detail"] = detail.get(i)
        rec["full_detail"] = not twins[i] or detail[i] >= FULL_DETAIL * max(detail[j] for j in [i, *twins[i]])

    kept: list[dict] = []
    for rec in sorted(unique, key=lambda r: (not r["full_detail"], -_area(r), r["index"])):
        r = rec["result"]
        same = next((k for k in kept if k["result"]["phash"] == r["phash"]
                     and k["result"]["original_size"] == r["original_size"]
                     and same_pixels(k["path"], rec["path"], max_megapixels)), None)
        if same:
            rec.update(kind="duplicate", reason=f"duplicate of {same['name']} (same pixels)")
            same.setdefault("preferred_to", []).append(rec)
            continue
        if distance:
            h = int(r["phash"], 16)
            near = min(((hamming(h, int(k["result"]["phash"], 16)), k["index"], k) for k in kept), default=None,
                       key=lambda t: t[:2])
            if near and near[0] <= distance:
                k = near[2]
                rec.update(kind="near-duplicate", reason=f"near-duplicate of {k['name']} (perceptual hashes differ in "
                           f"{near[0]} of 64 bits; data.near_duplicate_distance = {distance}); kept "
                           f"{k['name']}: {_preferred(k, rec)}")
                k.setdefault("preferred_to", []).append(rec)
                continue
        kept.append(rec)
    for k in kept:
        if k.get("preferred_to"):
            k["dedup_note"] = "kept as the best of its near-identical photos: " + "; ".join(
                f"over {x['name']}, {_preferred(k, x)}" for x in k["preferred_to"])
    return sorted(kept, key=lambda r: r["index"])


def _area(rec: dict) -> int:
    w, h = rec["result"]["original_size"]
    return w * h


def _preferred(k: dict, rec: dict) -> str:
    """Why `k` was kept rather than its near-duplicate `rec`, in words."""
    (w, h), (ow, oh) = k["result"]["original_size"], rec["result"]["original_size"]
    why = [f"larger ({w}x{h} vs {ow}x{oh})"] if w * h > ow * oh else []
    if k["full_detail"] and not rec["full_detail"]:
        why.append(f"more detail (sharpness {k['detail']:.0f} vs {rec['detail']:.0f} at {DETAIL_SIDE} px: the other "
                   "looks upscaled or blurred)")
    return " and ".join(why) or "the same size and detail, and first in input order"


def measure_detail(path: Path, max_megapixels: float) -> float:
    """Sharpness of the whole photo fitted into DETAIL_SIDE px (0 if it cannot be read now)."""
    from finetune.data.images import Rejected, decode
    from finetune.data.quality import sharpness
    from finetune.data.sources import read_source

    try:
        image = decode(read_source(path), max_megapixels=max_megapixels, target_short=DETAIL_SIDE).image
    except (OSError, Rejected):
        return 0.0
    return sharpness(image, side=DETAIL_SIDE)


def main_sha(rec: dict) -> str | None:
    """The photo's sha256 as read by this process (once; None if it cannot be read now)."""
    if rec.get("sha") is None and "main_sha" not in rec:
        try:
            rec["main_sha"] = file_sha256(rec["path"])
        except OSError:
            rec["main_sha"] = None
    return rec.get("sha") or rec.get("main_sha")


def hamming(a: int, b: int) -> int:
    """How many bits differ between two perceptual hashes."""
    return (a ^ b).bit_count()


def same_pixels(a: Path, b: Path, max_megapixels: float) -> bool:
    """Whether two photos decode to identical upright RGB pixels at full size."""
    from finetune.data.images import Rejected, decode
    from finetune.data.sources import read_source

    try:
        first, second = (decode(read_source(p), max_megapixels=max_megapixels).image for p in (a, b))
    except (OSError, Rejected):
        return False
    return first.size == second.size and first.tobytes() == second.tobytes()


# ---------------------------------------------------------------- who the subject is
def identify(kept: list[dict], cfg, settings: dict, cache: Cache, analyse) -> tuple[dict | None, list[str]]:
    """Find the subject among the kept photos' faces (finetune.identity), frame it in group photos
    (`analyse`: see `recrop`), and flag (or, with data.require_subject, reject) photos whose face is
    someone else's.

    Sets rec["subject_distance"], rec["identity"] (the chosen face's vector) and rec["flag"] or
    rec["kind"]/["reason"]. Returns the subject for dataset.json (None if unknown) and notices."""
    if cfg.crop != "face":
        return None, []
    if not cfg.identity:
        return None, ["identity: off (data.identity = false): strangers are not flagged"]
    if not settings.get("identity"):
        return None, [f"identity: not checked (the face identity models are not installed: {identity.INSTALL})"]
    faces = [rec["result"].get("embeddings") or [] for rec in kept]
    with_face = sum(1 for f in faces if f)
    found = identity.find_subject(faces) if with_face >= 2 else None
    if found is None:
        why = "no face is shared by two photos" if with_face >= 2 else f"a face in only {with_face} of {plural(len(kept), 'photo')}"
        return None, [f"identity: skipped, no subject found ({why}; identity needs one person's face in several photos)"]
    others, flagged, reframe = found["photos"], 0, []
    for rec, vectors, j, d in zip(kept, faces, found["choice"], found["distance"]):
        if j is None:
            continue
        rec["subject_distance"], rec["identity"] = d, vectors[j]
        if d >= identity.SAME_PERSON:
            flagged += 1
            text = (f"not the same person as the other {others} photos (distance {d:.2f} to the subject; the same "
                    f"person is under {identity.SAME_PERSON})")
            if cfg.require_subject:
                rec.update(kind="not the subject", reason=f"{text}; data.require_subject = true")
            else:
                rec["flag"] = text
        elif j != rec["result"].get("main_face", 0):
            reframe.append((rec, j))
    recrop(reframe, settings, cache, analyse)
    notice = f"identity: the subject is in {others} of {len(kept)} photos"
    if flagged:
        notice += (f"; {flagged} rejected as someone else (data.require_subject)" if cfg.require_subject else
                   f"; {flagged} look like someone else (see the report; data.require_subject = true rejects them)")
    subject = {"embedding": identity.rounded(found["embedding"]), "photos": others,
               "same_person_under": identity.SAME_PERSON}
    return subject, [notice]


def recrop(photos: list[tuple[dict, int]], settings: dict, cache: Cache, analyse) -> None:
    """Each (photo, face number) framed on that face (the subject's, in a group photo), cached: the
    photo's result is replaced. `analyse` runs process_photo on (path, settings) pairs (Workers.analyse)."""
    todo = []
    for rec, face in photos:
        key = f"{rec['sha']}#face{face}"
        if (hit := cache.get(key)) is not None:
            rec["result"], rec["cache_key"] = hit, key
        else:
            todo.append((rec, face, key))
    fresh = analyse([(str(rec["path"]), dict(settings, main_face=face, embeddings=rec["result"].get("embeddings")))
                     for rec, face, _ in todo])
    for (rec, _, key), result in zip(todo, fresh):
        if "kind" in result or result["source_sha256"] != rec["sha"]:
            continue  # changed or gone since: keep the first framing
        rec["result"], rec["cache_key"] = cache.put(key, result), key


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
            image = Image.open(BytesIO(cache.png(rec.get("cache_key", rec["sha"])))).convert("RGB")
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


def summary_line(total: int, kept: int, rejected: list[dict], report_path: Path, also: list[str] = ()) -> str:
    """`also`: what else the user should know at a glance, each a short clause."""
    why = f": {_breakdown(rejected)}" if rejected else ""
    return (f"kept {kept} of {plural(total, 'photo')}{why}; {''.join(a + '; ' for a in also)}"
            f"report: {display(report_path)}")


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

"""Speed of `finetune prepare` on 12 MP phone-sized JPEGs, side by side with a bare Pillow loop.

Generates 4000x3000 JPEGs from the bundled example photos (each framed differently, with sensor-like
grain so they compress like real photos), then times in one run:
  - the whole command (`finetune prepare DIR --out ...` in a fresh process, empty output folder),
    `--repeat` times (default 3; the median is reported, every run is listed: a shared machine is noisy);
  - the whole command on twice as many photos (the same ones and as many others), side by side with
    the first: N / (t(2N) - t(N)) is the rate of the photos themselves, start-up and the serial
    end (Python, imports, the workers' models, subject, report) left out, as a per-step time is read
    from two runs of different lengths. The target is met when both rates are;
  - a bare Pillow loop over the same files: decode + resize to the training resolution, one process;
  - the same re-run of the command (nothing to do: every photo cached);
  - the whole command with data.identity = false (no identity vectors: dlib's face descriptor costs
    ~80 ms of CPU a photo, most of what the command spends when finetune[identity] is installed);
  - with --copies, the whole command on a folder holding the photos twice (a byte-identical copy of
    each in a subfolder, as copying a folder into itself leaves it): photos/s over all files, which
    should be at least the plain folder's (copies are known by their hash, not decoded again);
  - where the CPU goes, in this process, one photo at a time (CPU time of this thread, so other work
    on a shared machine barely moves it): the decode as prepare does it, face finding, the identity
    descriptor by dlib's own code and by finetune.face_resnet (what prepare uses), and a photo's whole
    analysis; then the rate that CPU time allows on this machine's cores.
CPU of the whole command is its process tree's own (this script adopts the workers' fork server as a
child subreaper, so their CPU time is counted when they exit), not the machine's.
Target: >= 20 photos/s on a 2-core machine: the rate of the photos themselves, and the whole command's
on N photos.

Run: .venv/bin/python bench/prepare.py [--photos 36] [--repeat 3] [--keep DIR] [--copies]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "datasets" / "example-photos"
SIZE = (4000, 3000)
RESOLUTION = 512


def make_photos(folder: Path, count: int) -> list[Path]:
    """`count` distinct 12 MP JPEGs: each example photo zoomed, shifted and mirrored differently."""
    sources = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sorted(EXAMPLES.glob("IMG_*"))]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        variant = i // len(sources)
        if variant % 2:
            src = ImageOps.mirror(src)
        zoom = 1.0 + 0.5 * (variant % 3)  # the subject fills the frame, or less of it
        w, h = src.size
        cw, ch = int(w / zoom), int(h / zoom)
        left = int((w - cw) * ((variant * 0.37) % 1))
        top = int((h - ch) * ((variant * 0.61) % 1) * 0.3)
        subject = src.crop((left, top, left + cw, top + ch))
        # a 4:3 frame: the subject on a blurred, enlarged copy of itself (as IMG_0006 does)
        canvas = subject.resize((SIZE[0] // 8, SIZE[1] // 8)).filter(ImageFilter.GaussianBlur(6)).resize(SIZE)
        scale = SIZE[1] / subject.height
        fg = subject.resize((int(subject.width * scale), SIZE[1]), Image.Resampling.BICUBIC)
        canvas.paste(fg, ((SIZE[0] - fg.width) // 2 + int((variant - 2) * 150), 0))
        grain = rng.normal(0, 3.0, (SIZE[1], SIZE[0], 1)).astype(np.float32)
        pixels = np.clip(np.asarray(canvas, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        path = folder / f"IMG_{i + 1:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def bare_pillow(paths: list[Path], draft: bool) -> tuple[float, float]:
    """Seconds (wall, CPU) for a plain loop: open, decode (reduced with draft when asked), centre square -> 512 px."""
    for path in paths:
        path.read_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with Image.open(path) as im:
            if draft:
                im.draft("RGB", (RESOLUTION, RESOLUTION))
            im = im.convert("RGB")
            side = min(im.size)
            box = ((im.width - side) // 2, (im.height - side) // 2, (im.width + side) // 2, (im.height + side) // 2)
            im.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS, box=box)
    return time.perf_counter() - start, time.process_time() - cpu


def whole_command(photos: Path, out: Path, *extra: str) -> tuple[float, float, str]:
    """Seconds (wall, CPU of the command and its workers) for `finetune prepare` in a fresh process, imports
    included, and its summary line."""
    cmd = [sys.executable, "-m", "finetune", "prepare", str(photos), "--out", str(out), *extra]
    # into the page cache: this machine's kernel evicts idle pages within seconds
    for path in (p for p in photos.rglob("*") if p.is_file()):
        path.read_bytes()
    before = tree_cpu_seconds()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    cpu = tree_cpu_seconds(reap=True) - before
    if done.returncode:
        sys.exit(f"prepare failed:\n{done.stderr}")
    return seconds, cpu, done.stdout.strip().splitlines()[-1]


SUBREAPER = False


def adopt_orphans() -> bool:
    """Become the child subreaper (Linux): the workers' fork server, which the command leaves running
    when it exits, is then re-parented to this process, and its CPU (with its workers') is counted
    in RUSAGE_CHILDREN once reaped."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def tree_cpu_seconds(reap: bool = False) -> float:
    """CPU seconds of finished children (subreaper) or, without one, of the whole machine (exact only
    on an idle machine)."""
    if not SUBREAPER:
        return machine_busy_seconds()
    deadline = time.perf_counter() + 10
    while reap and time.perf_counter() < deadline:  # the fork server exits when the command's pipe closes
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.01)
        except ChildProcessError:
            break
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes have spent (user, nice, system, irq, softirq, steal), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def floors(paths: list[Path]) -> list[tuple[str, float, int]]:
    """(what, CPU seconds of this thread, count) for the parts of one photo's analysis, one process."""
    import cv2

    sys.path.insert(0, str(REPO))
    from finetune import identity
    from finetune.config import DataConfig
    from finetune.data.images import decode
    from finetune.data.process import decode_short, find_faces, process_photo, shrink
    from finetune.data.versions import analysis_settings

    cv2.setNumThreads(1)  # as in a worker
    settings = analysis_settings(DataConfig(resolution=RESOLUTION))
    datas = [p.read_bytes() for p in paths]
    rows = []

    def timed(what, fn, items):
        fn(items[0])  # models loaded, caches warm
        start = time.thread_time()
        out = [fn(item) for item in items]
        rows.append((what, time.thread_time() - start, len(items)))
        return out

    decoded = timed("decode, reduced (draft) as prepare does", lambda d: decode(
        d, max_megapixels=150, target_short=lambda size: decode_short(size, RESOLUTION, "face")), datas)
    smalls = [shrink(dec.image, 320) for dec in decoded]
    found = timed("face finding (Haar; HOG, turned photos if none)", lambda small: find_faces(small)[0], smalls)
    if identity.available():
        import dlib

        chips = []
        for dec, small, faces in zip(decoded, smalls, found):
            if faces:
                k = dec.image.width / small.width
                pixels = np.asarray(dec.image)
                box = tuple(v * k for v in faces[0])
                chips.append(dlib.get_face_chip(pixels, identity.landmarks(pixels, box), size=identity.CHIP,
                                                padding=0.25))
        theirs = dlib.face_recognition_model_v1(identity._model_file("dlib_face_recognition_resnet_model_v1.dat"))
        timed("descriptor, dlib's compute_face_descriptor (a face)", theirs.compute_face_descriptor, chips)
        timed("descriptor, finetune.face_resnet (a face; prepare's)", identity.descriptor, chips)
    timed("a photo's whole analysis (process_photo)", lambda p: process_photo(str(p), settings), paths)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=36, help="how many 12 MP JPEGs to generate")
    ap.add_argument("--repeat", type=int, default=3, help="fresh runs of the whole command (median reported)")
    ap.add_argument("--keep", type=Path, help="generate into (and keep) this folder instead of a temporary one")
    ap.add_argument("--copies", action="store_true", help="also time a folder holding every photo twice")
    args = ap.parse_args()
    global SUBREAPER
    SUBREAPER = adopt_orphans()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    every = args.keep or tmp / "generated"  # 2N photos; the first N are the main folder
    every.mkdir(parents=True, exist_ok=True)
    paths = sorted(every.glob("IMG_*.jpg"))
    if len(paths) != 2 * args.photos:
        for p in paths:
            p.unlink()
        print(f"generating {2 * args.photos} photos of {SIZE[0]}x{SIZE[1]} in {every} ...", flush=True)
        paths = make_photos(every, 2 * args.photos)
    photos, double = tmp / "photos", tmp / "double"
    for folder, some in ((photos, paths[:args.photos]), (double, paths)):
        folder.mkdir()
        for p in some:
            shutil.copyfile(p, folder / p.name)
    paths = sorted(photos.glob("IMG_*.jpg"))
    n = len(paths)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{n} JPEGs, {SIZE[0] * SIZE[1] / 1e6:.0f} MP each, {mb / n:.1f} MB average; {cores} cores")
    try:  # each timing reads the files first, so no side pays for the disk
        bare, bare_cpu = bare_pillow(paths, draft=False)
        bare_draft, bare_draft_cpu = bare_pillow(paths, draft=True)
        runs, doubles = [], []
        for i in range(args.repeat):  # in turns: a change of load hits both alike
            runs.append(whole_command(photos, tmp / f"dataset-{i}"))
            doubles.append(whole_command(double, tmp / f"dataset-double-{i}"))
        cold, cold_cpu, _ = sorted(runs)[len(runs) // 2]
        twice_n, twice_n_cpu, twice_summary = sorted(doubles)[len(doubles) // 2]
        marginal = twice_n - cold
        warm, warm_cpu, _ = whole_command(photos, tmp / "dataset-0")
        # the identity vectors (finetune[identity], dlib's descriptor) are most of a photo's CPU time
        no_id, no_id_cpu, _ = whole_command(photos, tmp / "dataset-no-identity", "--set", "data.identity=false")
        if args.copies:
            twice = tmp / "twice"
            shutil.copytree(photos, twice / "photos")
            shutil.copytree(photos, twice / "photos" / "copy")
            copies = [whole_command(twice / "photos", tmp / f"dataset-twice-{i}") for i in range(args.repeat)]
            doubled, doubled_cpu, doubled_summary = sorted(copies)[len(copies) // 2]
        parts = floors(paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU column: {'the command and its workers (subreaper)' if SUBREAPER else 'the whole machine'}")
    rows = [(f"finetune prepare, whole command, fresh output{' (median)' if len(runs) > 1 else ''}", cold, cold_cpu),
            (f"N more photos: {2 * n} photos' command - {n} photos' (median)", marginal, twice_n_cpu - cold_cpu),
            ("bare Pillow decode + resize, 1 process", bare, bare_cpu),
            ("bare Pillow draft() decode + resize, 1 process", bare_draft, bare_draft_cpu),
            ("finetune prepare re-run (all cached: no-op)", warm, warm_cpu),
            ("finetune prepare, fresh, data.identity = false", no_id, no_id_cpu)]
    print(f"{'':56s} {'photos/s':>9s} {'wall s':>7s} {'CPU ms/photo':>13s}")
    for name, wall, cpu in rows:
        print(f"{name:56s} {n / wall:9.1f} {wall:7.2f} {1000 * cpu / n:13.0f}")
    if args.copies:
        print(f"{'finetune prepare, the folder copied twice (files/s)':56s} {2 * n / doubled:9.1f} {doubled:7.2f} "
              f"{1000 * doubled_cpu / (2 * n):13.0f}")
    if len(runs) > 1:
        print(f"whole command, each run: {', '.join(f'{n / wall:.1f}' for wall, _, _ in runs)} photos/s")
    print(f"{2 * n} photos, each run: {', '.join(f'{wall:.2f}' for wall, _, _ in doubles)} s; {twice_summary}")
    if args.copies:
        print(f"folder copied twice, each run: {', '.join(f'{2 * n / wall:.1f}' for wall, _, _ in copies)} files/s; "
              f"{doubled_summary}")
        print(f"ratio copied-twice files/s / plain photos/s: {2 * n / doubled / (n / cold):.2f}x")
    print(f"ratio prepare / bare decode+resize: {bare / cold:.2f}x wall, {bare_cpu / cold_cpu:.2f}x CPU; "
          f"prepare / bare draft+resize: {bare_draft / cold:.2f}x wall")
    print(f"ratio identity on / off: {no_id / cold:.2f}x wall, {cold_cpu / no_id_cpu:.2f}x CPU")
    print(f"{'where one photo goes, one process (thread CPU)':56s} {'ms':>9s}")
    for what, cpu, count in parts:
        print(f"  {what:54s} {1000 * cpu / count:9.1f}")
    whole = parts[-1][1] / parts[-1][2]
    print(f"CPU a photo allows on {cores} cores, analysis only: {cores / whole:.1f} photos/s; whole command's CPU "
          f"allows {cores / (cold_cpu / n):.1f} photos/s (wall above: other work on the machine takes cores)")
    if SUBREAPER:
        print(f"the command's CPU beyond {n} analyses (start, imports, workers' models, subject, report): "
              f"{cold_cpu - n * whole:.2f} s")
    rates = {"the photos themselves": n / marginal, f"the whole command on {n}": n / cold}
    print("target >= 20 photos/s: " + "; ".join(f"{what} {rate:.1f} ({'met' if rate >= 20 else 'NOT met'})"
                                                for what, rate in rates.items())
          + f"; load average during the run {load:.1f} on {cores} cores (other work on the machine slows every row alike)")

if __name__ == "__main__":
    main()

"""The images a run offers for review: every PNG under samples/ and gallery/, with the settings that made it.

The settings come from each PNG's AUTOMATIC1111 `parameters` text chunk (written by
`finetune.provenance.save_generated_png`), so review never needs the model or the config that made them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from finetune import runs
from finetune.hashing import sha256_file
from finetune.provenance import read_provenance
from finetune.words import plural

REVIEW_DIRS = (runs.SAMPLES, runs.GALLERY)
"""Sub-folders of a run whose PNGs are reviewed: training samples and `finetune sample` galleries."""

LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([^:>]*))?>")
# One `Key: value` item of the settings line; values holding `,` or `:` are written in double quotes.
SETTING = re.compile(r'\s*([^:,"]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class ReviewImage:
    """One image to rate and the settings that made it."""

    path: str
    """Path relative to the run folder, with `/` separators (the image's id in the API and the database)."""
    sha256: str
    prompt: str
    """The prompt without its `<lora:name:scale>` tags: images of the same prompt are compared."""
    negative_prompt: str
    seed: int | None
    steps: int | None
    cfg_scale: float | None
    sampler: str
    size: str
    loras: tuple[tuple[str, float], ...]
    scale: float | None
    """The `LoRA scale` setting, else the scale of the first <lora:...> tag; None when there is neither."""
    checkpoint: str | None
    """The `Checkpoint` setting, else step-NNNNNN of the `Training step` setting or of the samples/ folder."""
    parameters: str
    """The whole A1111 parameters text, kept with every rating."""
    identity: str = ""
    """Its `finetune score` result ("likeness 0.71", "class leak 0.12", "no face found"), when scored."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["loras"] = [list(pair) for pair in self.loras]
        return d


def parse_parameters(text: str) -> dict:
    """Split an A1111 `parameters` text into prompt, negative prompt, LoRA tags and the settings line.

    Returns {"prompt", "negative_prompt", "loras": [(name, scale)], "settings": {key: value string}}.
    """
    lines = text.strip("\n").split("\n")
    settings: dict[str, str] = {}
    # The last line holds the settings when it parses as several `Key: value` items (as A1111 reads it).
    items = SETTING.findall(lines[-1]) if lines else []
    if len(items) >= 3 and len(lines) > 1:
        lines = lines[:-1]
        for key, value in items:
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = value[1:-1].replace('\\"', '"')
            settings[key.strip()] = value.strip()
    prompt_lines, negative_lines = lines, []
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt:"):
            prompt_lines, negative_lines = lines[:i], [line.removeprefix("Negative prompt:"), *lines[i + 1:]]
            break
    prompt = "\n".join(prompt_lines)
    loras = [(name, _float(scale) if scale else 1.0) for name, scale in LORA_TAG.findall(prompt)]
    return {
        "prompt": LORA_TAG.sub("", prompt).strip(),
        "negative_prompt": "\n".join(negative_lines).strip(),
        "loras": loras,
        "settings": settings,
    }


def _float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def describe_image(run: Path, rel: str) -> ReviewImage:
    """Read one PNG's settings; raises ValueError with the reason when it has none."""
    path = run / rel
    text = read_provenance(path)["parameters"]
    if not text:
        raise ValueError("no generation settings (no A1111 `parameters` text chunk)")
    parsed = parse_parameters(text)
    s = parsed["settings"]
    if "Sheet rows" in s:
        raise ValueError("a contact sheet of several images (`finetune sample` writes each image on its own too)")
    loras = tuple((name, scale) for name, scale in parsed["loras"] if scale is not None)
    # `finetune sample` writes the row's scale as `LoRA scale` ("0.8", "0 (base model)"): with extra LoRAs
    # applied beside the run's, it is the one that says which row an image is from.
    scale = _float(s.get("LoRA scale", "").split(" ")[0]) if "LoRA scale" in s else (loras[0][1] if loras else None)
    checkpoint = s.get("Checkpoint")
    parts = rel.split("/")
    if checkpoint is None and _int(s.get("Training step")) is not None:
        checkpoint = runs.checkpoint_name(int(s['Training step']))
    if checkpoint is None and parts[0] == runs.SAMPLES and len(parts) > 2 and runs.STEP_DIR.fullmatch(parts[1]):
        checkpoint = parts[1]
    return ReviewImage(
        path=rel,
        sha256=sha256_file(path),
        prompt=parsed["prompt"],
        negative_prompt=parsed["negative_prompt"],
        seed=_int(s.get("Seed")),
        steps=_int(s.get("Steps")),
        cfg_scale=_float(s.get("CFG scale")),
        sampler=s.get("Sampler", ""),
        size=s.get("Size", ""),
        loras=loras,
        scale=scale,
        checkpoint=checkpoint,
        parameters=text,
    )


@dataclass
class Scan:
    images: list[ReviewImage]
    skipped: list[tuple[str, str]]
    """(path relative to the run, reason) of each PNG that cannot be reviewed."""


def skipped_lines(skipped: list[tuple[str, str]], shown: int = 3) -> list[str]:
    """One line per reason, naming a few of the PNGs: every `finetune sample` leaves a contact sheet per
    prompt, so a run sampled a few times has dozens of sheets, each skipped for the same reason."""
    by_reason: dict[str, list[str]] = {}
    for rel, reason in skipped:
        by_reason.setdefault(reason, []).append(rel)
    lines = []
    for reason, paths in by_reason.items():
        more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
        lines.append(f"skipped {plural(len(paths), 'PNG')}, {reason}: {', '.join(paths[:shown])}{more}")
    return lines


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def scan_run(run: Path, cache: dict | None = None) -> Scan:
    """Every reviewable PNG under the run's samples/ and gallery/ folders, in folder order.

    `cache` (kept by the caller between scans) maps a path to (mtime_ns, size, result), so a re-scan only
    reads files that are new or changed. Symlinks that lead outside the run are skipped, never followed.
    """
    run = run.resolve()
    cache = {} if cache is None else cache
    images, skipped, seen = [], [], set()
    for top in REVIEW_DIRS:
        root = run / top
        if not root.is_dir() or not root.resolve().is_relative_to(run):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            # Dot-folders are galleries still being written (`finetune sample` renames them when complete).
            dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=_natural)
            for name in sorted(filenames, key=_natural):
                if not name.lower().endswith(".png") or name.startswith("."):
                    continue  # dot-files are save_generated_png's temporaries
                full = Path(dirpath) / name
                rel = full.relative_to(run).as_posix()
                seen.add(rel)
                if not full.resolve().is_relative_to(run):
                    skipped.append((rel, "a link to a file outside the run folder"))
                    continue
                try:
                    st = full.stat()
                except OSError as e:
                    skipped.append((rel, f"unreadable: {e.strerror}"))
                    continue
                hit = cache.get(rel)
                if hit is None or hit[:2] != (st.st_mtime_ns, st.st_size):
                    try:
                        result = describe_image(run, rel)
                    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError on broken PNGs
                        result = str(e)
                    hit = cache[rel] = (st.st_mtime_ns, st.st_size, result)
                if isinstance(hit[2], str):
                    skipped.append((rel, hit[2]))
                else:
                    images.append(hit[2])
    for rel in set(cache) - seen:
        del cache[rel]
    attach_scores(run, images)
    return Scan(images, skipped)


def attach_scores(run: Path, images: list[ReviewImage]) -> None:
    """Each gallery image's identity score from its gallery's scores.json (`finetune score`), so a
    person rates with the numbers in view. Read on every scan: scoring may happen while reviewing."""
    from finetune.score import SCORES

    found: dict[str, str] = {}
    for path in (run / runs.GALLERY).glob(f"*/{SCORES}"):
        try:
            scores = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        folder = path.parent.relative_to(run).as_posix()
        for im in scores.get("images", []):
            what = "class leak" if im.get("class_prompt") else "likeness"
            text = f"{what} {im['likeness']:.2f}" if im.get("face") else "no face found"
            if im.get("copy_of"):
                text += f", copies {im['copy_of']}"
            found[f"{folder}/{im['file']}"] = text
    images[:] = [replace(image, identity=found.get(image.path, "")) for image in images]

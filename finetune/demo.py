"""`finetune demo`: the whole loop on the embedded tiny base and the bundled example photos.

prepare -> train -> export -> sample, each through the same function its command calls, so the demo
exercises exactly what a user runs. The tiny base has random weights: the images are noise, the
pipeline is real.

Run again, the demo continues an interrupted demo run from its last checkpoint (Ctrl-C prints
`finetune demo` as the command that resumes), and says so when it replaces a finished one or starts
over one that stopped before its first checkpoint.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from finetune import runs
from finetune.errors import FinetuneError
from finetune.words import plural

_PACKAGE = Path(__file__).resolve().parent
# Installed, the photos are package data (finetune/example_photos); in a checkout, datasets/example-photos.
EXAMPLE_PHOTOS = (_PACKAGE / "example_photos" if (_PACKAGE / "example_photos").is_dir()
                  else _PACKAGE.parent / "datasets" / "example-photos")
DEMO_PRESET = "tiny-demo"
DEMO_BASE = "tiny"


def demo_preset(base: str) -> str:
    """The preset a demo on the embedded base `base` trains with: `<base>-demo` (tiny-demo, tiny-flux-demo)."""
    return DEMO_PRESET if base == DEMO_BASE else f"{base}-demo"


def demo_bases() -> list[str]:
    """The embedded bases that have a demo preset (torch-free: the CLI offers them)."""
    from finetune.config import PRESETS_DIR
    from finetune.models import families

    return [b for b in families.tiny_specs() if (PRESETS_DIR / f"{demo_preset(b)}.toml").is_file()]


def _has_checkpoint(run_dir: Path) -> bool:
    return bool(runs.complete_checkpoints(run_dir, state=True))


def _is_demo_run(folder: Path, base: str) -> bool:
    try:
        return runs.read_info(folder).get("base") == base
    except FinetuneError:
        return False


def demo(photos: Path | None = None, root: Path = Path("."), echo=print, base: str = DEMO_BASE) -> dict[str, Path]:
    """Run the loop on the embedded `base` into root/datasets/demo and root/outputs/demo (…/demo-<base>
    for another tiny base than `tiny`); return where each output is."""
    from finetune import identity
    from finetune.config import load_preset
    from finetune.data.prepare import prepare
    from finetune.export import export
    from finetune.sample import SheetSettings, sample
    from finetune.score import SCORES, score, skip_reason
    from finetune.train.lora import train

    photos = Path(photos) if photos else EXAMPLE_PHOTOS
    if not photos.is_dir():
        raise FinetuneError(f"example photos not found at {photos}: run the demo from a clone of the repository, "
                            "or pass --photos DIR")
    if base not in demo_bases():
        raise FinetuneError(f"--base {base}: the demo runs on an embedded tiny base with a demo preset: "
                            f"{', '.join(demo_bases())}")
    preset = demo_preset(base)
    cfg = load_preset(preset)
    if cfg.model.base != base:
        raise FinetuneError(f"preset {preset} trains on {cfg.model.base}, not the demo's base {base}")
    name = "demo" if base == DEMO_BASE else f"demo-{base}"
    run_dir = root / "outputs" / name
    command = ("finetune demo" + (f" --base {base}" if base != DEMO_BASE else "")
               + (f" --photos {shlex.quote(str(photos))}" if photos != EXAMPLE_PHOTOS else ""))
    resume = None
    if run_dir.exists():
        if not _is_demo_run(run_dir, base):
            raise FinetuneError(f"{run_dir} exists and is not a demo run: move it away, or run the demo elsewhere")
        # the demo's own run, on the tiny base: nothing of the user's; but an interrupted one is continued
        if (run_dir / runs.LORA_DIR).is_dir():
            echo(f"replacing the finished demo run in {run_dir}")
            shutil.rmtree(run_dir)
        elif _has_checkpoint(run_dir):
            echo(f"continuing the interrupted demo run in {run_dir} from its last checkpoint "
                 f"(delete {run_dir} to start over)")
            resume = "latest"
        else:
            echo(f"starting over the demo run in {run_dir}: it stopped before its first checkpoint")
            shutil.rmtree(run_dir)
    timings, outputs = {}, {}

    t = time.perf_counter()
    echo(f"[1/4] prepare: {photos} -> {root / 'datasets' / name}")
    # datasets/demo is the demo's own: `--photos` may point it at other photos
    prepared = prepare(photos, root / "datasets" / name, cfg.data, replace=True)
    outputs["dataset"], outputs["report"] = prepared.out, prepared.out / "report.html"
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[2/4] train: preset {preset}, {plural(cfg.train.max_steps, 'step')} on the {base} base")
    try:
        outputs["run"] = train(cfg, prepared.out, run_dir, preset=preset, resume=resume, resume_with=command)
    except FinetuneError as e:
        if resume is None:
            raise
        raise FinetuneError(f"the interrupted demo run in {run_dir} cannot be continued: {e}; "
                            f"delete {run_dir} and run {command} again to start over") from None
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[3/4] export: {', '.join(cfg.export.formats)}")
    for fmt in cfg.export.formats:
        outputs[f"export {fmt}"] = export(outputs["run"], fmt, force=True, echo=lambda _: None)
    timings["export"] = time.perf_counter() - t

    t = time.perf_counter()
    echo("[4/4] sample: base vs tuned, LoRA scales x seeds")
    gallery = sample(outputs["run"], prompts=cfg.sample.prompts, settings=SheetSettings.from_config(cfg.sample))
    outputs["gallery"] = gallery / "index.html"
    timings["sample"] = time.perf_counter() - t
    # identity scores: on the tiny base's noise images, the honest outcome is "no face found"
    if why := skip_reason(outputs["run"]):
        echo(f"      {why}")
    elif not identity.available():
        echo(f"      identity scores skipped: the face identity models are not installed ({identity.INSTALL})")
    else:
        scores = score(outputs["run"], gallery, progress=False)
        outputs["scores"] = gallery / SCORES
        echo(f"      scores: {scores['summary']}")

    echo("\ndone in " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ":")
    width = max(len(k) for k in outputs)
    for key, path in outputs.items():
        echo(f"  {key:{width}s}  {path}")
    return outputs

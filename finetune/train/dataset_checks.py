"""Does a prepared dataset fit the run about to train on it? And if not, the command that prepares a
new one that does.

Both read only dataset.json and the captions (no model, no torch), so they run before the base loads.
A suggested command never writes over the dataset: runs already trained on it must stay reproducible.
It carries the settings the dataset was prepared with (trigger, class, caption template, crop, ...)
where the preset would give others, so that the new dataset differs from the old only in what the
refusal was about.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

from finetune.config import DataConfig, load_config, parse_literal
from finetune.data.captions import mentions
from finetune.errors import FinetuneError
from finetune.train.data import is_prepared, prepared_at, prepared_settings, prepared_target
from finetune.words import plural

NOT_CARRIED = {"workers", "repeats"}
"""Data settings that do not shape the dataset: how many processes prepare it, how often training reads it."""


def set_arg(key: str, value) -> str:
    """`--set data.KEY=VALUE`, shell-quoted, with VALUE written so that --set reads back `value`."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value if parse_literal(value) == value else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        text = repr(value)
    return f"--set {shlex.quote(f'data.{key}={text}')}"


def reprepare_command(dataset: Path, preset: str | None, changes: dict, suffix: str) -> tuple[str, Path]:
    """(`finetune prepare` command, the new dataset folder it writes): the photos `dataset` was
    prepared from, with the settings it was prepared with except `changes`, into a new folder named
    after `dataset` plus `suffix`."""
    dataset = Path(dataset)
    _, photos = prepared_at(dataset)
    recorded = prepared_settings(dataset)
    try:  # the settings the command gets without --set: the preset's
        baseline = load_config(preset).data if preset else DataConfig()
    except FinetuneError:
        baseline = DataConfig()
    name = re.sub(r"[^\w.-]+", "-", f"{dataset.name}-{suffix}").strip("-")
    new = dataset.with_name(name)
    in_datasets = dataset.parent.resolve() == Path("datasets").resolve()
    parts = ["finetune prepare", shlex.quote(str(photos)) if photos else "PHOTOS",
             f"--name {shlex.quote(name)}" if in_datasets else f"--out {shlex.quote(str(new))}"]
    parts += [f"--preset {shlex.quote(str(preset))}"] if preset else []
    for f in dataclasses.fields(DataConfig):
        if f.name in NOT_CARRIED or (f.name not in changes and f.name not in recorded):
            continue
        value = changes.get(f.name, recorded.get(f.name))
        if value != getattr(baseline, f.name):
            parts.append(set_arg(f.name, value))
    return " ".join(parts), new


def adopt_class_word(cfg, dataset: Path, overrides, log=print) -> None:
    """Train with the class word `dataset` was prepared with, unless --set names one.

    Its captions were written with that word ("a photo of ohwx woman"); a preset's generic one
    ("person") would otherwise go into the prior-preservation prompt, the sample prompts, run.json and
    the LoRA's usage hint while the captions taught another word. Said in one line, never silently."""
    if cfg is None or any(str(o).split("=", 1)[0].strip() == "data.class_word" for o in overrides):
        return
    dataset = Path(dataset)
    if dataset.is_dir() and not is_prepared(dataset):  # photos: their dataset, if prepared from them before
        target = prepared_target(dataset)
        try:
            source = json.loads((target / "dataset.json").read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            return
        if not isinstance(source, str) or Path(source).resolve() != dataset.resolve():
            return
        dataset = target
    recorded = prepared_settings(dataset).get("class_word")
    if not isinstance(recorded, str) or not recorded.strip() or recorded == cfg.data.class_word:
        return
    log(f"data.class_word = {recorded!r}: the class word dataset {dataset} was prepared with (the preset says "
        f"{cfg.data.class_word!r}; add --set data.class_word=WORD to choose another)")
    cfg.data.class_word = recorded


def check_trigger(cfg, dataset: Path, captions: list[str], preset: str | None, log=print) -> None:
    """Refuse a run whose `data.trigger` is in none of the dataset's captions (it would learn the
    subject under no word, while run.json, the LoRA metadata and the sample prompts all name that
    word); warn when only some captions lack it."""
    trigger = cfg.data.trigger
    if not trigger.strip() or not captions:
        return
    lacking = [i for i, caption in enumerate(captions) if not mentions(caption, trigger)]
    if not lacking:
        return
    where = f"of dataset {dataset}"
    if len(lacking) < len(captions):
        log(f"warning: {len(lacking)} of {len(captions)} captions {where} lack data.trigger = {trigger!r}: those "
            "images teach the subject without its word (see the .txt files in its images/ folder)")
        return
    before = prepared_settings(dataset).get("trigger")
    if isinstance(before, str) and before.strip() and before != trigger \
            and any(mentions(caption, before) for caption in captions):
        command, new = reprepare_command(dataset, preset, {"trigger": trigger, "resolution": cfg.data.resolution},
                                         trigger)
        raise FinetuneError(f"data.trigger = {trigger!r} is in none of the {plural(len(captions), 'caption')} {where}, which "
                            f"say {before!r} (the trigger it was prepared with): train with --set "
                            f"data.trigger={shlex.quote(before)}, or prepare the photos again with {trigger!r} "
                            f"(`{command}`) and train with --dataset {new}")
    raise FinetuneError(f"data.trigger = {trigger!r} is in none of the {plural(len(captions), 'caption')} {where}: set "
                        "--set data.trigger to the word the captions use, or put the word (or [trigger]) in "
                        "the .txt files of its images/ folder")

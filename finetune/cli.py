"""The `finetune` command: thin click wrappers over the stage functions.

Heavy libraries (torch, diffusers) are imported inside the commands, so `finetune --help` and
config errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from finetune import vocab
from finetune.errors import FinetuneError, Stopped
from finetune.words import plural


class Group(click.Group):
    """Shows a FinetuneError as one line on stderr with its exit code, never a traceback. An interrupt
    that reaches here (a second Ctrl-C during training, or any Ctrl-C elsewhere) exits 130, as shells
    expect of SIGINT; outputs and checkpoints are written atomically, so nothing is left half-written."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Stopped as e:  # what was done is saved and said: only the exit code is left to give
            ctx.exit(e.exit_code)
        except FinetuneError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def set_option(f):
    return click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override a preset value, e.g. --set train.lr=2e-4 (repeatable).")(f)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="finetune")
def cli():
    """Personal DreamBooth + LoRA fine-tuning for Stable Diffusion.

    \b
    prepare  photos -> datasets/<name>/ (crops, captions, report)
    train    preset + dataset + base -> outputs/<run>/ (LoRA)
    export   run -> shareable .safetensors (peft, kohya, merged)
    sample   prompts x seeds x LoRA scales -> grids + gallery
    verify   images -> their provenance label and invisible watermark
    review   rate a run's samples in the browser -> feedback.sqlite, preference pairs
    """


# ---------------------------------------------------------------- presets and config
@cli.group(cls=Group)
def presets():
    """List, show and validate presets (TOML files under presets/)."""


@presets.command("list")
def presets_list():
    """Name and first line (the command that uses it) of every preset."""
    from finetune.config import PRESETS_DIR, list_presets

    for name in list_presets():
        first = (PRESETS_DIR / f"{name}.toml").read_text().splitlines()[0].lstrip("# ").strip()
        click.echo(f"{name:28s} {first}")


@presets.command("show")
@click.argument("name")
@set_option
def presets_show(name, overrides):
    """The resolved config of preset NAME, every key with its meaning."""
    from finetune.config import describe, load_preset

    click.echo(describe(load_preset(name, overrides)))


@presets.command("validate")
@click.argument("paths", nargs=-1)
def presets_validate(paths):
    """Check preset files (default: every preset under presets/); exit 2 if any is invalid."""
    from finetune.config import list_presets, load_preset
    from finetune.errors import ConfigError

    targets = list(paths) or list_presets()
    bad = 0
    for target in targets:
        try:
            load_preset(target)
            click.echo(f"ok       {target}")
        except ConfigError as e:
            bad += 1
            click.echo(f"invalid  {target}: {e}", err=True)
    if bad:
        sys.exit(2)


# ---------------------------------------------------------------- base models
@cli.group(cls=Group)
def base():
    """Base-model utilities."""


def _tiny_base_command(spec: str, title: str) -> None:
    """`finetune base <spec>`: one command per embedded test base of the model families."""

    @click.option("--out", type=click.Path(path_type=Path), help=f"Write the {spec} base as a diffusers folder here.")
    @click.option("--single-file", type=click.Path(path_type=Path), help="Write it as one original-layout .safetensors.")
    def command(out, single_file):
        _write_tiny_base(spec, out, single_file)

    command.__doc__ = (f"Write the embedded tiny {title} base (random weights) as a diffusers folder and/or a "
                       "single file.")
    base.command(spec)(command)


def _add_tiny_base_commands() -> None:
    from finetune.models import families

    for spec, (family, _) in families.tiny_specs().items():
        _tiny_base_command(spec, family.variants[0].title)


_add_tiny_base_commands()


@base.command("tiny-flux")
@click.option("--schnell", is_flag=True, help="The FLUX.1-schnell-like variant (no guidance embedding).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the tiny Flux as a diffusers folder here.")
@click.option("--single-file", type=click.Path(path_type=Path),
              help="Write its transformer as one original-layout (BFL) .safetensors.")
@click.option("--split-files", type=click.Path(path_type=Path, file_okay=False),
              help="Write ComfyUI's split files (transformer, clip_l, t5xxl, ae) and a base spec base.toml here.")
def base_tiny_flux(schnell, out, single_file, split_files):
    """Write the embedded tiny FLUX.1 base (random weights) as a diffusers folder, a transformer single
    file and/or split files with a base spec (`--base DIR/base.toml`)."""
    import shutil

    from finetune.filemode import follow_umask
    from finetune.models.families.flux_tiny import tiny_flux_split_dir

    spec = "tiny-flux-schnell" if schnell else "tiny-flux"
    if split_files:
        if split_files.exists():
            raise FinetuneError(f"{split_files} already exists; choose another --split-files")
        src = tiny_flux_split_dir("schnell" if schnell else "dev")
        shutil.copytree(src, split_files, ignore=shutil.ignore_patterns("model_index.json"))
        follow_umask(split_files)
        click.echo(f"split files: {split_files} (base spec {split_files / 'base.toml'})")
    if out or single_file:
        _write_tiny_base(spec, out, single_file)


def _write_tiny_base(spec: str, out: Path | None, single_file: Path | None) -> None:
    import shutil

    from finetune.filemode import follow_umask
    from finetune.models import families

    if not out and not single_file:
        raise click.UsageError("give --out DIR and/or --single-file FILE")
    for path, option in ((out, "--out"), (single_file, "--single-file")):
        if path and path.exists():
            raise FinetuneError(f"{path} already exists; choose another {option}")
    src = families.tiny_specs()[spec][1]()
    if out:
        shutil.copytree(src, out)
        follow_umask(out)  # the cache may hold owner-only files written before the umask was followed
        click.echo(f"diffusers folder: {out}")
    if single_file:
        from finetune.models import load_base
        from finetune.models.single_file import save_single_file

        base = load_base(spec)
        save_single_file(base.pipe, single_file, metadata={"finetune.base": spec, "finetune.arch": base.arch},
                         arch=base.arch)
        click.echo(f"single file: {single_file}")


@base.command("info")
@click.argument("spec")
@click.option("--config", default="", help="Local diffusers folder with the configs of a single-file checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt/.pt/.bin (read with torch.load(weights_only=True)).")
def base_info(spec, config, allow_pickle):
    """Load base model SPEC (tiny | folder | .safetensors | hub id) and describe it."""
    from finetune.models import load_base

    b = load_base(spec, config=config, allow_pickle=allow_pickle)
    click.echo(f"base:          {b.spec} ({b.kind})")
    click.echo(f"architecture:  {b.arch}")
    for name in (c.name for c in b.family.components):
        module = getattr(b.pipe, name, None)
        if module is not None:
            click.echo(f"{name + ':':14s} {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M parameters")
    click.echo(f"sha256:        {b.model_hash()}")


# ---------------------------------------------------------------- review
@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1; 0 = any free one. A port in use is replaced by a free one.")
@click.option("--no-browser", is_flag=True, help="Only print the page's address; open no browser.")
@click.option("--export", "export_to", type=click.Path(path_type=Path, dir_okay=False), metavar="PAIRS.jsonl",
              help="Write the preference pairs (chosen, rejected) of RUN's ratings to this file and exit.")
def review(run, port, no_browser, export_to):
    """Rate RUN's sample images in the browser: favourite / reject, or pick the better of two.

    Ratings are saved to RUN/feedback.sqlite as you go; --export turns them into preference pairs.
    """
    if export_to:
        from finetune.ratings import export_pairs

        result = export_pairs(run, export_to)
        click.echo(f"wrote {result.written} preference pairs to {result.path} ({result.from_comparisons} from "
                   f"comparisons, {result.from_verdicts} from favourites vs rejects of one prompt)")
        for reason in result.skipped:
            click.echo(f"skipped {reason}")
        return
    from finetune.review import review as serve

    serve(run, port=port, open_browser=not no_browser, echo=click.echo)


# ---------------------------------------------------------------- prepare
@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--name", help="Dataset name: writes datasets/NAME/ (default: the source folder's name).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Write the dataset here instead.")
@click.option("--preset", help="Preset whose [data] settings to use (default: the built-in defaults).")
@set_option
@click.option("--overwrite-captions", is_flag=True, help="Rewrite captions you edited in images/NNNN.txt.")
@click.option("--replace", is_flag=True, help="Replace the dataset in the output folder even if it was prepared "
              "from another photo folder (refused without this flag).")
def prepare(source, name, out, preset, overrides, overwrite_captions, replace):
    """Turn the photos in SOURCE (searched recursively, never modified) into a training dataset.

    Writes images/NNNN.png + NNNN.txt captions, manifest.jsonl, dataset.json and report.html.
    """
    from finetune.config import load_config
    from finetune.data.prepare import prepare as run_prepare

    if name and out:
        raise click.UsageError("give --name or --out, not both")
    if name and (name in (".", "..") or "/" in name or "\\" in name):
        raise click.UsageError(f"--name {name!r} must be a plain folder name (use --out for a path)")
    cfg = load_config(preset, overrides)
    out = out or Path("datasets") / (name or source.resolve().name)
    result = run_prepare(source, out, cfg.data, overwrite_captions=overwrite_captions, replace=replace)
    for notice in result.notices:
        click.echo(notice)
    click.echo(result.summary)


@cli.command("sample")
@click.argument("run", required=False, type=click.Path(path_type=Path, exists=True))
@click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT]",
              help="A LoRA file (peft or kohya layout) to apply, with its relative weight (repeatable).")
@click.option("--base", "base_spec", help="Base model (default: the run's, else the LoRA's finetune.base metadata).")
@click.option("-p", "--prompt", "prompt_texts", multiple=True, help="A prompt; [trigger] and [class] are substituted (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Prompts file: one per line, or .toml with per-prompt negative and size.")
@click.option("--seeds", help="Comma-separated seeds, one column each (default: the run's sample.seeds).")
@click.option("--scales", help="Comma-separated LoRA scales, one row each; 0 = the base model (default: sample.scales).")
@click.option("--checkpoints", help="Rows per checkpoint: all, or step-N,...,final (scales then default to 0,1).")
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale.")
@click.option("--size", help="WIDTHxHEIGHT (multiples of 8), or one number for a square (default: the run's or "
              "LoRA's recorded sample size, else the base's native size).")
@click.option("--scheduler", help="ddim | euler | euler-a | dpmpp-2m (SD); flow-euler (FLUX.1)")
@click.option("--negative", help="Negative prompt (for prompts without their own).")
@click.option("--batch-size", type=int, help="Images per pipeline call (default: all seeds of a row).")
@click.option("--watermark/--no-watermark", default=None, help="Invisible watermark in every image (default: on).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Gallery folder (default: RUN/gallery/<time>/, else outputs/samples-<time>/).")
def sample_command(run, loras, base_spec, prompt_texts, prompts_file, seeds, scales, checkpoints, steps, guidance,
                   size, scheduler, negative, batch_size, watermark, out):
    """Prompts x seeds x LoRA scales (or checkpoints) -> images, contact sheets and an index.html gallery.

    RUN is a run folder; or give LoRA files with --lora (and --base). Without RUN, prompts and settings
    default to those recorded in the LoRA (else the defaults at the base's native size). Every PNG
    carries its settings (A1111 `parameters`), the IPTC "trained algorithmic media" label and an
    invisible watermark.
    """
    from dataclasses import replace

    from finetune import sample as sampling

    if run is None and not loras and not base_spec:
        raise click.UsageError("give RUN (a run folder that `finetune train` wrote) or --lora FILE "
                               "(or --base with -p to sample a base model alone)")
    lora_files = [sampling.parse_lora_arg(text) for text in loras]
    if run is not None and run.is_file():  # a LoRA file given where the run goes
        lora_files.insert(0, sampling.LoraFile(run))
        run = None
    settings = sampling.default_settings(run, lora_files)
    changes = {k: v for k, v in dict(steps=steps, guidance=guidance, scheduler=scheduler, negative=negative,
                                     batch_size=batch_size, watermark=watermark).items() if v is not None}
    if seeds is not None:
        changes["seeds"] = sampling.parse_list(seeds, int, "--seeds")
    if scales is not None:
        changes["scales"] = sampling.parse_list(scales, float, "--scales")
    elif checkpoints:
        changes["scales"] = [0.0, 1.0]
    if size is not None:
        changes["width"], changes["height"] = sampling.parse_size(size)
    settings = replace(settings, **changes)
    prompts = None
    if prompt_texts or prompts_file:
        prompts = [sampling.Prompt(t) for t in prompt_texts]
        if prompts_file:
            prompts += sampling.read_prompts(prompts_file)
    gallery = sampling.sample(run, loras=lora_files, base=base_spec, prompts=prompts, settings=settings,
                              checkpoints=checkpoints, out=out, echo=click.echo)
    images = len(list(gallery.glob("p*/*-seed*.png")))
    sheets = len(list(gallery.glob("p*/sheet.png")))
    click.echo(f"gallery: {gallery / 'index.html'}")
    click.echo(f"  {plural(images, 'image')} and {plural(sheets, 'contact sheet')} in {gallery}")
    if run is not None:
        _score(run, gallery, required=False)


def _score(run: Path, gallery: Path | None, required: bool) -> None:
    """Score a run's gallery and print the recommendation; one line instead when the run has no face
    subject, or (unless `required`) when the identity models are not installed."""
    from finetune import identity
    from finetune import score as scoring

    if why := scoring.skip_reason(run):
        click.echo(why)
        return
    if not identity.available() and not required:
        click.echo(f"identity scores skipped: the face identity models are not installed ({identity.INSTALL})")
        return
    result = scoring.score(run, gallery)
    click.echo(f"scores: {Path(result['gallery']) / scoring.SCORES}")
    click.echo(("recommended: " if result["recommendation"] else "") + result["summary"])


@cli.command("score")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--gallery", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="The gallery to score (default: the run's newest, RUN/gallery/<time>/).")
def score_command(run, gallery):
    """Likeness to the subject, class leak and copying of a run's sample images, per checkpoint x LoRA
    scale: scores.json, the scores in the gallery, and the checkpoint and scale to use.

    Sample the checkpoints first: finetune sample RUN --checkpoints all
    """
    _score(run, gallery, required=True)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
def verify(images):
    """Per image: its provenance metadata (A1111 parameters, IPTC AI label) and whether finetune's
    invisible watermark is in it. Exit 1 only if a file cannot be read as an image."""
    from finetune.provenance import check_image

    unreadable = 0
    for n, path in enumerate(images):
        try:
            check = check_image(path)
        except FinetuneError as e:
            click.echo(f"error: {e}", err=True)
            unreadable += 1
            continue
        if n:
            click.echo()
        click.echo(check.report())
    if unreadable:
        sys.exit(1)


@cli.command("train")
@click.option("--preset", required=True, help="Preset name (see `finetune presets list`) or a .toml file.")
@click.option("--dataset", required=True, type=click.Path(path_type=Path),
              help="A prepared dataset folder, or a folder of photos (prepared into datasets/<name>/ first).")
@click.option("--base", "base_spec", help="Base model: tiny, a hub id, a diffusers folder or a .safetensors file "
              "(default: the preset's model.base).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run folder (default: outputs/<dataset name>-<preset name>).")
@set_option
@click.option("--allow-pickle", is_flag=True, help="Allow a pickle (.ckpt/.bin) base, read with torch.load(weights_only=True).")
@click.option("--resume", metavar="latest|PATH", help="Continue the run exactly where it stopped: its newest intact "
              "checkpoint, or a checkpoint folder (RUN/checkpoints/step-N) or step-N.")
@click.option("--feedback", metavar="RUN_DIR", type=click.Path(path_type=Path, file_okay=False),
              help="A run rated with `finetune review`: its favourites join the data (loss weight "
              "train.feedback_weight); with train.prior_preservation on, the class images of a rejected class "
              "prompt are made afresh (rejects do nothing else here: `finetune train-dpo` learns from them).")
def train_command(preset, dataset, base_spec, out, overrides, allow_pickle, resume, feedback):
    """Train a LoRA of the subject in DATASET: writes outputs/<run>/ (lora/, samples/, metrics, loss.png).

    Runs data-parallel under `accelerate launch --num_processes N -m finetune train ...`.
    Checkpoints go to RUN/checkpoints/ every train.save_every steps and at the end; Ctrl-C or SIGTERM
    saves one and prints the command that resumes. To resume, run the same command with
    `--resume latest` added: the preset and --set values are resolved as at the start and must match
    the checkpoint's (only how long to train, how often to save/log/sample, and export settings may
    change, e.g. --set train.max_steps=2000 to train longer).
    """
    from finetune.config import collect_config
    from finetune.train.dataset_checks import adopt_class_word
    from finetune.train.preflight import check_before_loading

    cfg, problems = collect_config(preset, overrides)
    if cfg is not None and base_spec:
        cfg.model.base = base_spec
    if cfg is not None and allow_pickle:
        cfg.model.allow_pickle = True
    adopt_class_word(cfg, dataset, overrides, click.echo)
    # Everything that needs no model, reported together before torch is imported (seconds).
    check_before_loading(cfg, dataset, out, preset=preset, resume=resume, feedback=feedback, config_problems=problems)
    from finetune.train.lora import train

    command = ["--preset", preset, "--dataset", str(dataset)]
    command += ["--base", base_spec] if base_spec else []
    command += ["--out", str(out)] if out is not None else []
    command += [a for o in overrides for a in ("--set", o)]
    command += ["--allow-pickle"] if allow_pickle else []
    command += ["--feedback", str(feedback)] if feedback is not None else []
    train(cfg, dataset, out, preset=preset, resume=resume, command=command, feedback=feedback)


@cli.command("export")
@click.argument("run", type=click.Path(path_type=Path, file_okay=False))
@click.option("-f", "--format", "formats", multiple=True,
              type=click.Choice(vocab.EXPORT_FORMATS),
              help="peft (diffusers), kohya (A1111/ComfyUI/Forge), merged (single-file checkpoint) or "
                   "merged-diffusers (folder); repeatable (default: the run's export.formats).")
@click.option("--all", "all_formats", is_flag=True, help="Every format in the run's export.formats.")
@click.option("--checkpoint", help="latest, step-N, or best (the one `finetune score` recommends) "
                                   "(default: the final adapter in RUN/lora/).")
@click.option("--dtype", type=click.Choice(vocab.EXPORT_DTYPES), help="Tensor dtype (default: export.dtype).")
@click.option("--scale", type=float, help="LoRA scale fused into merged exports (default: export.scale).")
@click.option("--rank", type=int, help="Reduce the LoRA's rank by SVD and print the share of each update kept.")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Output file (folder for merged-diffusers), or an existing folder (default: RUN/export/).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--card/--no-card", default=None,
              help="Also write a model card (README.md) and a samples image beside the export "
                   "(default: only in RUN/export/; with -o only the asked-for files are written).")
def export_command(run, formats, all_formats, checkpoint, dtype, scale, rank, out, force, card):
    """Export RUN's LoRA as files that load in diffusers, AUTOMATIC1111 and ComfyUI, with a model card
    in RUN/export/ (with -o, add --card for one)."""
    from finetune import runs
    from finetune.export import export

    if all_formats or not formats:
        cfg = runs.read_config(run)
        formats = cfg.export.formats if cfg is not None else ["peft", "kohya"]
    if out is not None and len(formats) > 1 and not out.is_dir():
        raise click.UsageError(f"-o {out} names one output but {len(formats)} formats were asked for: "
                               "give one --format, or -o an existing folder")
    if checkpoint == "best":
        from finetune.export import best_checkpoint

        chosen, summary = best_checkpoint(run)
        click.echo(f"--checkpoint best: {chosen or 'final'} (finetune score: {summary})")
        checkpoint = chosen or None
    for fmt in dict.fromkeys(formats):
        export(run, fmt, checkpoint=checkpoint, dtype=dtype, scale=scale, out=out, rank=rank, force=force,
               card=card, echo=click.echo)


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--full", is_flag=True, help="Do not shorten long metadata values.")
@click.option("--base", "base_spec", help="Also check that a LoRA's modules fit this base model (tiny, folder, file, hub id).")
def inspect_command(path, as_json, full, base_spec):
    """What PATH is: a LoRA (peft or kohya layout: rank, alpha, targets), a merged checkpoint or a
    diffusers folder, with its base model, trigger word, metadata and size. Reads files of other tools too."""
    import json

    from finetune.inspect_file import format_report, inspect_path

    info = inspect_path(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info, full=full))
    if base_spec:
        from finetune import lora_io
        from finetune.models import load_base

        if info["format"] not in lora_io.LORA_LAYOUTS:
            raise FinetuneError(f"--base checks LoRA files; {path} is a {info['description']}")
        file = Path(info["path"])
        tensors, metadata, layout = lora_io.read_lora(file)
        base = load_base(base_spec)
        lora_io.check_fits(lora_io.to_layers(tensors, metadata, layout), base.pipe, lora_name=str(file),
                           base_name=base_spec, arch=base.arch, metadata=metadata)
        click.echo(f"fits base {base_spec} ({lora_io.describe_base_architecture(base.pipe, base.arch)})")


@cli.command("train-dpo")
@click.option("--from", "start", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The run whose LoRA to tune (outputs/<run>, written by `finetune train`).")
@click.option("--pairs", type=click.Path(path_type=Path, dir_okay=False),
              help="Preference pairs JSONL (`finetune review RUN --export`); default: dpo.pairs, else "
                   "exported from the --from run's ratings.")
@click.option("--preset", default="feedback-dpo-sd15", show_default=True,
              help="DPO preset (its [train], [sample], [dpo] go over the run's config).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run folder (default: outputs/<run>-dpo).")
@click.option("--resume", metavar="latest|PATH", help="Continue the DPO run in --out from a checkpoint.")
@set_option
def train_dpo_command(start, pairs, preset, out, resume, overrides):
    """Tune a run's LoRA on your preference pairs with Diffusion-DPO; writes a run folder with
    lora/, checkpoints, metrics, samples and dpo_report.json (held-out implicit reward accuracy)."""
    from finetune.train.dpo import resolve_config, train_dpo

    cfg = resolve_config(start, preset, overrides)
    train_dpo(cfg, start, pairs, out, resume=resume)


# [stage commands]


@cli.command()
@click.option("--photos", type=click.Path(path_type=Path), help="Photos to use instead of datasets/example-photos.")
@click.option("--base", default="tiny", show_default=True,
              help="The embedded tiny base: tiny (SD 1.x), tiny-sdxl, tiny-flux (FLUX.1-dev); its preset is <base>-demo.")
def demo(photos, base):
    """Run prepare -> train -> export -> sample on an embedded tiny base and the bundled photos."""
    from finetune.demo import demo as run_demo

    run_demo(photos, echo=click.echo, base=base)


def main():
    import logging

    # bitsandbytes warns at import that its optional 4-bit CPU kernels are missing; we use only its
    # 8-bit optimizers, so that line would only confuse.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cli(prog_name="finetune")


if __name__ == "__main__":
    main()

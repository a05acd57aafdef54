"""The `finetune` command: thin click wrappers over the stage functions.

Heavy libraries (torch, diffusers) are imported inside the commands, so `finetune --help` and
config errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from finetune.errors import FinetuneError


class Group(click.Group):
    """Shows a FinetuneError as one line on stderr with its exit code, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FinetuneError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


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


@base.command("tiny")
@click.option("--out", type=click.Path(path_type=Path), help="Write the tiny base as a diffusers folder here.")
@click.option("--single-file", type=click.Path(path_type=Path), help="Write it as one original-layout .safetensors.")
def base_tiny(out, single_file):
    """Write the embedded tiny SD 1.x base (random weights) as a diffusers folder and/or a single file."""
    import shutil

    from finetune.models.tiny import tiny_base_dir

    if not out and not single_file:
        raise click.UsageError("give --out DIR and/or --single-file FILE")
    src = tiny_base_dir()
    if out:
        if out.exists():
            raise FinetuneError(f"{out} already exists; choose another --out")
        shutil.copytree(src, out)
        click.echo(f"diffusers folder: {out}")
    if single_file:
        from finetune.models import load_base
        from finetune.models.ldm_layout import save_single_file

        if single_file.exists():
            raise FinetuneError(f"{single_file} already exists; choose another --single-file")
        save_single_file(load_base("tiny").pipe, single_file, metadata={"finetune.base": "tiny"})
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
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(b.pipe, name, None)
        if module is not None:
            click.echo(f"{name + ':':14s} {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M parameters")
    click.echo(f"sha256:        {b.model_hash()}")


# [stage commands]


def main():
    cli(prog_name="finetune")


if __name__ == "__main__":
    main()

"""The shared names (finetune.vocab) are the ones the config checks, the CLI offers and the stages map."""

from __future__ import annotations

import dataclasses

import click

from finetune import vocab
from finetune.cli import cli
from finetune.config import ExportConfig, SampleConfig, TrainConfig


def choices(cls, name: str) -> tuple:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]


def cli_choices(command: str, option: str) -> tuple:
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_config_cli_and_stages_use_the_same_names():
    from finetune import export
    from finetune.train import precision

    from finetune import sample
    from finetune.train import samples

    assert choices(SampleConfig, "scheduler") == vocab.SAMPLERS
    assert sample.SCHEDULERS == vocab.SAMPLERS and tuple(samples.SAMPLERS) == vocab.SAMPLERS
    assert choices(TrainConfig, "mixed_precision") == vocab.PRECISION_MODES
    assert choices(ExportConfig, "dtype") == vocab.EXPORT_DTYPES
    assert cli_choices("export", "formats") == vocab.EXPORT_FORMATS
    assert cli_choices("export", "dtype") == vocab.EXPORT_DTYPES
    assert export.FORMATS == vocab.EXPORT_FORMATS and tuple(export.DTYPES) == vocab.EXPORT_DTYPES
    assert tuple(precision.DTYPES) == vocab.TRAINING_PRECISIONS
    assert set(vocab.TRAINING_PRECISIONS) <= set(vocab.PRECISION_MODES)

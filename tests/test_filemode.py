"""Outputs follow the user's umask (issue 13, item 19): safetensors' writer and `mkdtemp` make owner-only
files (0600) and folders (0700); every atomic writer hands `follow_umask` its temporary before the rename.

The tests set umask 027, so a writer that follows it gives 0640 files and 0750 folders, neither the
owner-only modes nor a hard-coded 0644."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from finetune.cli import cli

FILE, FOLDER = 0o640, 0o750


@pytest.fixture()
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of `root` and everything in it."""
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def assert_follows_umask(root: Path) -> None:
    wrong = {k: oct(m) for k, m in modes(root).items()
             if m != (FOLDER if (root.parent / k).is_dir() else FILE)}
    assert not wrong, f"not {oct(FILE)} / {oct(FOLDER)}: {wrong}"


def test_saved_lora_folder_follows_umask(umask_027, tmp_path):
    """outputs/<run>/lora/ and each checkpoint's lora/ are written by save_lora."""
    from helpers_run import lora_pipe

    from finetune.train.adapters import save_lora

    pipe = lora_pipe()
    save_lora(tmp_path / "run" / "lora", {"unet": pipe.unet}, metadata={"finetune.trigger": "ohwx"})
    assert_follows_umask(tmp_path / "run" / "lora")
    save_lora(tmp_path / "run" / "lora", {"unet": pipe.unet})  # replacing an existing folder too
    assert_follows_umask(tmp_path / "run" / "lora")


def test_base_tiny_out_and_single_file_follow_umask(umask_027, tmp_path):
    result = CliRunner().invoke(cli, ["base", "tiny", "--out", str(tmp_path / "tiny"),
                                      "--single-file", str(tmp_path / "tiny.safetensors")])
    assert result.exit_code == 0, result.output
    assert_follows_umask(tmp_path / "tiny")
    assert_follows_umask(tmp_path / "tiny.safetensors")


def test_built_model_cache_follows_umask(umask_027, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from finetune.models.tiny import cached_build

    class Model:
        def save_pretrained(self, folder, safe_serialization=True):
            (Path(folder) / "unet").mkdir()
            save_file({"w": torch.zeros(2)}, str(Path(folder) / "unet" / "model.safetensors"))
            (Path(folder) / "model_index.json").write_text("{}")

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    assert_follows_umask(cached_build("m", [1], Model))


def test_latent_cache_files_follow_umask(umask_027, tmp_path):
    from finetune.train.caching import _save_atomic

    _save_atomic({"latent": torch.zeros(4)}, tmp_path / "cache" / "ab" / "x.safetensors", {})
    assert_follows_umask(tmp_path / "cache")

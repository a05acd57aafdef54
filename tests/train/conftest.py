"""Fixtures for the training tests: a fresh prepared dataset per test, one torch thread."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # train_helpers, shared with the test modules
from train_helpers import write_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are latency-bound: one thread is faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prepared_master(tmp_path_factory, example_photos) -> Path:
    return write_dataset(example_photos, tmp_path_factory.mktemp("prepared") / "me")


@pytest.fixture()
def dataset(prepared_master, tmp_path) -> Path:
    """A fresh copy of the prepared example photos (64 px squares), so its caches start empty."""
    return Path(shutil.copytree(prepared_master, tmp_path / "datasets" / "me"))

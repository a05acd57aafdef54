"""finetune.data.sources: which files are inputs, in which order, and how read errors read."""

from __future__ import annotations

import errno
import os

from photo_helpers import blocks

from finetune.data.sources import list_inputs


def test_listing_is_recursive_sorted_and_explains_what_it_leaves_out(tmp_path):
    for rel in ("b.JPG", "a.png", "sub/c.heic", "sub/deep/d.tif", ".hidden/e.jpg", ".DS_Store", "notes.md",
                "IMG_0001.AAE", "video.MOV"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listing = list_inputs(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in listing.photos] == ["a.png", "b.JPG", "sub/c.heic",
                                                                          "sub/deep/d.tif"]
    assert [(p.name, why) for p, why in listing.ignored] == [
        ("IMG_0001.AAE", "not an image file type (.AAE)"), ("notes.md", "not an image file type (.md)"),
        ("video.MOV", "not an image file type (.MOV)")]


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    blocks(1).save(tmp_path / "a.png")
    private = tmp_path / "private"
    private.mkdir()
    os.chmod(private, 0)
    if os.geteuid() == 0:  # root lists a chmod 000 folder anyway: fail the listing as it fails for others
        real = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(private):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        listing = list_inputs(tmp_path)
    finally:
        os.chmod(private, 0o755)
    assert [p.name for p in listing.photos] == ["a.png"]
    assert [(p.name, why) for p, why in listing.ignored] == [("private", "folder cannot be listed: Permission denied")]

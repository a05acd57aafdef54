"""Finding the photos in a source folder and reading them (never writing: the folder is the user's).

Files are found recursively in a fixed order (sorted by their path's bytes), so the dataset's
numbering does not depend on the file system. Hidden files and folders (.DS_Store, .thumbnails) are
skipped; other non-image files are listed as ignored. A symlink to a file is read like a file; a
symlink to a folder is not followed (it could loop, or reach far outside the source).
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".heic", ".heif", ".hif", ".tif", ".tiff",
    ".bmp", ".dib", ".gif",
})


@dataclass
class Listing:
    photos: list[Path] = field(default_factory=list)
    """Files with an image extension, in a stable order."""
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    """Everything else found, with why it was left out."""


def _key(path: Path) -> bytes:
    return os.fsencode(path)


def list_inputs(source: Path) -> Listing:
    listing = Listing()

    def unlistable(e: OSError) -> None:
        listing.ignored.append((Path(e.filename), f"folder cannot be listed: {e.strerror}"))

    for root, dirs, files in os.walk(source, onerror=unlistable, followlinks=False):
        top = Path(root)
        for d in sorted(dirs, key=os.fsencode):
            if not d.startswith(".") and (top / d).is_symlink():
                listing.ignored.append((top / d, "symlink to a folder: not followed"))
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=os.fsencode)
        for name in files:
            if name.startswith("."):
                continue
            path = top / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                listing.photos.append(path)
            else:
                listing.ignored.append((path, f"not an image file type ({path.suffix or 'no extension'})"))
    listing.photos.sort(key=_key)
    listing.ignored.sort(key=lambda item: _key(item[0]))
    return listing


def open_source(path: Path):
    """Open a source photo for reading (the only way this package opens one)."""
    return open(path, "rb")


def read_error(path: Path, e: OSError) -> str:
    """Why a file could not be read, in words."""
    if e.errno == errno.ELOOP:
        return "broken symlink: it loops back on itself"
    if e.errno == errno.ENOENT and os.path.islink(path):
        return f"broken symlink: its target {os.readlink(path)!r} does not exist"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "cannot read it: permission denied (check the file's permissions)"
    if e.errno == errno.EISDIR:
        return "is a folder, not a file"
    return f"cannot read it: {e.strerror or e}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_source(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_source(path: Path) -> bytes:
    with open_source(path) as f:
        return f.read()


def display(path: Path | str) -> str:
    """A path as printable text: bytes that are not UTF-8 shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")

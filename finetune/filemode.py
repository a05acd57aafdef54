"""Give written outputs the permissions the user's umask allows, as `open()` would.

Two things we write through make owner-only files: safetensors' `save_file` (also inside diffusers'
`save_pretrained` / `save_lora_weights`) creates 0600 files, and `tempfile.mkdtemp`, which our atomic
writers use before renaming into place, creates 0700 folders. Every writer that renames a temporary
file or folder into place calls `follow_umask` on it just before the rename.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: str | os.PathLike) -> None:
    """Set `path` (a file, or a folder and everything in it) to 0666 / 0777 minus the umask."""
    umask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)

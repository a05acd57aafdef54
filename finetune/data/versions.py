"""What a photo's analysis depends on besides its bytes: the settings, our own algorithm version and
the versions of the libraries that compute it. Together they key the per-photo cache.

Read without importing OpenCV, NumPy or Pillow's image module: `prepare`'s own process only hashes,
schedules and writes, and leaves those imports (and the cores) to its workers.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.util import find_spec
from pathlib import Path

PROCESS_VERSION = 3
"""Bump when the crops or measurements change, so cached results are rebuilt."""


def analysis_settings(cfg) -> dict:
    """The settings a photo's crop depends on (its cache key), with the library versions that compute it."""
    import PIL  # the package alone: its version, not the imaging core

    from finetune import identity

    return {"resolution": cfg.resolution, "crop": cfg.crop, "face_share": cfg.face_share,
            "max_megapixels": cfg.max_megapixels, "version": PROCESS_VERSION,
            "pillow": PIL.__version__, "opencv": opencv_version(),
            # faces get identity vectors when the models are installed (installing them recomputes)
            "identity": identity.version() if cfg.crop == "face" and cfg.identity else None}


@cache
def opencv_version() -> str:
    """cv2.__version__, from the version.py that every opencv-python wheel ships beside its package
    (importing cv2 itself costs a tenth of a second)."""
    spec = find_spec("cv2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        if m := re.search(r"""^opencv_version\s*=\s*["']([^"']+)["']""", text, re.M):
            return m.group(1)
    import cv2  # a build without version.py: ask the module

    return cv2.__version__

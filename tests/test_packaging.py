"""The wheel holds every package and the presets, and an installed copy finds its presets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_package_and_preset_and_lists_them_installed(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("finetune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(p.name for p in (REPO / "presets").glob("*.toml"))
    assert presets and sorted(Path(n).name for n in names if n.startswith("finetune/presets/")) == presets
    photos = sorted(p.name for p in (REPO / "datasets" / "example-photos").iterdir())  # what `finetune demo` reads
    assert sorted(Path(n).name for n in names if n.startswith("finetune/example_photos/")) == photos
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "finetune").rglob("__init__.py")}
    assert packages <= {str(Path(n).parent) for n in names}, "a package is missing from pyproject's list"
    # installed as pip would (unpacked, away from the checkout): the presets are found and load
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import finetune.config as c; print(c.PRESETS_DIR); print(','.join(c.list_presets())); "
            "c.load_preset('tiny-demo')")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert Path(out[0]) == site / "finetune" / "presets"
    assert out[1].split(",") == sorted(Path(p).stem for p in presets)

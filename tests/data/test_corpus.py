"""`finetune prepare` on a folder of every kind of broken or awkward input, generated here.

Each input is kept or rejected with its reason, the command exits 0, and the source folder is
byte-for-byte (and mtime-for-mtime) what it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import struct
import zlib
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from photo_helpers import blocks, tree_state
from PIL import Image

import finetune.data.sources as sources
from finetune.cli import cli

NON_UTF8 = os.fsdecode(b"caf\xe9_\xff.jpg")  # Latin-1 bytes: not valid UTF-8


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def make_corpus(root: Path) -> tuple[Path, Path]:
    src, outside = root / "photos", root / "elsewhere"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    jpeg = io.BytesIO()
    blocks(1, (480, 320)).save(jpeg, "JPEG", quality=90)
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("shopping list: eggs, milk\n")
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 100k x 100k RGB claimed
    (src / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                                   + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))
    blocks(2).convert("CMYK").save(src / "cmyk.jpg", quality=92)
    gray = np.asarray(blocks(3).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    Image.fromarray(gray).save(src / "gray16.png")
    palette = blocks(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.paste(0, (0, 0, 40, 40))  # colour index 0, made transparent below
    palette.save(src / "palette.png", transparency=0)
    for ext in ("gif", "webp"):
        frames = [blocks(5 if ext == "gif" else 6), blocks(7), blocks(8)]
        frames[0].save(src / f"anim.{ext}", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "one_pixel.png")
    blocks(9).save(outside / "theirs.jpg", quality=92)
    (src / "outside_link.jpg").symlink_to(outside / "theirs.jpg")
    (src / "loop_a.jpg").symlink_to(src / "loop_b.jpg")
    (src / "loop_b.jpg").symlink_to(src / "loop_a.jpg")
    (src / "dangling.jpg").symlink_to(src / "gone.jpg")
    (src / "linked_folder").symlink_to(outside, target_is_directory=True)
    blocks(10).save(src / "locked.jpg", quality=92)
    os.chmod(src / "locked.jpg", 0)
    with open(os.fsencode(src / NON_UTF8), "wb") as f:
        blocks(11).save(f, "JPEG", quality=92)
    blocks(12).save(src / "photo.tiff")
    blocks(13).save(src / "photo.bmp")
    blocks(14).save(src / "photo.webp", quality=95)
    blocks(15).save(src / "sub" / "deeper.jpg", quality=92)
    (src / "README.txt").write_text("my photos\n")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return src, outside


KEPT = ["anim.gif", "anim.webp", NON_UTF8, "cmyk.jpg", "gray16.png", "outside_link.jpg", "palette.png", "photo.bmp",
        "photo.tiff", "photo.webp", "sub/deeper.jpg"]
REJECTED = {
    "bomb.png": "claims 100000x100000 pixels (10000 MP), over data.max_megapixels = 150",
    "dangling.jpg": "broken symlink: its target",
    "empty.jpg": "empty file (0 bytes)",
    "locked.jpg": "cannot read it: permission denied",
    "loop_a.jpg": "broken symlink: it loops back on itself",
    "loop_b.jpg": "broken symlink: it loops back on itself",
    "notes.jpg": "not an image",
    "one_pixel.png": "too small: 1x1",
    "truncated.jpg": "truncated or corrupt JPEG",
}


def test_broken_inputs(tmp_path, monkeypatch):
    src, outside = make_corpus(tmp_path)
    heic = pytest.importorskip("pillow_heif")
    heic.register_heif_opener()
    blocks(16).save(src / "phone.heic", quality=90)
    kept_names = sorted(KEPT + ["phone.heic"], key=lambda n: os.fsencode(n))
    if os.geteuid() == 0:
        # root reads a chmod 000 file anyway; make the read fail as it does for everyone else
        real = sources.open_source

        def open_source(path):
            if Path(path).name == "locked.jpg":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(sources, "open_source", open_source)
    before, before_outside = tree_state(src), tree_state(outside)
    out = tmp_path / "ds"
    result = CliRunner().invoke(cli, ["prepare", str(src), "--out", str(out), "--set", "data.resolution=128",
                                      "--set", "data.workers=1"])
    assert result.exit_code == 0, result.output
    assert tree_state(src) == before and tree_state(outside) == before_outside
    os.chmod(src / "locked.jpg", 0o644)

    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [os.path.relpath(r["source"], src) for r in rows] == kept_names
    assert [r["image"] for r in rows] == [f"images/{n:04d}.png" for n in range(1, len(kept_names) + 1)]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary == (f"kept {len(kept_names)} of {len(kept_names) + len(REJECTED)} photos: 6 unreadable, "
                       f"1 not an image, 1 too large, 1 too small; {len(kept_names)} kept without a face "
                       f"(centre-cropped: check them in the report); report: {out / 'report.html'}")
    data = json.loads((out / "dataset.json").read_text())
    assert data["counts"]["rejected_by_reason"] == {"not an image": 1, "too large": 1, "too small": 1, "unreadable": 6}

    html = (out / "report.html").read_text()
    for row in rows:
        assert os.fsencode(os.path.relpath(row["source"], src)).decode("utf-8", "replace") in html
    cards = re.findall(r'<div class="name">(.*?)</div><div class="reason">(.*?)</div>', html)
    reasons = {unescape(name): unescape(why) for name, why in cards}
    assert reasons.keys() == REJECTED.keys()
    for name, why in REJECTED.items():
        assert why in reasons[name], (name, reasons[name])
    assert "README.txt</code>: not an image file type (.txt)" in html
    assert "linked_folder</code>: symlink to a folder: not followed" in html
    assert ".DS_Store" not in html
    assert "caf\ufffd_\ufffd.jpg" in html

    by_name = {os.path.relpath(r["source"], src): r for r in rows}
    assert "animated (3 frames): used the first frame" in by_name["anim.gif"]["notes"]
    assert "animated (3 frames): used the first frame" in by_name["anim.webp"]["notes"]
    assert "transparency composited on grey" in by_name["palette.png"]["notes"]
    assert "16-bit image scaled to 8 bits" in by_name["gray16.png"]["notes"]
    for name in KEPT:
        with Image.open(out / by_name[name]["image"]) as im:
            assert im.mode == "RGB" and im.size == (128, 128)
    # the 16-bit photo keeps its tones (a clipping conversion would turn it white)
    expected = np.asarray(blocks(3).convert("L").crop((16, 0, 144, 128)), dtype=np.float32)
    got = np.asarray(Image.open(out / by_name["gray16.png"]["image"]).convert("L"), dtype=np.float32)
    assert np.abs(got - expected).mean() < 3
    # CMYK comes back as the colours it was made from
    cmyk = np.asarray(Image.open(out / by_name["cmyk.jpg"]["image"]), dtype=np.float32)
    assert np.abs(cmyk - np.asarray(blocks(2).crop((16, 0, 144, 128)), dtype=np.float32)).mean() < 12


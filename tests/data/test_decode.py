"""finetune.data.images: orientation, modes, reduced JPEG decodes, bombs, HEIC with and without pillow-heif."""

from __future__ import annotations

import io
import struct
import sys

import numpy as np
import pytest
from photo_helpers import blocks
from PIL import Image, ImageCms, ImageOps

from finetune.data.images import Rejected, decode, to_rgb


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation):
    stored = blocks(orientation, (96, 64))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    dec = decode(data, max_megapixels=10)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")  # Pillow's own reading
    assert dec.original_size == expected.size == ((64, 96) if orientation >= 5 else (96, 64))
    np.testing.assert_array_equal(np.asarray(dec.image), np.asarray(expected))
    assert (orientation == 1) != any("EXIF orientation" in n for n in dec.notes)


def test_large_jpeg_is_decoded_reduced():
    big = blocks(2, (4000, 3000))
    data = encode(big, "JPEG", quality=85)
    dec = decode(data, max_megapixels=150, target_short=512)
    assert dec.original_size == (4000, 3000)
    assert dec.image.size == (1000, 750) and dec.scale == 0.25  # 1/4 is the smallest scale with short side >= 512
    assert decode(data, max_megapixels=150, target_short=1024).image.size == (2000, 1500)
    assert decode(data, max_megapixels=150).image.size == (4000, 3000)


def test_camera_mpo_is_a_photo_not_an_animation():
    """Many cameras write JPEGs as MPO (the photo plus a preview): decoded reduced like JPEG, no 'animated' note."""
    photo, preview = blocks(3, (2400, 1600)), blocks(4, (640, 426))
    data = encode(photo, "MPO", save_all=True, append_images=[preview], quality=90)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    dec = decode(data, max_megapixels=150, target_short=400)
    assert dec.original_size == (2400, 1600) and dec.image.size == (600, 400) and not dec.notes


def test_decompression_bomb_refused_from_header():
    data = encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(Rejected, match=r"claims 5000x5000 pixels \(25 MP\), over data.max_megapixels = 20") as e:
        decode(data, max_megapixels=20)
    assert e.value.kind == "too large"
    assert decode(data, max_megapixels=30).original_size == (5000, 5000)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's own limit is restored afterwards


def test_alpha_is_composited_on_grey():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    notes = []
    rgb = np.asarray(to_rgb(rgba, notes=notes))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, 7]) == (128, 128, 128)
    assert notes == ["transparency composited on grey"]
    la = Image.new("LA", (4, 4), (200, 0))
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (128, 128, 128)
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    notes = []
    assert tuple(np.asarray(to_rgb(opaque, notes=notes))[0, 0]) == (10, 20, 30) and notes == []


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "1", "CMYK", "YCbCr", "P"])
def test_every_mode_becomes_rgb(mode):
    gray = np.linspace(0, 255, 64).reshape(8, 8)
    if mode == "I;16":
        im = Image.fromarray((gray * 257).astype(np.uint16))
    elif mode == "I":
        im = Image.fromarray((gray * 257).astype(np.int32))
    elif mode == "F":
        im = Image.fromarray((gray / 255).astype(np.float32))
    else:
        im = Image.fromarray(gray.astype(np.uint8)).convert(mode)
    assert im.mode == mode
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode in ("I;16", "I", "F", "L"):
        np.testing.assert_allclose(np.asarray(out)[..., 0], gray, atol=1)


def swapped_primaries_profile(srgb: bytes) -> bytes:
    """An RGB profile that is not sRGB: sRGB with its red and green primaries exchanged, renamed."""
    b = bytearray(srgb)
    tags = {}
    for i in range(struct.unpack(">I", b[128:132])[0]):
        sig, off, size = struct.unpack(">4sII", b[132 + 12 * i:144 + 12 * i])
        tags[sig] = (off, size)
    (r, n), (g, _) = tags[b"rXYZ"], tags[b"gXYZ"]
    b[r:r + n], b[g:g + n] = b[g:g + n], b[r:r + n]
    return bytes(b).replace("sRGB".encode("utf-16-be"), "wide".encode("utf-16-be"))


def test_icc_profile_is_converted_to_srgb():
    pixels = Image.new("RGB", (4, 4), (120, 60, 200))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    unchanged = decode(encode(pixels, "PNG", icc_profile=srgb), max_megapixels=1)
    assert unchanged.image.getpixel((0, 0)) == (120, 60, 200) and not unchanged.notes
    converted = decode(encode(pixels, "PNG", icc_profile=swapped_primaries_profile(srgb)), max_megapixels=1)
    assert not converted.notes and converted.image.mode == "RGB"
    r, g, b = converted.image.getpixel((0, 0))
    assert g > r  # the first channel meant green: in sRGB the pixel is greener than red
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # no RGB transform exists
    kept = decode(encode(pixels, "PNG", icc_profile=lab), max_megapixels=1)
    assert kept.image.getpixel((0, 0)) == (120, 60, 200) and kept.notes[0].startswith("ICC profile ignored")


def test_broken_files_are_rejected_with_a_kind():
    with pytest.raises(Rejected, match="not an image") as e:
        decode(b"hello, not a photo", max_megapixels=1)
    assert e.value.kind == "not an image"
    data = encode(blocks(3, (320, 240)), "JPEG")
    with pytest.raises(Rejected, match="truncated or corrupt JPEG") as e:
        decode(data[: len(data) // 2], max_megapixels=1)
    assert e.value.kind == "unreadable"


def test_heic_with_pillow_heif():
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()  # to write the test file; decode registers it by itself
    photo = blocks(4, (128, 96))
    dec = decode(encode(photo, "HEIF", quality=95), max_megapixels=1)
    assert dec.original_size == (128, 96)
    assert np.abs(np.asarray(dec.image, dtype=float) - np.asarray(photo, dtype=float)).mean() < 12


def test_heic_without_pillow_heif_names_the_extra(monkeypatch):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    data = encode(blocks(5, (64, 64)), "HEIF")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` now raises ImportError
    with pytest.raises(Rejected, match=r"pillow-heif is not installed: pip install finetune\[heif\]") as e:
        decode(data, max_megapixels=1)
    assert e.value.kind == "unsupported"

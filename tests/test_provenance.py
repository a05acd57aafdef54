"""Provenance in every generated PNG, read back with Pillow, and `finetune verify`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.provenance import GenerationInfo, check_image, read_provenance, save_generated_png

INFO = GenerationInfo(prompt="a photo of ohwx person", negative_prompt="blurry, lowres", steps=30, sampler="DPM++ 2M",
                      cfg_scale=6.5, seed=1234, width=256, height=256, model_name="sd15", model_hash="abcdef0123456789",
                      loras=[("ohwx-run", 0.8)], extra={"Checkpoint": "step-000200"})


def photo(example_photos: Path, size: int = 256) -> Image.Image:
    with Image.open(example_photos / "IMG_0005.jpg") as im:
        return ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (size, size), Image.LANCZOS)


def test_parameters_text_is_a1111s():
    assert INFO.parameters() == (
        "a photo of ohwx person <lora:ohwx-run:0.8>\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 30, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 1234, Size: 256x256, Model hash: abcdef0123, "
        "Model: sd15, Checkpoint: step-000200, Software: finetune")


def test_png_chunks_are_read_back_with_pillow(example_photos, tmp_path):
    path = save_generated_png(photo(example_photos), tmp_path / "out" / "a.png", INFO)
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temporary left behind
    with Image.open(path) as im:
        assert im.info["parameters"] == INFO.parameters()
        assert im.info["Software"] == "finetune"
        xmp = im.info["XML:com.adobe.xmp"]
    assert 'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"' in xmp
    assert "<rdf:li xml:lang=\"x-default\">a photo of ohwx person</rdf:li>" in xmp
    assert read_provenance(path) == {"parameters": INFO.parameters(), "software": "finetune", "ai_label": True}


def test_check_image_fresh_png_jpeg_and_foreign_image(example_photos, tmp_path):
    png = save_generated_png(photo(example_photos), tmp_path / "a.png", INFO)
    fresh = check_image(png)
    assert fresh.watermark.detected and fresh.parameters == INFO.parameters() and fresh.ai_label

    with Image.open(png) as im:
        im.convert("RGB").save(tmp_path / "a.jpg", quality=90)
    jpeg = check_image(tmp_path / "a.jpg")
    assert jpeg.watermark.detected and jpeg.watermark.payload == b"finetune"
    assert jpeg.parameters is None and not jpeg.ai_label  # text chunks don't survive JPEG; the mark does

    photo(example_photos).save(tmp_path / "mine.png")
    foreign = check_image(tmp_path / "mine.png")
    assert not foreign.watermark.detected and foreign.parameters is None and not foreign.ai_label

    unmarked = save_generated_png(photo(example_photos), tmp_path / "b.png", INFO, watermark=False)
    assert not check_image(unmarked).watermark.detected and check_image(unmarked).ai_label


def test_verify_command(example_photos, tmp_path):
    png = save_generated_png(photo(example_photos, 512), tmp_path / "a.png", INFO)
    with Image.open(png) as im:
        im.convert("RGB").save(tmp_path / "a.jpg", quality=90)
    photo(example_photos, 512).save(tmp_path / "mine.png")
    result = CliRunner().invoke(cli, ["verify", str(png), str(tmp_path / "a.jpg"), str(tmp_path / "mine.png")])
    assert result.exit_code == 0, result.output
    fresh, jpeg, foreign = result.output.split("\n\n")
    assert fresh.startswith(f"{png}  [PNG 512x512]")
    assert "  parameters: a photo of ohwx person <lora:ohwx-run:0.8>\n              Negative prompt: blurry, lowres\n" in fresh
    assert "AI label:   XMP Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia" in fresh
    assert 'watermark:  detected: "finetune" in ' in fresh and "(0 of 64 bits off)" in fresh
    assert "[JPEG 512x512]" in jpeg and "parameters: none" in jpeg and 'watermark:  detected: "finetune"' in jpeg
    assert "parameters: none" in foreign and "AI label:   none" in foreign
    assert "watermark:  not detected (the closest reading is" in foreign


def test_verify_prints_the_watermark_as_text_not_a_bytes_repr(example_photos, tmp_path):
    """Issue 13 item 20: `verify` printed `detected: b'finetune'`, a Python bytes repr."""
    png = save_generated_png(photo(example_photos, 256), tmp_path / "a.png", INFO)
    result = CliRunner().invoke(cli, ["verify", str(png)])
    assert result.exit_code == 0, result.output
    assert 'watermark:  detected: "finetune" in ' in result.output and "b'" not in result.output


def test_verify_reports_unreadable_files(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(FinetuneError, match=r"notes.png cannot be read as an image"):
        check_image(tmp_path / "notes.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "tiny.png")
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "tiny.png"), str(tmp_path / "notes.png")])
    assert result.exit_code == 1
    assert "watermark:  not detected (32x32 is too small to hold a mark)" in result.output
    assert "error: " in result.output and "notes.png cannot be read as an image" in result.output

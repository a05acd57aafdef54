"""Reading a run's review images and their settings from the PNGs' A1111 parameters."""

import os

from PIL import Image

from finetune.provenance import GenerationInfo, save_generated_png
from finetune.review.images import parse_parameters, scan_run

GALLERY = "gallery/20250101-120000/p01/scale-0_8-seed1.png"


def test_parse_parameters_round_trips_generation_info():
    info = GenerationInfo(prompt="a photo of ohwx person, smiling", negative_prompt="blurry, low quality", steps=30,
                          sampler="Euler a", cfg_scale=6.5, seed=1234, width=512, height=768, model_hash="ab" * 32,
                          loras=[("me", 0.75), ("style", 1.0)], extra={"Checkpoint": "step-000200", "Note": "a: b, c"})
    p = parse_parameters(info.parameters())
    assert p["prompt"] == "a photo of ohwx person, smiling"
    assert p["negative_prompt"] == "blurry, low quality"
    assert p["loras"] == [("me", 0.75), ("style", 1.0)]
    s = p["settings"]
    keys = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
    assert [s[k] for k in keys] == ["30", "Euler a", "6.5", "1234", "512x768"]
    assert s["Checkpoint"] == "step-000200" and s["Note"] == "a: b, c" and s["Software"] == "finetune"


def test_parse_parameters_without_settings_line_is_all_prompt():
    p = parse_parameters("just a prompt, with: colons")
    assert p["prompt"] == "just a prompt, with: colons" and p["settings"] == {} and p["loras"] == []


def test_scan_finds_samples_and_gallery_with_their_settings(fake_run):
    scan = scan_run(fake_run)
    paths = [img.path for img in scan.images]
    assert paths == ["samples/step-000100/0-1.png", "samples/step-000100/0-2.png", "samples/step-000100/1-1.png",
                     "samples/step-000200/0-1.png", "samples/step-000200/1-1.png", GALLERY]
    by = {img.path: img for img in scan.images}
    first = by["samples/step-000100/0-1.png"]
    assert (first.prompt, first.seed, first.scale) == ("a photo of ohwx person", 1, 1.0)
    assert first.checkpoint == "step-000100"
    assert first.negative_prompt == "blurry" and first.steps == 4 and first.size == "64x64"
    assert by["samples/step-000100/0-2.png"].checkpoint == "step-000100"  # from the folder name
    gallery = by[GALLERY]
    assert gallery.scale == 0.8 and gallery.checkpoint is None and gallery.loras == (("run", 0.8),)
    assert len({img.sha256 for img in scan.images}) == 6
    assert scan.skipped == [
        ("gallery/grid.png", "no generation settings (no A1111 `parameters` text chunk)"),
        ("gallery/20250101-120000/p01/sheet.png",
         "a contact sheet of several images (`finetune sample` writes each image on its own too)")]


def test_scale_and_checkpoint_from_the_settings_finetune_sample_writes(tmp_path):
    # The base-model row of a sheet with an extra LoRA: the run's LoRA at 0, the row's scale in `LoRA scale`.
    info = GenerationInfo(prompt="p", seed=3, loras=[("run", 0.0), ("style", 0.0)],
                          extra={"LoRA scale": "0 (base model)", "Checkpoint": "step-000300"})
    save_generated_png(Image.new("RGB", (8, 8)), tmp_path / "gallery" / "g" / "p01" / "base-seed3.png", info,
                       watermark=False)
    (img,) = scan_run(tmp_path).images
    assert (img.scale, img.checkpoint, img.loras) == (0.0, "step-000300", (("run", 0.0), ("style", 0.0)))


def test_scan_skips_links_out_of_the_run_and_rereads_only_changed_files(fake_run, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, fake_run / "samples" / "step-000100" / "9-9.png")
    cache = {}
    scan = scan_run(fake_run, cache)
    assert ("samples/step-000100/9-9.png", "a link to a file outside the run folder") in scan.skipped
    assert "samples/step-000100/9-9.png" not in [img.path for img in scan.images]

    before = cache[GALLERY][2]
    again = scan_run(fake_run, cache)
    assert cache[GALLERY][2] is before and again.images == scan.images
    (fake_run / GALLERY).unlink()
    assert len(scan_run(fake_run, cache).images) == 5
    assert GALLERY not in cache


def test_scan_of_a_run_without_samples_is_empty(tmp_path):
    assert scan_run(tmp_path).images == []

"""prepare on the bundled photos: faces, upright crops, captions, manifest, report, re-runs, caching."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import finetune.data.prepare as prepare_module
from finetune.data.prepare import prepare
from finetune.errors import FinetuneError

from photo_helpers import blocks, config, folder_bytes, tree_state

CONTRACT_KEYS = {"image", "caption", "source", "source_sha256", "sha256", "original_size", "crop_box", "face_box",
                 "faces", "bucket"}


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_example_photos_faces_crops_captions(prepared, example_photos):
    out = prepared.out
    rows = manifest(out)
    assert prepared.kept == 6 and not prepared.rejected
    assert [r["image"] for r in rows] == [f"images/{n:04d}.png" for n in range(1, 7)]
    assert [r["source"].rsplit("/", 1)[1] for r in rows] == sorted(p.name for p in example_photos.glob("IMG_*"))
    for row in rows:
        assert CONTRACT_KEYS <= row.keys()
        assert row["faces"] >= 1 and row["face_box"] is not None, row["source"]
        x, y, w, h = row["face_box"]
        left, top, right, bottom = row["crop_box"]
        assert left <= x and top <= y and x + w <= right and y + h <= bottom, row  # the face is in the crop
        assert right - left == bottom - top  # square
        assert 0 <= left and 0 <= top and right <= row["original_size"][0] and bottom <= row["original_size"][1]
        assert (right - left) == pytest.approx(max(w, h) / 0.35, abs=2) or right - left == min(row["original_size"])
        png = out / row["image"]
        with Image.open(png) as im:
            assert im.size == (512, 512) == tuple(row["bucket"]) and im.mode == "RGB"
        assert (out / row["image"]).with_suffix(".txt").read_text() == "a photo of ohwx person" == row["caption"]
        assert hashlib.sha256(png.read_bytes()).hexdigest() == row["sha256"]
        assert hashlib.sha256(open(row["source"], "rb").read()).hexdigest() == row["source_sha256"]
    assert rows[2]["original_size"] == [472, 360]  # IMG_0003 after EXIF orientation (stored 360x472)
    data = json.loads((out / "dataset.json").read_text())
    assert data["schema"] == 1 and data["tool"] == "finetune" and data["settings"]["crop"] == "face"
    assert data["counts"]["kept"] == 6 and data["counts"]["faces"]["found"] == 6
    assert prepared.summary == f"kept 6 of 6 photos; report: {out / 'report.html'}"


def test_report_lists_every_input(prepared, example_photos):
    html = (prepared.out / "report.html").read_text()
    for p in example_photos.iterdir():
        assert p.name in html  # the six photos, and README.md among the ignored files
    assert "not an image file type (.md)" in html
    assert html.count("data:image/jpeg;base64,") == 12  # the source with its boxes + the crop, per photo
    assert "a photo of ohwx person" in html and "kept 6 of 6 photos" in html


def test_exif_rotated_photo_comes_out_upright(prepared, example_photos):
    """IMG_0003 is IMG_0001's pixels (40, 0, 512, 360) stored sideways: its crop must match that region upright."""
    row = manifest(prepared.out)[2]
    crop = np.asarray(Image.open(prepared.out / row["image"]), dtype=np.float32)
    l, t, r, b = row["crop_box"]
    ref = Image.open(example_photos / "IMG_0001.jpg").convert("RGB").crop((l + 40, t, r + 40, b))
    ref = np.asarray(ref.resize(crop.shape[1::-1], Image.Resampling.LANCZOS), dtype=np.float32)
    upright = np.abs(crop - ref).mean()
    sideways = min(np.abs(np.rot90(crop, k) - ref).mean() for k in (1, 3))
    assert upright < 8 and sideways > 4 * upright, (upright, sideways)


def test_rerun_is_a_noop(prepared, example_photos):
    before = folder_bytes(prepared.out)
    again = prepare(example_photos, prepared.out, config(), progress=False)
    assert again.processed == 0 and again.reused == 6
    assert folder_bytes(prepared.out) == before  # same bytes, and not even rewritten (same mtimes)


def test_rebuilt_from_scratch_byte_identical(prepared, example_photos, tmp_path):
    """No timestamps or other run-dependent bytes in any file: a fresh run elsewhere writes the same files."""
    copy = tmp_path / prepared.out.name
    shutil.copytree(prepared.out, copy)
    shutil.rmtree(copy / ".prepare-cache")
    (copy / "images" / "0003.png").unlink()
    (copy / "report.html").write_text("stale")
    result = prepare(example_photos, copy, config(), progress=False)
    assert result.processed == 6
    fresh, original = folder_bytes(copy), folder_bytes(prepared.out)
    assert fresh.keys() == original.keys()
    for k in fresh:  # report.html names its own path in the summary line
        assert fresh[k][0].replace(str(copy).encode(), b"") == original[k][0].replace(str(prepared.out).encode(), b""), k


def test_caption_change_reuses_crops(photos_copy, tmp_path):
    out = tmp_path / "ds"
    first = prepare(photos_copy, out, config(), progress=False)
    assert first.processed == 6
    pngs = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "images").glob("*.png")}
    second = prepare(photos_copy, out, config(caption_template="[trigger] [class], portrait", trigger="zwx"),
                     progress=False)
    assert second.processed == 0 and second.reused == 6  # no photo decoded again
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "images").glob("*.png")} == pngs
    assert (out / "images" / "0001.txt").read_text() == "zwx person, portrait"
    assert manifest(out)[0]["caption"] == "zwx person, portrait"


def test_changed_inputs_rebuild_only_what_changed(photos_copy, tmp_path):
    out = tmp_path / "ds"
    (photos_copy / "IMG_0004.png").rename(tmp_path / "IMG_0004.png")
    first = prepare(photos_copy, out, config(), progress=False)
    assert first.kept == 5 and manifest(out)[3]["source"].endswith("IMG_0005.jpg")
    shutil.copy(tmp_path / "IMG_0004.png", photos_copy / "IMG_0004.png")
    second = prepare(photos_copy, out, config(), progress=False)
    assert (second.processed, second.reused, second.kept) == (1, 5, 6)
    assert [r["source"][-12:] for r in manifest(out)] == [f"IMG_000{i}.{'png' if i == 4 else 'jpg'}" for i in range(1, 7)]
    (photos_copy / "IMG_0002.jpg").unlink()
    third = prepare(photos_copy, out, config(), progress=False)
    assert (third.processed, third.kept) == (0, 5)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"000{i}.{e}" for i in range(1, 6) for e in ("png", "txt")]
    assert len(list((out / ".prepare-cache").glob("*.json"))) == 5  # the dropped photo's cache entry is gone
    # a crop setting changes every crop
    fourth = prepare(photos_copy, out, config(face_share=0.5), progress=False)
    assert fourth.processed == 5


def test_edited_captions_survive_reruns(photos_copy, tmp_path):
    out = tmp_path / "ds"
    prepare(photos_copy, out, config(), progress=False)
    mine = "ohwx person laughing, red hair\n"
    (out / "images" / "0002.txt").write_text(mine)
    # a new photo sorted first shifts the numbering: the edit follows its photo (now 0003)
    blocks(1, (400, 400)).save(photos_copy / "AAA.png")
    result = prepare(photos_copy, out, config(caption_template="portrait of [trigger] [class]"), progress=False)
    rows = manifest(out)
    assert rows[2]["source"].endswith("IMG_0002.jpg") and rows[2]["caption_edited"]
    assert (out / "images" / "0003.txt").read_text() == mine and rows[2]["caption"] == mine.strip()
    assert (out / "images" / "0004.txt").read_text() == "portrait of ohwx person"
    assert result.counts["captions_edited"] == 1
    assert "caption edited by you" in (out / "report.html").read_text()
    prepare(photos_copy, out, config(caption_template="portrait of [trigger] [class]"), overwrite_captions=True,
            progress=False)
    assert (out / "images" / "0003.txt").read_text() == "portrait of ohwx person"
    assert not manifest(out)[2]["caption_edited"]


def test_same_result_with_one_or_two_workers(example_photos, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "POOL_MIN_PHOTOS", 2)  # use the pool even for six photos
    results = {}
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        monkeypatch.chdir(tmp_path / str(n))  # same relative output path: same summary line in the report
        results[n] = prepare(example_photos, Path("ds"), config(workers=n), progress=False)
    assert results[1].processed == results[2].processed == 6
    a, b = folder_bytes(tmp_path / "1" / "ds"), folder_bytes(tmp_path / "2" / "ds")
    assert a.keys() == b.keys()
    differ = sorted(str(k) for k in a if a[k][0] != b[k][0])
    assert differ == ["dataset.json", "report.html"]  # they record the settings used, workers included
    page = {n: (tmp_path / str(n) / "ds" / "report.html").read_text() for n in (1, 2)}
    assert page[1].replace("<td>data.workers</td><td><code>1</code>", "") == \
        page[2].replace("<td>data.workers</td><td><code>2</code>", "")


def test_center_and_none_crops(example_photos, tmp_path):
    center = prepare(example_photos, tmp_path / "c", config(crop="center", resolution=256), progress=False)
    for row in manifest(center.out):
        w, h = row["original_size"]
        l, t, r, b = row["crop_box"]
        assert r - l == b - t == min(w, h) and row["bucket"] == [256, 256] and row["face_box"] is None
    whole = prepare(example_photos, tmp_path / "n", config(crop="none", resolution=256), progress=False)
    for row in manifest(whole.out):
        bw, bh = row["bucket"]
        w, h = row["original_size"]
        l, t, r, b = row["crop_box"]
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 256 * 256
        assert (r - l) / (b - t) == pytest.approx(bw / bh, rel=0.01)
        assert (r - l == w) or (b - t == h)  # only one dimension is trimmed
        assert Image.open(whole.out / row["image"]).size == (bw, bh)
    sizes = {row["source"][-12:]: tuple(row["bucket"]) for row in manifest(whole.out)}
    # at 256 px the buckets nearest 4:3 and 3:4 are 320x192 and 192x320 (256x192 is not as large as fits)
    assert sizes["IMG_0001.jpg"] == (256, 256) and sizes["IMG_0006.jpg"] == (320, 192)
    assert sizes["IMG_0002.jpg"] == (192, 320)


def test_quality_checks_and_summary(example_photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo = Image.open(example_photos / "IMG_0001.jpg")
    photo.save(src / "a.png")
    photo.save(src / "b_copy.png", compress_level=9)  # exact duplicate: other bytes, the same pixels
    photo.save(src / "c_recompressed.jpg", quality=70)  # near-duplicate
    photo.filter(ImageFilter.GaussianBlur(4)).save(src / "d_blurry.png")
    photo.resize((100, 100)).save(src / "e_small.png")
    one_off = photo.convert("RGB")
    one_off.putpixel((5, 5), (0, 0, 0))
    one_off.save(src / "f_one_pixel.png")  # same size and perceptual hash, one pixel differs: not "same pixels"
    assert (src / "a.png").read_bytes() != (src / "b_copy.png").read_bytes()
    result = prepare(src, tmp_path / "ds", config(), progress=False)
    reasons = {p.name: why for p, why in result.rejected}
    assert result.kept == 1 and manifest(result.out)[0]["source"].endswith("a.png")
    assert reasons["b_copy.png"] == "duplicate of a.png (same pixels)"
    assert reasons["c_recompressed.jpg"].startswith("near-duplicate of a.png")
    assert reasons["f_one_pixel.png"].startswith("near-duplicate of a.png (perceptual hashes differ in 0 of 64")
    assert reasons["d_blurry.png"].startswith("blurry: sharpness")
    assert reasons["e_small.png"].startswith("too small: 100x100")
    assert result.summary == (f"kept 1 of 6 photos: 2 near-duplicates, 1 too small, 1 blurry, 1 duplicate; "
                              f"report: {tmp_path / 'ds' / 'report.html'}")
    # thresholds live in the config: relaxed, everything but the exact copy is kept
    relaxed = prepare(src, tmp_path / "ds2", config(blur_threshold=0, near_duplicate_distance=0, min_side=64),
                      progress=False)
    assert relaxed.kept == 5 and [why for _, why in relaxed.rejected] == ["duplicate of a.png (same pixels)"]


def test_no_face_fallback_require_face_and_several_faces(example_photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    blocks(3, (320, 320)).save(src / "no_face.png")
    face = Image.open(example_photos / "IMG_0001.jpg").convert("RGB")
    group = Image.new("RGB", (1000, 600), (90, 110, 120))
    group.paste(face.resize((500, 500)), (20, 70))  # the bigger face
    group.paste(face.resize((420, 420)), (560, 200))
    group.save(src / "two_faces.png")
    result = prepare(src, tmp_path / "ds", config(), progress=False)
    rows = {r["source"].rsplit("/", 1)[1]: r for r in manifest(result.out)}
    assert rows["no_face.png"]["face_box"] is None and "no face found: centre crop" in rows["no_face.png"]["notes"]
    two = rows["two_faces.png"]
    assert two["faces"] == 2 and two["face_box"][0] < 400  # the larger, left face
    assert "2 faces found: framed the largest" in two["notes"]
    assert "2 faces found: framed the largest" in (result.out / "report.html").read_text()
    strict = prepare(src, tmp_path / "ds2", config(require_face=True), progress=False)
    assert [(p.name, why) for p, why in strict.rejected] == [("no_face.png", "no face found, and data.require_face = true")]


def test_no_usable_photo_is_an_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_text("not a photo")
    Image.new("RGB", (8, 8)).save(src / "b.png")
    with pytest.raises(FinetuneError, match=r"no usable photo in .*\(1 not an image, 1 too small\)"):
        prepare(src, tmp_path / "ds", config(), progress=False)
    assert not (tmp_path / "ds").exists()
    (src / "a.jpg").unlink(), (src / "b.png").unlink()
    (src / "notes.txt").write_text("hello")
    with pytest.raises(FinetuneError, match="no photos found in"):
        prepare(src, tmp_path / "ds", config(), progress=False)


def test_folder_checks(example_photos, photos_copy, tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "ds", config())
    with pytest.raises(FinetuneError, match="is a file"):
        prepare(example_photos / "IMG_0001.jpg", tmp_path / "ds", config())
    before = tree_state(photos_copy)
    for inside in (photos_copy, photos_copy / "out", photos_copy / "sub" / "deeper"):
        with pytest.raises(FinetuneError, match="inside the source folder"):
            prepare(photos_copy, inside, config())
    with pytest.raises(FinetuneError, match="contains the source folder"):
        prepare(photos_copy, tmp_path, config())
    assert tree_state(photos_copy) == before
    stranger = tmp_path / "documents"
    stranger.mkdir()
    (stranger / "thesis.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not a prepared dataset"):
        prepare(example_photos, stranger, config())
    assert [p.name for p in stranger.iterdir()] == ["thesis.txt"]


@pytest.mark.parametrize("bad", ["bad.png", "0_bad.png"])  # analysed last, or first (the rest then need a new pool)
def test_a_worker_crash_loses_only_that_photo(example_photos, tmp_path, monkeypatch, bad):
    src = tmp_path / "src"
    shutil.copytree(example_photos, src)
    blocks(2, (400, 400)).save(src / bad)
    # named, so the pool's fresh workers import it; there, process_photo is the real one
    monkeypatch.setattr(prepare_module, "WORKER", "photo_helpers:crash_on_bad")
    monkeypatch.setattr(prepare_module, "POOL_MIN_PHOTOS", 2)
    result = prepare(src, tmp_path / "ds", config(workers=2), progress=False)
    assert result.kept == 6
    assert [(p.name, why) for p, why in result.rejected] == [
        (bad, "the worker reading it crashed (a decoder bug, or out of memory)")]

def test_item1_a_dataset_from_another_folder_is_not_replaced_without_replace(photos_copy, tmp_path):
    out = tmp_path / "ds"
    prepare(photos_copy, out, config(), progress=False)
    (out / "images" / "0002.txt").write_text("ohwx person laughing")
    before = folder_bytes(out)
    other = tmp_path / "other" / "photos"
    other.mkdir(parents=True)
    shutil.copy(photos_copy / "IMG_0001.jpg", other / "a.jpg")
    with pytest.raises(prepare_module.SourceMismatch) as e:
        prepare(other, out, config(), progress=False)
    assert str(e.value) == (f"{out} holds a dataset prepared from {photos_copy.resolve()}, not from {other}: prepare "
                            f"these photos under another name (--out {tmp_path / 'ds-2'}), or add --replace to "
                            "replace that dataset")
    assert folder_bytes(out) == before  # nothing written, not even the cache
    (tmp_path / "ds-2").mkdir()  # taken: the next free name is offered
    with pytest.raises(prepare_module.SourceMismatch, match=r"\(--out .*ds-3\)"):
        prepare(other, out, config(), progress=False)
    # the same folder again is the normal update; another one with the flag replaces the dataset
    assert prepare(photos_copy, out, config(), progress=False).kept == 6
    assert prepare(other, out, config(), replace=True, progress=False).kept == 1
    assert json.loads((out / "dataset.json").read_text())["source"] == str(other.resolve())


def test_item3_a_new_trigger_is_written_into_edited_captions_too(photos_copy, tmp_path):
    out = tmp_path / "ds"
    prepare(photos_copy, out, config(), progress=False)
    (out / "images" / "0002.txt").write_text("ohwx person laughing, red hair\n")
    (out / "images" / "0003.txt").write_text("a man at the beach\n")  # edited, and without the word
    result = prepare(photos_copy, out, config(trigger="sks"), progress=False)
    assert (out / "images" / "0001.txt").read_text() == "a photo of sks person"  # not edited: generated anew
    assert (out / "images" / "0002.txt").read_text() == "sks person laughing, red hair\n"  # the edit, with the new word
    assert (out / "images" / "0003.txt").read_text() == "a man at the beach\n"
    rows = manifest(out)
    assert rows[1]["caption"] == "sks person laughing, red hair" and rows[1]["caption_edited"]
    assert result.summary == (f"kept 6 of 6 photos; 4 captions rewritten for data.trigger = 'sks' (was 'ohwx'); "
                              f"1 edited caption now says 'sks' instead of 'ohwx'; report: {out / 'report.html'}")
    assert "changed from &#x27;ohwx&#x27; to data.trigger = &#x27;sks&#x27;" in (out / "report.html").read_text()
    again = prepare(photos_copy, out, config(trigger="sks"), progress=False)  # done once: a re-run changes nothing
    assert again.summary == f"kept 6 of 6 photos; report: {out / 'report.html'}"
    assert (out / "images" / "0002.txt").read_text() == "sks person laughing, red hair\n"


def test_captions_rewritten_by_changed_caption_settings_are_counted_in_the_summary(photos_copy, tmp_path):
    """The README prepares with --set data.class_word=woman; its table's `finetune prepare ~/Pictures/me
    --name me` then rewrote every caption to 'person' and said nothing."""
    out = tmp_path / "ds"
    prepare(photos_copy, out, config(class_word="woman"), progress=False)
    (out / "images" / "0002.txt").write_text("ohwx woman laughing\n")  # an edit: kept, so not counted
    again = prepare(photos_copy, out, config(), progress=False)
    assert again.summary == (f"kept 6 of 6 photos; 5 captions rewritten for data.class_word = 'person' (was "
                             f"'woman'); report: {out / 'report.html'}")
    assert (out / "images" / "0001.txt").read_text() == "a photo of ohwx person"
    assert (out / "images" / "0002.txt").read_text() == "ohwx woman laughing\n"
    assert prepare(photos_copy, out, config(), progress=False).summary == f"kept 6 of 6 photos; report: {out / 'report.html'}"
    html = (out / "report.html").read_text()  # its settings as a preset writes them, not Python's repr
    assert "<td>data.class_word</td><td><code>&quot;person&quot;</code>" in html
    assert "<td>data.require_face</td><td><code>false</code>" in html and "False" not in html


def test_item13_photos_without_a_face_are_visible_at_a_glance(example_photos, tmp_path):
    from skimage import data as skdata
    from PIL import ImageDraw

    from finetune.config import load_preset, PRESETS_DIR

    src = tmp_path / "src"
    src.mkdir()
    for name in ("IMG_0001.jpg", "IMG_0002.jpg", "IMG_0003.jpg"):  # three portraits
        shutil.copy(example_photos / name, src / name)
    Image.fromarray(skdata.chelsea()).save(src / "cat.png")  # a cat: no (human) face
    shot = Image.new("RGB", (800, 500), (245, 245, 245))  # a screenshot: text lines and a button
    draw = ImageDraw.Draw(shot)
    for y in range(40, 440, 28):
        draw.text((30, y), "Settings  >  Account  >  Privacy and security  " * 2, fill=(20, 20, 20))
    draw.rectangle((600, 420, 760, 470), fill=(30, 110, 220))
    shot.save(src / "screenshot.png")
    result = prepare(src, tmp_path / "ds", config(resolution=128), progress=False)
    assert result.kept == 5, result.rejected
    assert result.summary == ("kept 5 of 5 photos; 2 kept without a face (centre-cropped: check them in the report); "
                              f"report: {tmp_path / 'ds' / 'report.html'}")
    html = (tmp_path / "ds" / "report.html").read_text()
    assert html.count('class="card warn"') == 2  # those two cards stand out, the three portraits do not
    box = html.split('<p class="warn-box">', 1)[1].split("</p>", 1)[0]
    assert box.startswith("Kept without a face (2): ") and "cat.png" in box and "screenshot.png" in box
    assert "IMG_000" not in box
    # the person presets keep them (and say why); require_face = true rejects them instead
    for preset in sorted(PRESETS_DIR.glob("person-*.toml")):
        text = preset.read_text()
        assert "\n# remove them from the folder, or set require_face = true" in text and "\nrequire_face = false\n" in text
        assert load_preset(preset.stem).data.require_face is False
    strict = prepare(src, tmp_path / "ds2", config(resolution=128, require_face=True), progress=False)
    assert sorted(p.name for p, _ in strict.rejected) == ["cat.png", "screenshot.png"]
    assert "without a face" in strict.summary and "kept without a face" not in strict.summary


def test_item14_a_near_duplicate_group_keeps_the_photo_with_the_most_detail_and_says_why(tmp_path):
    from skimage import data as skdata

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    # the original: 2048 px with sensor grain (fine detail that only the full-size file has)
    big = np.asarray(Image.fromarray(skdata.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC), np.float32)
    original = Image.fromarray(np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8))
    original.save(src / "IMG_0001.jpg", quality=95)
    # its derivative: shared at 640 px, upscaled to 2200 px (more pixels than the original), and
    # stored sideways with an EXIF orientation tag, as a phone app would
    derivative = original.resize((640, 640), Image.Resampling.LANCZOS).resize((2200, 2200), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    derivative.transpose(Image.Transpose.ROTATE_90).save(src / "0_upscaled.jpg", quality=95, exif=exif)
    result = prepare(src, tmp_path / "ds", config(resolution=128), progress=False)
    rows = manifest(result.out)
    assert [r["source"].rsplit("/", 1)[1] for r in rows] == ["IMG_0001.jpg"]
    (path, why), = result.rejected
    assert path.name == "0_upscaled.jpg"
    assert why.startswith("near-duplicate of IMG_0001.jpg (perceptual hashes differ in ")
    assert "; kept IMG_0001.jpg: more detail (sharpness " in why and "the other looks upscaled or blurred)" in why
    html = (result.out / "report.html").read_text()
    assert "kept as the best of its near-identical photos: over 0_upscaled.jpg, more detail (sharpness" in html
    # a smaller copy with (nearly) as much detail: the larger is kept, and the report says so
    original.resize((1600, 1600), Image.Resampling.LANCZOS).save(src / "0_upscaled.jpg", quality=95)
    smaller = prepare(src, tmp_path / "ds2", config(resolution=128), progress=False)
    assert [(p.name, why.split("; kept ")[1]) for p, why in smaller.rejected] == [
        ("0_upscaled.jpg", "IMG_0001.jpg: larger (2048x2048 vs 1600x1600)")]


def test_item15_byte_identical_copies_are_known_by_their_hash_and_not_decoded_again(photos_copy, tmp_path, monkeypatch):
    from finetune.data import process

    shutil.copytree(photos_copy, photos_copy / "copy")  # the folder copied into itself
    decoded = []

    def counting(path, settings):
        decoded.append(Path(path).relative_to(photos_copy))
        return process.process_photo(path, settings)

    monkeypatch.setattr(prepare_module, "WORKER", f"{__name__}:_counting_worker")
    monkeypatch.setattr(prepare_module, "same_pixels", lambda *a: pytest.fail("decoded again to compare pixels"))
    monkeypatch.setattr(prepare_module, "measure_detail", lambda *a: pytest.fail("decoded again to compare detail"),
                        raising=False)
    _COUNTING.append(counting)
    try:
        result = prepare(photos_copy, tmp_path / "ds", config(), progress=False)
        assert sorted(decoded) == sorted(Path(p.name) for p in photos_copy.glob("IMG_*"))  # each photo once
        assert result.kept == 6 and result.processed == 6
        assert sorted((p.relative_to(photos_copy), why) for p, why in result.rejected) == [
            (Path("copy") / p.name, f"duplicate of {p.name} (the same file: identical bytes)")
            for p in sorted(photos_copy.glob("IMG_*"))]
        decoded.clear()
        again = prepare(photos_copy, tmp_path / "ds", config(), progress=False)  # cached: nothing decoded
        assert not decoded and again.kept == 6 and again.rejected == result.rejected
    finally:
        _COUNTING.clear()


_COUNTING: list = []


def _counting_worker(path, settings):
    """The photo worker, counting its calls (run in this process: the tests use one worker)."""
    return _COUNTING[0](path, settings)


UNGUARDED = """
from finetune.config import load_config
from finetune.data.prepare import prepare

print("script ran")
print(prepare({photos!r}, {out!r}, load_config("person-sd15-lora", []).data, progress=False).summary)
"""


def test_a_script_calling_prepare_without_a_main_guard_works(example_photos, tmp_path):
    """Worker processes do not import the caller's script again (multiprocessing's default for spawn and
    the fork server), so a script with no `if __name__ == "__main__":` neither runs twice nor kills them."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(photos=str(example_photos), out=str(tmp_path / "ds")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("script ran") == 1, r.stdout
    kept = re.search(r"kept (\d+) of (\d+) photos", r.stdout)
    assert kept and kept[1] == kept[2], r.stdout  # none lost to a dead worker
    assert int(kept[1]) >= prepare_module.POOL_MIN_PHOTOS  # so the photos went to worker processes

"""`finetune sample` on the tiny base with a run's random non-zero LoRA: sheets, determinism, scale 0 =
base, kohya = peft, several LoRAs, checkpoints, provenance, the gallery, errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.sample import LoraFile, Prompt, SheetSettings, parse_lora_arg, parse_size, read_prompts, sample
from finetune.watermark import embed_watermark
from finetune import runs
from helpers_run import make_fake_run  # noqa: E402  (tests/ is on sys.path under pytest)

STEPS = 3
SEEDS = [1, 2, 3]
SCALES = [0.0, 0.5, 1.0]
PROMPTS = ["a photo of [trigger] [class]", "a portrait of [trigger] as an astronaut"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread, and far faster than on two when the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("sample"), text_encoder=True)


@pytest.fixture(scope="module")
def tiny():
    """One tiny base for the whole module: sample() must leave it as it found it."""
    from finetune.models import load_base

    base = load_base("tiny")
    base.first_scheduler = base.pipe.scheduler
    return base


def settings(**kw) -> SheetSettings:
    return SheetSettings(**{**dict(seeds=SEEDS, scales=SCALES, steps=STEPS, width=64, height=64), **kw})


@pytest.fixture(scope="module")
def gallery(run, tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("galleries") / "main"
    return sample(run, base=tiny, prompts=[Prompt(PROMPTS[0], negative="blurry"), PROMPTS[1]],
                  settings=settings(), out=out, progress=False)


def record(gallery: Path) -> dict:
    return json.loads((gallery / "gallery.json").read_text())


def pixels(path_or_image) -> np.ndarray:
    im = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def bare_images(pipe, prompt: str, seeds=SEEDS, negative: str | None = None, steps: int = STEPS) -> list[Image.Image]:
    """What a plain diffusers call makes: same sampler (DDIM), one CPU generator per seed, one batch."""
    from diffusers import DDIMScheduler

    pipe = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe([prompt] * len(seeds), negative_prompt=[negative] * len(seeds) if negative else None,
                    num_inference_steps=steps, width=64, height=64,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images


# ---------------------------------------------------------------- sheets and the gallery
def test_contact_sheet_has_a_labelled_tile_per_scale_and_seed(gallery):
    rec = record(gallery)
    assert len(rec["prompts"]) == 2
    for n, p in enumerate(rec["prompts"], 1):
        layout = p["layout"]
        assert layout["row_labels"] == ["scale 0 (base)", "scale 0.5", "scale 1"]
        assert layout["column_labels"] == ["seed 1", "seed 2", "seed 3"]
        sheet = Image.open(gallery / p["sheet"])
        assert sheet.size == (layout["width"], layout["height"])
        boxes = layout["tiles"]
        assert len(boxes) == len(SCALES) and all(len(r) == len(SEEDS) for r in boxes)
        ink = pixels(sheet).sum(axis=2) < 200
        images = iter(p["images"])
        for r, row in enumerate(boxes):
            for c, (x0, y0, x1, y1) in enumerate(row):
                assert (x1 - x0, y1 - y0) == (64, 64)
                im = next(images)
                assert (im["row"], im["seed"]) == (layout["row_labels"][r], SEEDS[c])
                # the tile is that image (both carry a watermark of their own: a few levels apart)
                diff = np.abs(pixels(sheet.crop((x0, y0, x1, y1))) - pixels(gallery / im["file"]))
                assert diff.mean() < 3
            # text left of each row and above each column
            assert ink[y0:y1, : row[0][0]].any()
        for x0, y0, x1, _ in boxes[0]:
            assert ink[y0 - 20: y0, x0:x1].any()
        # tiles don't overlap and fill the grid in order
        assert boxes[0][1][0] > boxes[0][0][2] and boxes[1][0][1] > boxes[0][0][3]


def test_gallery_folders_follow_the_umask(gallery):
    """Issue 13 item 19: the gallery was renamed from a `mkdtemp` folder, which is owner-only (0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folders = {p: oct(p.stat().st_mode & 0o777) for p in [gallery, *gallery.rglob("*")] if p.is_dir()}
    assert set(folders.values()) == {oct(0o777 & ~umask)}, folders


def test_index_html_shows_the_sheet_larger_than_a_row_of_single_images(gallery):
    """Issue 13 item 20: the contact sheet was shown at its small natural size while each single image
    filled a third of the page. Now the sheet is the largest picture, and single images are thumbnails."""
    from finetune.gallery import index_html

    page = (gallery / "index.html").read_text()
    sheets = [int(w) for w in re.findall(r'<img src="p\d+/sheet.png" style="width: (\d+)px"', page)]
    grids = re.findall(r"grid-template-columns: repeat\((\d+), (\d+)px\)", page)
    assert len(sheets) == len(grids) == 2
    for sheet, (columns, thumb) in zip(sheets, grids):
        assert int(thumb) == 128  # 64 px images, twice their size
        assert sheet >= 720 and sheet > int(columns) * int(thumb)
    assert "minmax(0, 1fr)" not in page  # single images no longer stretch to the page's width
    # large images: thumbnails of 256 px, the sheet at its own size
    big = index_html("t", {}, [{"prompt": "p", "sheet": "p01/sheet.png", "columns": 3, "size": [1024, 1024],
                                "layout": {"width": 3200}, "images": []}])
    assert 'style="width: 3200px"' in big and "repeat(3, 256px)" in big


def test_every_image_is_a_png_with_its_settings(gallery, run):
    rec = record(gallery)
    files = sorted(p.relative_to(gallery).as_posix() for p in gallery.rglob("*.png"))
    listed = sorted([im["file"] for p in rec["prompts"] for im in p["images"]] + [p["sheet"] for p in rec["prompts"]])
    assert files == listed and len(files) == 2 * (len(SCALES) * len(SEEDS) + 1)
    base_hash = json.loads((run / "run.json").read_text())["base_hash"]
    first = rec["prompts"][0]["images"]
    half = next(im for im in first if im["scale"] == 0.5 and im["seed"] == 2)
    with Image.open(gallery / half["file"]) as im:
        text = im.info["parameters"]
        xmp = im.info["XML:com.adobe.xmp"]
    assert text.startswith("a photo of ohwx person <lora:ohwx-run:0.5>\nNegative prompt: blurry\n")
    for part in ("Steps: 3", "Sampler: DDIM", "CFG scale: 7.5", "Seed: 2", "Size: 64x64",
                 f"Model hash: {base_hash[:10]}", "Model: tiny", "LoRA scale: 0.5", 'Lora hashes: "ohwx-run: '):
        assert part in text
    assert "trainedAlgorithmicMedia" in xmp
    base = next(im for im in first if im["scale"] == 0 and im["seed"] == 1)
    assert "LoRA scale: 0 (base model)" in base["parameters"]
    with Image.open(gallery / rec["prompts"][1]["sheet"]) as sheet:
        assert sheet.info["parameters"].startswith("a portrait of ohwx as an astronaut\n")
        assert "Sheet rows: scale 0 (base); scale 0.5; scale 1, Sheet columns: seeds 1 2 3" in sheet.info["parameters"]
        assert "trainedAlgorithmicMedia" in sheet.info["XML:com.adobe.xmp"]


def test_index_html_links_every_image_with_its_settings(gallery):
    page = (gallery / "index.html").read_text()
    links = re.findall(r'href="([^"]+)"', page)
    assert links and all(not l.startswith(("/", "http")) and (gallery / l).is_file() for l in links)
    for p in record(gallery)["prompts"]:
        assert f'href="{p["sheet"]}"' in page
        for im in p["images"]:
            assert f'href="{im["file"]}"' in page
            assert f"Seed: {im['seed']}" in page
    assert "Negative prompt: blurry" in page and "a portrait of ohwx as an astronaut" in page
    assert not list(gallery.parent.glob(".*partial*"))


def test_base_row_is_the_base_model_and_the_base_is_left_as_found(gallery, tiny):
    """Scale 0 = the base model's own images, bit for bit (watermarked the same way)."""
    assert not getattr(tiny.pipe.unet, "peft_config", None) and not getattr(tiny.pipe.text_encoder, "peft_config", None)
    assert tiny.pipe.scheduler is tiny.first_scheduler
    expected = bare_images(tiny.pipe, "a photo of ohwx person", negative="blurry")
    images = record(gallery)["prompts"][0]["images"]
    for seed, image in zip(SEEDS, expected):
        im = next(i for i in images if i["scale"] == 0 and i["seed"] == seed)
        assert np.array_equal(pixels(gallery / im["file"]), pixels(embed_watermark(image)))
        tuned = next(i for i in images if i["scale"] == 1 and i["seed"] == seed)
        assert np.abs(pixels(gallery / tuned["file"]) - pixels(gallery / im["file"])).mean() > 5


def test_scale_1_is_the_trained_model(gallery):
    """The LoRA loaded from the run folder gives what the in-memory peft model gives."""
    from helpers_run import lora_pipe

    pipe = lora_pipe(text_encoder=True)
    expected = bare_images(pipe, "a photo of ohwx person", negative="blurry")
    images = record(gallery)["prompts"][0]["images"]
    for seed, image in zip(SEEDS, expected):
        im = next(i for i in images if i["scale"] == 1 and i["seed"] == seed)
        assert np.abs(pixels(gallery / im["file"]) - pixels(embed_watermark(image))).max() <= 2


# ---------------------------------------------------------------- determinism, layouts, several LoRAs
def same_images(a: Path, b: Path, tolerance: int = 0) -> None:
    ra, rb = record(a), record(b)
    for pa, pb in zip(ra["prompts"], rb["prompts"]):
        assert len(pa["images"]) == len(pb["images"])
        for ia, ib in zip(pa["images"], pb["images"]):
            assert (ia["row"], ia["seed"]) == (ib["row"], ib["seed"])
            assert np.abs(pixels(a / ia["file"]) - pixels(b / ib["file"])).max() <= tolerance, (ia, ib)


def test_same_seed_and_settings_give_the_same_image(run, tiny, tmp_path):
    kw = dict(base=tiny, prompts=[PROMPTS[0]], settings=settings(seeds=[5, 6], scales=[0, 1], watermark=False),
              progress=False)
    one = sample(run, out=tmp_path / "one", **kw)
    two = sample(run, out=tmp_path / "two", **kw)
    same_images(one, two)
    # one seed at a time (another batch) draws the same latents
    three = sample(run, out=tmp_path / "three", **{**kw, "settings": settings(seeds=[5, 6], scales=[0, 1],
                                                                            watermark=False, batch_size=1)})
    same_images(one, three, tolerance=1)
    a, b = record(one)["prompts"][0]["images"][:2]
    assert np.abs(pixels(one / a["file"]) - pixels(one / b["file"])).mean() > 5  # seeds differ


def test_kohya_export_samples_the_same_images_as_the_run(run, tiny, tmp_path):
    from finetune.export import export

    kohya = export(run, "kohya", dtype="fp32", out=tmp_path / "me-kohya.safetensors", echo=lambda *_: None)
    kw = dict(base=tiny, prompts=[PROMPTS[0]], settings=settings(seeds=[1, 2], scales=[0, 0.5, 1], watermark=False),
              progress=False)
    from_run = sample(run, out=tmp_path / "run", **kw)
    from_file = sample(loras=[LoraFile(kohya, name="ohwx-run")], out=tmp_path / "file", **kw)
    same_images(from_run, from_file, tolerance=1)
    # the trigger came from the file's metadata
    assert record(from_file)["prompts"][0]["prompt"] == "a photo of ohwx person"


def test_several_loras_with_their_own_weights(run, tiny, tmp_path):
    """The same LoRA twice, in both layouts, at weight 0.5 each = the LoRA at 1 (LoRA deltas add up)."""
    from finetune.export import export

    kohya = export(run, "kohya", dtype="fp32", out=tmp_path / "k.safetensors", echo=lambda *_: None)
    peft = run / "lora" / runs.WEIGHT_NAME
    kw = dict(base=tiny, prompts=[PROMPTS[0]], progress=False)
    both = sample(loras=[parse_lora_arg(f"{kohya}:0.5"), parse_lora_arg(f"{peft}:0.5")], out=tmp_path / "both",
                  settings=settings(seeds=[1, 2], scales=[1], watermark=False), **kw)
    single = sample(run, out=tmp_path / "single", settings=settings(seeds=[1, 2], scales=[1], watermark=False), **kw)
    same_images(both, single, tolerance=2)
    text = record(both)["prompts"][0]["images"][0]["parameters"]
    assert "<lora:k:0.5> <lora:pytorch_lora_weights:0.5>" in text


def test_checkpoint_rows(run, tiny, tmp_path):
    out = sample(run, base=tiny, prompts=[PROMPTS[0]], checkpoints="all", out=tmp_path / "ck", progress=False,
                 settings=settings(seeds=[1], scales=[0, 1], watermark=False))
    rec = record(out)
    assert rec["prompts"][0]["layout"]["row_labels"] == ["base", "step-000005", "final"]  # step 8 is unfinished
    base, half, final = (pixels(out / im["file"]) for im in rec["prompts"][0]["images"])
    assert np.abs(half - final).mean() > 1 and np.abs(half - base).mean() > 1
    assert "Checkpoint: step-000005" in rec["prompts"][0]["images"][1]["parameters"]
    with pytest.raises(FinetuneError, match=r"no complete checkpoint step-000008 \(available: step-000005, final\)"):
        sample(run, base=tiny, prompts=["x"], checkpoints="step-8", out=tmp_path / "bad", progress=False,
               settings=settings(seeds=[1]))


def test_checkpoints_all_renders_the_last_step_once_not_again_as_final(run, tmp_path):
    """Issue 13 item 20: a run that ends on a checkpoint step has a checkpoint whose weights are lora/'s;
    `--checkpoints all` rendered both rows. Only the header differs (its step count), not the weights."""
    import shutil

    from finetune.sample import resolve_checkpoints

    LORA = runs.WEIGHT_NAME
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    last = copy / "checkpoints" / "step-000010"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    (last / "lora").mkdir(parents=True)
    with safe_open(str(copy / "lora" / LORA), framework="pt") as f:
        header = {**f.metadata(), "finetune.steps": "10", "finetune.checkpoint": "step-000010"}
    save_file(load_file(str(copy / "lora" / LORA)), str(last / "lora" / LORA), metadata=header)
    (last / "COMPLETE").write_text(json.dumps({"step": 10}))
    assert [label for label, _ in resolve_checkpoints(copy, "all")] == ["step-000005", "final"]
    # asked for by name, both are rendered
    assert [label for label, _ in resolve_checkpoints(copy, "step-10,final")] == ["step-000010", "final"]


def test_per_prompt_size_and_negative_from_a_toml_file(run, tiny, tmp_path):
    f = tmp_path / "prompts.toml"
    f.write_text('negative = "ugly"\n[[prompts]]\nprompt = "a [class] in the city"\nsize = "64x128"\n'
                 '[[prompts]]\nprompt = "a photo of [trigger]"\nnegative = ""\n')
    prompts = read_prompts(f)
    assert prompts == [Prompt("a [class] in the city", "ugly", 64, 128), Prompt("a photo of [trigger]", "", None, None)]
    out = sample(run, base=tiny, prompts=prompts, out=tmp_path / "g", progress=False,
                 settings=settings(seeds=[1], scales=[0, 1]))
    first, second = record(out)["prompts"]
    assert Image.open(out / first["images"][0]["file"]).size == (64, 128)
    assert "Negative prompt: ugly" in first["images"][0]["parameters"]
    assert "Negative prompt" not in second["images"][0]["parameters"] and second["prompt"] == "a photo of ohwx"


def test_prompt_files_and_arguments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\na photo of [trigger]\n\n  on the beach  \n")
    assert read_prompts(f) == [Prompt("a photo of [trigger]"), Prompt("on the beach")]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[prompts]]\nprompt = "x"\nsteps = 3\n')
    with pytest.raises(FinetuneError, match=r"bad.toml: prompts\[1\] has unknown key\(s\) steps"):
        read_prompts(bad)
    assert parse_size("512x768") == (512, 768) and parse_size("64") == (64, 64)
    assert parse_lora_arg("a/b:c.safetensors:0.7") == LoraFile(Path("a/b:c.safetensors"), 0.7)
    assert parse_lora_arg("me.safetensors") == LoraFile(Path("me.safetensors"), 1.0, "me")


# ---------------------------------------------------------------- the commands
def test_cli_sample_and_verify(run, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["sample", str(run), "-p", "a photo of [trigger]", "--seeds", "7",
                                      "--scales", "0,1", "--steps", "2", "--size", "64", "--scheduler", "euler-a",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"gallery: {out / 'index.html'}" in result.output
    assert "2 images and 1 contact sheet in" in result.output  # not "1 contact sheets"
    assert "sampling" in result.output  # the progress bar
    image = out / "p01" / "scale-1-seed7.png"
    assert "Sampler: Euler a" in Image.open(image).info["parameters"]
    result = CliRunner().invoke(cli, ["verify", str(image), str(out / "p01" / "sheet.png")])
    assert result.exit_code == 0, result.output
    assert result.output.count('watermark:  detected: "finetune"') == 2
    assert "parameters: a photo of ohwx <lora:ohwx-run:1>" in result.output
    assert "AI label:   XMP Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia" in result.output


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory) -> Path:
    """A LoRA for the tiny SDXL: another architecture than the tiny SD 1.x."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from finetune.models import load_base

    pipe = load_base("tiny-sdxl").pipe
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return folder / runs.WEIGHT_NAME


def one_line_error(args, *patterns):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("sampling", "Loading"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for p in patterns:
        assert re.search(p, lines[0]), lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,patterns", [
    (["--prompts", "{empty}"], [r"no prompts"]),
    (["-p", " "], [r"no prompts"]),
    (["-p", "x", "--scheduler", "lms"], [r"unknown scheduler 'lms'", r"ddim, euler, euler-a, dpmpp-2m"]),
    (["-p", "x", "--size", "100x64"], [r"--size 100x64", r"multiples of 8", r"96x64"]),
    (["-p", "x", "--size", "40", "--steps", "2"], [r"40x40 is too small for the invisible watermark", "--no-watermark"]),
], ids=["empty-file", "blank-prompt", "scheduler", "size", "watermark-size"])
def test_bad_input_is_one_line_and_non_zero(run, tmp_path, args, patterns):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    one_line_error(["sample", str(run), "--out", str(tmp_path / "o"), *[a.format(empty=empty) for a in args]], *patterns)
    assert not (tmp_path / "o").exists()


def _lora_recording(run: Path, dest: Path, **sample_section) -> Path:
    """The run's LoRA as a lone file whose recorded training config (finetune.config) has these `sample`
    settings; with none given, a file that records no config at all (as another tool's LoRA)."""
    from safetensors.torch import load_file, save_file

    from helpers_run import read_header

    meta, _ = read_header(run / "lora" / runs.WEIGHT_NAME)
    if sample_section:
        config = json.loads(meta["finetune.config"])
        config["sample"].update(sample_section)
        meta["finetune.config"] = json.dumps(config)
    else:
        del meta["finetune.config"]
    save_file(load_file(str(run / "lora" / runs.WEIGHT_NAME)), str(dest), metadata=meta)
    return dest


def test_sample_lora_uses_the_settings_recorded_in_it(run, tmp_path):
    """Issue 13 item 5: `sample --lora FILE` (no run, no prompts) samples as the run did: its recorded
    size, steps, seeds, scales and prompts, not the config defaults (512 px, 25 steps)."""
    lora = _lora_recording(run, tmp_path / "me.safetensors", steps=2, width=64, height=72, seeds=[5], scales=[1.0],
                           guidance=3.0, prompts=["[trigger] [class] on a bike"])
    result = CliRunner().invoke(cli, ["sample", "--lora", str(lora), "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    rec = record(tmp_path / "g")
    assert rec["base"] == "tiny"  # the LoRA's finetune.base
    s = rec["settings"]
    assert (s["steps"], s["width"], s["height"], s["seeds"], s["scales"], s["guidance"]) == (2, 64, 72, [5], [1.0], 3.0)
    assert [p["prompt"] for p in rec["prompts"]] == ["ohwx person on a bike"]
    assert rec["prompts"][0]["size"] == [64, 72]


def test_sample_lora_without_recorded_settings_uses_the_base_native_size(run, tmp_path):
    lora = _lora_recording(run, tmp_path / "other-tool.safetensors")
    result = CliRunner().invoke(cli, ["sample", "--lora", str(lora), "--seeds", "1", "--scales", "1", "--steps", "2",
                                      "-p", "a photo of [trigger]", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    rec = record(tmp_path / "g")
    assert (rec["settings"]["width"], rec["settings"]["height"]) == (64, 64)  # the tiny base's native size
    assert rec["prompts"][0]["size"] == [64, 64]
    with Image.open(tmp_path / "g" / "p01" / "scale-1-seed1.png") as im:
        assert im.size == (64, 64)


def test_a_slow_image_shows_its_denoising_steps(run, tmp_path, monkeypatch):
    """Issue 13 item 5: when one image takes longer than a few seconds, a bar counts its denoising steps
    (the image count alone sat at 0/8 for minutes). Here the threshold is 0 s, so every call shows it."""
    import finetune.sample

    monkeypatch.setattr(finetune.sample, "STEP_PROGRESS_AFTER", 0.0)
    result = CliRunner().invoke(cli, ["sample", str(run), "-p", "x", "--seeds", "1,2", "--scales", "1",
                                      "--steps", "3", "--size", "64", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert re.search(r"2 images 64x64: 100%.* 3/3 \[", result.output), result.output


def test_sample_with_nothing_to_sample_asks_for_a_run_or_a_lora():
    """Issue 13 item 8: no arguments is a usage error naming RUN and --lora, not a missing trigger word."""
    result = CliRunner().invoke(cli, ["sample"])
    assert result.exit_code == 2
    assert "give RUN (a run folder that `finetune train` wrote) or --lora FILE" in result.output
    assert "trigger" not in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def sdxl_sized_lora(tmp_path_factory) -> Path:
    """A kohya-layout LoRA with a real SDXL's names and widths (cross-attention 2048, a second text encoder)."""
    from safetensors.torch import save_file

    t = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0)}
    path = tmp_path_factory.mktemp("sdxl-sized") / "xl.safetensors"
    save_file(t, str(path))
    return path


@pytest.mark.parametrize("which,patterns", [
    ("sdxl_sized_lora", [r"made for SDXL \(cross-attention width 2048, two text encoders\)",
                         r"the base is SD 1\.x \(cross-attention width 32\)"]),
    ("sdxl_lora", [r"made for SDXL \(cross-attention width 96\)",  # the tiny SDXL: told by its deeper attentions
                   r"the base is SD 1\.x \(cross-attention width 32\)"]),
])
def test_a_lora_for_another_architecture_is_refused(request, which, patterns, tmp_path):
    lora = request.getfixturevalue(which)
    one_line_error(["sample", "--lora", str(lora), "--base", "tiny", "-p", "x", "--seeds", "1", "--scales", "1",
                    "--steps", "1", "--size", "64", "--out", str(tmp_path / "o")],
                   r"error: \S+\.safetensors does not fit the base tiny", *patterns)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))


@pytest.mark.parametrize("name,cls,a1111", [("ddim", "DDIMScheduler", "DDIM"), ("euler", "EulerDiscreteScheduler", "Euler"),
                                            ("euler-a", "EulerAncestralDiscreteScheduler", "Euler a"),
                                            ("dpmpp-2m", "DPMSolverMultistepScheduler", "DPM++ 2M")])
def test_schedulers(tiny, tmp_path, name, cls, a1111):
    from finetune.sample import _scheduler

    assert type(_scheduler(tiny.pipe, name)).__name__ == cls
    out = sample(base=tiny, prompts=["a photo"], out=tmp_path / "g", progress=False,
                 settings=settings(seeds=[1], scales=[0], steps=2, scheduler=name))
    assert f"Sampler: {a1111}," in record(out)["prompts"][0]["images"][0]["parameters"]
    assert tiny.pipe.scheduler is tiny.first_scheduler


def test_config_refuses_watermarked_samples_too_small_to_hold_the_mark():
    from finetune.config import load_config
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sample.watermark = true needs samples of at least 64x64 px"):
        load_config(base={"sample": {"width": 48, "height": 64}})
    assert load_config(base={"sample": {"width": 48, "height": 64, "watermark": False}}).sample.width == 48

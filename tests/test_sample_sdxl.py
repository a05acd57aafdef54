"""`finetune sample` on an SDXL run (the tiny SDXL with a random non-zero UNet LoRA): sheets, gallery and
provenance as for SD 1.x, every sampler, and a LoRA of the other architecture refused naming both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_run import lora_pipe, make_fake_run, one_torch_thread  # noqa: F401 (fixture)
from PIL import Image

from finetune.cli import cli
from finetune.provenance import read_provenance
from finetune.sample import SheetSettings, sample
from finetune.watermark import embed_watermark
from finetune import runs

SEEDS = [1, 2]
PROMPT = "a photo of [trigger] [class]"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("sample-sdxl"), arch="sdxl", name="xl-run")


@pytest.fixture(scope="module")
def tiny_sdxl():
    from finetune.models import load_base

    return load_base("tiny-sdxl")


def settings(**kw) -> SheetSettings:
    return SheetSettings(**{**dict(seeds=SEEDS, scales=[0.0, 1.0], steps=3, width=64, height=64), **kw})


@pytest.fixture(scope="module")
def gallery(run, tmp_path_factory) -> Path:
    """Sampled with the base the run names (tiny-sdxl), loaded by sample itself."""
    return sample(run, prompts=[PROMPT], settings=settings(), out=tmp_path_factory.mktemp("g") / "xl",
                  progress=False)


def pixels(path_or_image) -> np.ndarray:
    im = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_sheets_gallery_and_provenance(gallery, run):
    rec = json.loads((gallery / "gallery.json").read_text())
    assert rec["base"] == "tiny-sdxl" and rec["base_hash"] == json.loads((run / "run.json").read_text())["base_hash"]
    (prompt,) = rec["prompts"]
    assert prompt["layout"]["row_labels"] == ["scale 0 (base)", "scale 1"]
    assert len(prompt["images"]) == 4 and (gallery / prompt["sheet"]).is_file()
    page = (gallery / "index.html").read_text()
    assert "SDXL (cross-attention width 96, two text encoders)" in page
    assert all(f'href="{im["file"]}"' in page for im in prompt["images"])

    tuned = next(im for im in prompt["images"] if im["scale"] == 1 and im["seed"] == 2)
    info = read_provenance(gallery / tuned["file"])
    assert info["parameters"].startswith("a photo of ohwx person <lora:xl-run:1>\n")
    for part in ("Steps: 3", "Sampler: DDIM", "Seed: 2", "Size: 64x64", "Model: tiny-sdxl", 'Lora hashes: "xl-run: '):
        assert part in info["parameters"]
    assert info["ai_label"] and read_provenance(gallery / prompt["sheet"])["ai_label"]


def test_rows_are_the_base_and_the_lora_model(gallery, tiny_sdxl):
    """Scale 0 is the SDXL base's own image bit for bit; scale 1 the LoRA model in memory's."""
    from diffusers import DDIMScheduler

    def bare(pipe):
        pipe = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
        return pipe(["a photo of ohwx person"] * len(SEEDS), num_inference_steps=3, width=64, height=64,
                    guidance_scale=7.5, generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images

    images = json.loads((gallery / "gallery.json").read_text())["prompts"][0]["images"]
    for scale, expected in ((0, bare(tiny_sdxl.pipe)), (1, bare(lora_pipe(arch="sdxl")))):
        for seed, image in zip(SEEDS, expected):
            im = next(i for i in images if i["scale"] == scale and i["seed"] == seed)
            diff = np.abs(pixels(gallery / im["file"]) - pixels(embed_watermark(image))).max()
            assert diff <= (0 if scale == 0 else 2), (scale, seed, diff)


@pytest.mark.parametrize("name,cls,a1111", [("ddim", "DDIMScheduler", "DDIM"), ("euler", "EulerDiscreteScheduler", "Euler"),
                                            ("euler-a", "EulerAncestralDiscreteScheduler", "Euler a"),
                                            ("dpmpp-2m", "DPMSolverMultistepScheduler", "DPM++ 2M")])
def test_schedulers_on_sdxl(tiny_sdxl, tmp_path, name, cls, a1111):
    from finetune.sample import _scheduler

    before = tiny_sdxl.pipe.scheduler
    scheduler = _scheduler(tiny_sdxl.pipe, name)
    assert type(scheduler).__name__ == cls
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1  # SDXL's schedule
    out = sample(base=tiny_sdxl, prompts=["a photo"], out=tmp_path / "g", progress=False,
                 settings=settings(seeds=[1], scales=[0], steps=2, scheduler=name))
    record = json.loads((out / "gallery.json").read_text())
    assert f"Sampler: {a1111}," in record["prompts"][0]["images"][0]["parameters"]
    assert tiny_sdxl.pipe.scheduler is before


# ---------------------------------------------------------------- the wrong architecture
def one_line_error(args, *patterns):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("sampling", "Loading"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for p in patterns:
        assert re.search(p, lines[0]), lines[0]


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("sample-sd1"), name="sd1-run")


ONE_IMAGE = ["-p", "x", "--seeds", "1", "--scales", "1", "--steps", "1", "--size", "64"]


def test_sd1_lora_on_the_sdxl_base_is_refused(sd1_run, tmp_path):
    lora = sd1_run / "lora" / runs.WEIGHT_NAME
    one_line_error(["sample", "--lora", lora, "--base", "tiny-sdxl", *ONE_IMAGE, "--out", tmp_path / "o"],
                   r"error: \S+\.safetensors does not fit the base tiny-sdxl", r"made for SD 1\.x",
                   r"the base is SDXL \(cross-attention width 96, two text encoders\)")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))


def test_sdxl_run_on_the_sd1_base_is_refused(run, tmp_path):
    one_line_error(["sample", run, "--base", "tiny", *ONE_IMAGE, "--out", tmp_path / "o"],
                   r"does not fit the base tiny", r"made for SDXL \(cross-attention width 96\)",
                   r"the base is SD 1\.x \(cross-attention width 32\)")
    assert not (tmp_path / "o").exists()

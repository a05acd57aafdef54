"""`finetune demo` interrupted and run again: the stop names a shell command that resumes, and the next
`finetune demo` continues the run from its checkpoint instead of wiping it (issue 13 item 6)."""

from __future__ import annotations

import json
import shutil

import pytest

import finetune.config
import finetune.train.lora
from finetune import runs
from finetune.demo import EXAMPLE_PHOTOS, demo
from finetune.errors import Stopped
from helpers_run import one_torch_thread  # noqa: F401 (fixture)

QUICK = ["train.max_steps=2", "train.save_every=1", "train.log_every=1", "sample.every=0", "sample.seeds=[1]",
         "sample.scales=[1]", "sample.steps=2", 'sample.prompts=["a photo of [trigger] [class]"]',
         'export.formats=["peft"]']


@pytest.fixture()
def quick_demo(monkeypatch, tmp_path):
    """The demo on two photos, 2 steps with a checkpoint after each, one export and one image."""
    real = finetune.config.load_preset
    monkeypatch.setattr(finetune.config, "load_preset", lambda name, overrides=(): real(name, [*QUICK, *overrides]))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("IMG_0001.jpg", "IMG_0002.jpg"):
        shutil.copy(EXAMPLE_PHOTOS / name, photos)
    monkeypatch.chdir(tmp_path)
    return photos


@pytest.mark.usefixtures("one_torch_thread")
def test_interrupted_demo_says_how_to_resume_and_demo_again_continues_it(quick_demo, monkeypatch, capsys):
    photos = quick_demo
    real_stop = finetune.train.lora.stop_requested
    monkeypatch.setattr(finetune.train.lora, "stop_requested", lambda run, stop: run.step == 1)  # Ctrl-C at step 1
    lines = []
    with pytest.raises(Stopped):  # as after Ctrl-C (the CLI exits 130)
        demo(photos, echo=lines.append)
    out = capsys.readouterr().out
    assert f"resume with: finetune demo --photos {photos}\n" in out
    assert "train(" not in out  # no Python call where a shell command belongs
    checkpoint = "outputs/demo/checkpoints/step-000001"
    assert json.loads(open(f"{checkpoint}/COMPLETE").read())["step"] == 1

    monkeypatch.setattr(finetune.train.lora, "stop_requested", real_stop)
    lines.clear()
    outputs = demo(photos, echo=lines.append)
    assert ("continuing the interrupted demo run in outputs/demo from its last checkpoint "
            "(delete outputs/demo to start over)") in lines
    assert "resuming outputs/demo from step-000001 (step 1 of 2)" in capsys.readouterr().out
    assert json.loads(open("outputs/demo/run.json").read())["steps"] == 2
    assert (outputs["run"] / "lora" / runs.WEIGHT_NAME).is_file()
    assert json.loads(open(f"{checkpoint}/COMPLETE").read())["step"] == 1  # kept, not wiped


class Stop(Exception):
    pass


def test_demo_says_when_it_replaces_or_restarts_its_run(quick_demo, monkeypatch, tmp_path):
    """A finished demo run is replaced, one without a checkpoint started over: each said, never silent."""
    import finetune.data.prepare

    def stop_at_prepare(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(finetune.data.prepare, "prepare", stop_at_prepare)
    run = tmp_path / "outputs" / "demo"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)  # no COMPLETE: its save never finished
    (run / "run.json").write_text(json.dumps({"base": "tiny"}))
    for expected in ("starting over the demo run in outputs/demo: it stopped before its first checkpoint",
                     "replacing the finished demo run in outputs/demo"):
        lines = []
        with pytest.raises(Stop):
            demo(quick_demo, echo=lines.append)
        assert lines[0] == expected and not run.exists()
        (run / "lora").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"base": "tiny"}))


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_on_the_tiny_flux_runs_every_stage(quick_demo, monkeypatch):
    """`finetune demo --base tiny-flux`: prepare -> train -> export (peft, kohya, merged) -> sample on FLUX.1."""
    real = finetune.config.load_preset
    monkeypatch.setattr(finetune.config, "load_preset",
                        lambda name, overrides=(): real(name, ['export.formats=["peft","kohya","merged"]', *overrides]))
    from click.testing import CliRunner

    from finetune.cli import cli

    r = CliRunner().invoke(cli, ["demo", "--base", "tiny-flux", "--photos", str(quick_demo)])
    assert r.exit_code == 0, r.output
    assert "[2/4] train: preset tiny-flux-demo, 2 steps on the tiny-flux base" in r.output
    run = quick_demo.parent / "outputs" / "demo-tiny-flux"
    assert json.loads((run / "run.json").read_text())["arch"] == "flux1-dev"
    exported = {p.name for p in (run / "export").iterdir()}
    assert exported >= {"demo-tiny-flux-peft.safetensors", "demo-tiny-flux.safetensors",  # kohya
                        "demo-tiny-flux-merged.safetensors"}, exported
    galleries = [p for p in run.parent.parent.rglob("index.html") if "gallery" in str(p)]
    assert galleries and any(p.parent.rglob("*.png") for p in galleries), r.output
    r = CliRunner().invoke(cli, ["demo", "--base", "tiny-sdxl-nope", "--photos", str(quick_demo)])
    assert r.exit_code != 0 and "tiny-flux" in r.output

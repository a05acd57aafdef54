"""The Diffusion-DPO recipe on the tiny base with synthetic preferences: reddish images chosen over bluish ones."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_run import make_fake_run
from PIL import Image
from safetensors.torch import load_file

from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune import runs
from finetune.train import dpo

PROMPTS = ["a photo of ohwx person", "a portrait of ohwx person in the city", "ohwx person on a beach"]


def write_pairs(run: Path, n: int = 40, seed: int = 0) -> Path:
    """n pairs as `finetune review --export` writes them, images in run/samples/: each pair is one
    brightness and faint texture, tinted red (chosen) and blue (rejected)."""
    rng = np.random.default_rng(seed)
    folder = run / "samples" / "step-000010"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        small = rng.uniform(0, 1, (8, 8))
        tex = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC),
                         dtype=np.float32)[..., None] / 255
        sides = {}
        for name, tint in (("red", (1.0, 0.25, 0.2)), ("blue", (0.2, 0.25, 1.0))):
            pixels = (0.6 + 0.4 * small.mean() + 0.05 * tex) * np.array(tint) * 255
            path = folder / f"{i}-{name}.png"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
            sides[name] = {"image": path.relative_to(run).as_posix(), "path": str(path),
                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "seed": i, "scale": 1.0,
                           "checkpoint": "step-000010", "negative_prompt": "", "parameters": ""}
        rows.append({"prompt": PROMPTS[i % len(PROMPTS)], "chosen": sides["red"], "rejected": sides["blue"],
                     "source": "comparison", "rated_at": "2025-01-01T00:00:00+00:00"})
    out = run / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def start_run(tmp_path_factory) -> Path:
    """A finished run (tiny base + a random LoRA) with 40 rated pairs in its samples folder."""
    run = make_fake_run(tmp_path_factory.mktemp("dpo"))
    write_pairs(run)
    return run


def test_dpo_loss_is_log2_at_the_reference_and_falls_when_the_chosen_image_is_denoised_better():
    ref = torch.tensor([1.0, 1.0, 1.2, 0.8])  # chosen (2 pairs), then rejected
    loss, acc = dpo.dpo_loss(ref.clone(), ref, beta=5000.0)
    assert loss.item() == pytest.approx(np.log(2)) and acc.item() == 0.5
    better = ref + torch.tensor([-1e-3, -1e-3, 0.0, 0.0])  # lower error on both chosen images
    loss, acc = dpo.dpo_loss(better, ref, beta=5000.0)
    assert loss.item() < np.log(2) and acc.item() == 1.0
    # inside = -0.5 * 5000 * (-1e-3) = 2.5 for each pair
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(2.5)).item(), rel=1e-4)


def test_dpo_run_learns_the_preference_and_describes_itself(start_run, tmp_path):
    out = tmp_path / "dpo"
    r = CliRunner().invoke(cli, ["train-dpo", "--from", str(start_run), "--pairs", str(start_run / "pairs.jsonl"),
                                 "--preset", "feedback-dpo-tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "dpo_report.json").read_text())
    acc = report["implicit_reward_accuracy"]
    # Before: the model is the reference, so every margin is exactly 0 (ties count half).
    # Measured after 40 steps: 0.9 on the 10 held-out pairs; we ask for a margin of at least 0.25.
    assert report["held_out_pairs"] == 10 and report["pairs"]["train"] == 30
    assert acc["before"] == 0.5
    assert acc["after"] >= acc["before"] + 0.25, report
    # The DPO loss on the held-out pairs (fixed timesteps and noise) falls from log 2.
    assert report["dpo_loss"]["before"] == pytest.approx(np.log(2))
    assert report["dpo_loss"]["after"] < report["dpo_loss"]["before"] - 0.05, report
    assert "implicit reward accuracy on 10 held-out pairs: 0.500 before" in r.output

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"loss", "implicit_acc", "lr", "model_loss", "ref_loss"} <= set(rows[0])
    # The training loss (fresh noise and timesteps each step) is noisy; its second half sits below log 2.
    assert np.mean([row["loss"] for row in rows[4:]]) < np.log(2), [row["loss"] for row in rows]
    # Its accuracy (5 steps of fresh noise per row) is noisier still: above chance over the run. Measured on
    # an AVX2 host: 0.5 0.55 0.9 0.75 0.45 0.55 0.65 0.7, mean 0.63 (oneDNN's kernels differ by CPU).
    assert np.mean([row["implicit_acc"] for row in rows]) > 0.55, [row["implicit_acc"] for row in rows]

    # The contract's run folder: the adapter in the main recipe's layout, a checkpoint, samples, run.json.
    tensors = load_file(str(out / "lora" / runs.WEIGHT_NAME))
    start = load_file(str(start_run / "lora" / runs.WEIGHT_NAME))
    assert len(tensors) == len(start) and not any("reference" in k for k in tensors)
    from finetune.train.adapters import read_lora_metadata

    meta = read_lora_metadata(out / "lora")
    assert meta["finetune.method"] == "diffusion-dpo" and meta["finetune.dpo_beta"] == "500"
    assert meta["finetune.steps"] == "40" and meta["finetune.trigger"] == "ohwx" and "lora_adapter_metadata" in meta
    assert (out / "checkpoints" / "step-000020" / "COMPLETE").is_file()
    assert sorted(p.name for p in (out / "samples" / "step-000040").iterdir()) == ["0-1.png", "0-2.png", "1-1.png", "1-2.png"]
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "diffusion-dpo" and info["steps"] == 40 and info["finished_at"]
    assert (out / "pairs.jsonl").read_text() == (start_run / "pairs.jsonl").read_text()
    assert json.loads((out / "config.json").read_text())["dpo"]["beta"] == 500.0

    # The tuned adapter loads back into the base and gives the tuned model's predictions.
    from finetune import lora_io
    from finetune.models import load_base

    pipe = load_base("tiny").pipe
    lora_io.load_lora(pipe, out / "lora" / runs.WEIGHT_NAME)
    assert sum("lora" in n for n, _ in pipe.unet.named_parameters()) == len(tensors)


def test_resume_continues_exactly(start_run, tmp_path):
    cfg = dpo.resolve_config(start_run, "feedback-dpo-tiny", ["train.max_steps=6", "train.save_every=3",
                                                              "dpo.held_out=0", "sample.prompts=[]"])
    straight = dpo.train_dpo(cfg, start_run, start_run / "pairs.jsonl", tmp_path / "a")
    # Pretend the run stopped after its step-3 checkpoint, then resume it.
    resumed = Path(shutil.copytree(straight, tmp_path / "b"))
    shutil.rmtree(resumed / "lora")
    shutil.rmtree(resumed / "checkpoints" / "step-000006", ignore_errors=True)
    dpo.train_dpo(cfg, start_run, None, resumed, resume="latest")
    a = load_file(str(straight / "lora" / runs.WEIGHT_NAME))
    b = load_file(str(resumed / "lora" / runs.WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6]  # each step logged once (log_every = 5, and the last step)


def test_stop_and_resume_go_through_the_main_recipes_plumbing(start_run, tmp_path, monkeypatch, capsys):
    """Issue 14 item 3: the stop flag is gathered across processes (train/common.py's stop_requested), and
    a resume drops the newer checkpoints it abandons and refuses a run with no steps left, as the main
    recipe's does."""
    from finetune.errors import Stopped

    args = ["train.save_every=2", "dpo.held_out=0", "sample.prompts=[]", "train.keep_checkpoints=5"]
    cfg = dpo.resolve_config(start_run, "feedback-dpo-tiny", ["train.max_steps=4", *args])
    out = tmp_path / "dpo"
    monkeypatch.setattr(dpo, "stop_requested", lambda run, stop: run.step == 3)  # a signal on some process
    with pytest.raises(Stopped):
        dpo.train_dpo(cfg, start_run, start_run / "pairs.jsonl", out)
    monkeypatch.undo()
    assert [p.name for _, p in runs.complete_checkpoints(out, state=True)] == ["step-000002", "step-000003"]

    dpo.train_dpo(cfg, start_run, None, out, resume="step-2")
    assert "deleted the newer checkpoints step-000003" in capsys.readouterr().out
    assert [p.name for _, p in runs.complete_checkpoints(out)] == ["step-000002"] and runs.is_finished(out)
    done = dpo.resolve_config(start_run, "feedback-dpo-tiny", ["train.max_steps=2", *args])
    with pytest.raises(FinetuneError, match="is at step 2 and train.max_steps = 2: nothing left to train"):
        dpo.train_dpo(done, start_run, None, out, resume="latest")


def test_fewer_pairs_than_a_batch_is_one_line(start_run, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join((start_run / "pairs.jsonl").read_text().splitlines(keepends=True)[:4]))
    r = CliRunner().invoke(cli, ["train-dpo", "--from", str(start_run), "--pairs", str(few), "--preset",
                                 "feedback-dpo-tiny", "--out", str(tmp_path / "dpo")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert "3 preference pairs to train on" in line and "train.batch_size = 4" in line
    assert not (tmp_path / "dpo").exists()


def test_too_few_pairs_exported_from_the_ratings_names_the_run_not_a_temporary_file(start_run, tmp_path, monkeypatch):
    """Without --pairs the run's ratings are exported into a temporary folder, gone when the message is read;
    it named /tmp/finetune-dpo-.../pairs.jsonl."""
    from types import SimpleNamespace

    import finetune.ratings

    def export_pairs(run, dest):
        dest.write_text("".join((start_run / "pairs.jsonl").read_text().splitlines(keepends=True)[:4]))
        return SimpleNamespace(written=4, path=dest)

    monkeypatch.setattr(finetune.ratings, "export_pairs", export_pairs)
    r = CliRunner().invoke(cli, ["train-dpo", "--from", str(start_run), "--preset", "feedback-dpo-tiny",
                                 "--out", str(tmp_path / "dpo")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: {start_run}'s ratings give 3 preference pairs to train on (4 usable, 1 held out" in r.output
    assert "finetune-dpo-" not in r.output


def test_the_report_line_says_1_held_out_pair():
    acc = {"implicit_reward_accuracy": {"before": 0.5, "after": 1.0}, "prefers_chosen": {"reference": 0, "tuned": 1}}
    assert dpo.format_report({"held_out_pairs": 1, **acc}).startswith(
        "implicit reward accuracy on 1 held-out pair: 0.500 before -> 1.000 after")
    assert "on 2 held-out pairs:" in dpo.format_report({"held_out_pairs": 2, **acc})


def test_pairs_whose_images_are_missing_is_one_line(start_run, tmp_path):
    rows = [json.loads(line) for line in (start_run / "pairs.jsonl").read_text().splitlines()]
    rows[2]["rejected"]["path"] = str(tmp_path / "gone.png")
    rows[2]["rejected"]["image"] = "samples/step-000010/gone.png"
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneError, match=r"images of 1 pair are missing \(first: line 3 rejected .*gone.png\)"):
        dpo.read_pairs(broken, start_run)
    r = CliRunner().invoke(cli, ["train-dpo", "--from", str(start_run), "--pairs", str(broken), "--preset",
                                 "feedback-dpo-tiny", "--out", str(tmp_path / "dpo")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "are missing" in r.output


def test_changed_image_drops_its_pair_and_preset_cannot_change_the_adapter_shape(start_run, tmp_path):
    rows = [json.loads(line) for line in (start_run / "pairs.jsonl").read_text().splitlines()]
    rows[0]["chosen"]["sha256"] = "0" * 64
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = dpo.read_pairs(edited, start_run)
    assert len(pairs) == len(rows) - 1 and len(skipped) == 1 and "changed since it was rated" in skipped[0]
    with pytest.raises(FinetuneError, match=r"lora.rank = 8 \(the run has 4\)"):
        dpo.resolve_config(start_run, "feedback-dpo-tiny", ["lora.rank=8"])

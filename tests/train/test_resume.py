"""Resume: N steps straight == N/2 + resume + N/2, bit for bit; one-line refusals through the CLI."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from finetune.cli import cli
from finetune.runs import CheckpointWarning, find_checkpoint
from finetune.train.checkpoint import load_checkpoint
from finetune.train.common import tensors_digest
from finetune.train.lora import fit, setup, trainable

from train_helpers import (HAVE_WATERMARK, assert_equal_state, assert_half_resume_is_exact, tiny_config,
                           tiny_sdxl_config)


# 6 images in batches of 2 = 3 batches an epoch: both cases resume in the middle of an epoch.
# The first draws from every random source the loop has (caption dropout, LoRA dropout, noise offset).
@pytest.mark.parametrize("extra, position", [
    (["train.caption_dropout=0.3", "lora.dropout=0.1", "train.noise_offset=0.05"], (0, 2)),
    (["train.grad_accum=2"], (1, 1)),
], ids=["rng-sources", "grad-accum-2"])
def test_n_steps_straight_equal_half_resume_half_bit_for_bit(dataset, tmp_path, extra, position):
    # The default 8-bit AdamW (tiny-demo's), a schedule that depends on the step, a checkpoint at N/2.
    cfg = tiny_config("train.max_steps=4", "train.save_every=2", "train.lr_scheduler=cosine",
                      "train.warmup_steps=1", *extra)
    assert cfg.train.optimizer == "adamw8bit"
    straight = setup(cfg, dataset, tmp_path / "run")
    fit(straight)
    weights = {k: v.detach().clone() for k, v in trainable(straight).items()}
    optimizer = copy.deepcopy(straight.optimizer.state_dict())
    assert straight.optimizer.optimizer.state[next(iter(trainable(straight).values()))]["state1"].dtype == torch.uint8

    half = tmp_path / "run" / "checkpoints" / "step-000002"
    saved = load_checkpoint(half)
    assert (saved["sampler"]["epoch"], saved["sampler"]["position"]) == position

    resumed = setup(cfg, dataset, tmp_path / "run", resume=half)
    assert resumed.step == 2
    assert not torch.equal(next(iter(trainable(resumed).values())), next(iter(weights.values())))
    fit(resumed)
    assert resumed.step == 4
    got = trainable(resumed)
    assert list(got) == list(weights)
    for name in weights:
        assert torch.equal(got[name], weights[name]), name
    assert_equal_state(resumed.optimizer.state_dict(), optimizer)
    assert resumed.lr_scheduler.state_dict()["last_epoch"] == 4
    # The resume replaced the abandoned run's step-4 checkpoint with an identical one.
    assert torch.equal(load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000004")["trainable"][name],
                       weights[name])


def test_sdxl_n_steps_straight_equal_half_resume_half_bit_for_bit(dataset, tmp_path):
    """The same on the tiny SDXL: LoRAs on the UNet and both text encoders (two learning rates in one
    8-bit AdamW; the second encoder's pooled embedding and the micro-conditioning in every step), every
    random source of the loop on, the checkpoint in the middle of an epoch."""
    cfg = tiny_sdxl_config("train.max_steps=4", "train.save_every=2", "train.batch_size=2", "train.optimizer=adamw8bit",
                           "train.lr_scheduler=cosine", "train.warmup_steps=1", "train.caption_dropout=0.3",
                           "lora.dropout=0.1", "train.noise_offset=0.05", "lora.train_text_encoder=true",
                           "lora.text_encoder_rank=2")
    assert_half_resume_is_exact(cfg, dataset, tmp_path / "run", "sdxl", {"unet", "text_encoder", "text_encoder_2"})


QUICK = ["--base", "tiny", "--set", "sample.every=0", "--set", "sample.prompts=[]",
         "--set", f"sample.watermark={str(HAVE_WATERMARK).lower()}", "--set", "train.log_every=1"]


def train_cli(dataset, *args):
    return CliRunner().invoke(cli, ["train", "--preset", "tiny-demo", "--dataset", str(dataset), "--out", "run",
                                    *QUICK, *args])


def one_line_error(r, code: int = 1) -> str:
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_resume_with_nothing_to_resume_is_one_line(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(train_cli(dataset, "--resume", "latest"))
    assert line == ("error: --resume latest: nothing to resume, run holds no run (give the run folder with --out, "
                    "or start without --resume)")
    line = one_line_error(train_cli(dataset, "--resume", "run/checkpoints/step-000007"))
    assert "nothing to resume" in line


def test_resume_refuses_a_changed_model_lora_or_data_naming_it(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = train_cli(dataset, "--set", "train.max_steps=2", "--set", "train.save_every=0")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "COMPLETE").is_file()  # one at the end

    # Training longer is allowed; the same length has nothing left to do.
    line = one_line_error(train_cli(dataset, "--set", "train.max_steps=2", "--resume", "latest"))
    assert "is at step 2 and train.max_steps = 2: nothing left to train" in line
    line = one_line_error(train_cli(dataset, "--set", "train.max_steps=3", "--set", "lora.rank=8",
                                    "--resume", "latest"))
    assert line.startswith("error: cannot resume: the config differs from the checkpoint's run in lora.rank 4 -> 8;")
    line = one_line_error(train_cli(dataset, "--set", "train.max_steps=3", "--set", "lora.targets=['to_q']",
                                    "--resume", "latest"))
    assert "in lora.targets [" in line
    (tmp_path / "other").mkdir()  # another base (a missing one is refused as such before anything else)
    line = one_line_error(train_cli(dataset, "--set", "train.max_steps=3", "--base", str(tmp_path / "other"),
                                    "--resume", "latest"))
    assert "in model.base \"tiny\" -> " in line
    (dataset / "images" / "0001.txt").write_text("a photo of ohwx person, smiling")  # the data changed
    line = one_line_error(train_cli(dataset, "--set", "train.max_steps=3", "--resume", "latest"))
    assert "in the dataset (_dataset_hash) " in line
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps"] == 2  # the run is untouched


# ---------------------------------------------------------------- real processes: signals and kill -9
# One thread per process, as in-process (conftest): two OpenMP threads on a shared 2-core machine can
# make a step ten times slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(tmp_path, dataset, *args) -> subprocess.Popen:
    """`python -m finetune train ...` in `tmp_path`, writing the run folder `run`."""
    cmd = [sys.executable, "-m", "finetune", "train", "--preset", "tiny-demo", "--dataset", str(dataset),
           "--out", "run", *QUICK, *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(child: subprocess.Popen, run: Path, step: int) -> None:
    """Until metrics.jsonl logs `step` (log_every = 1)."""
    deadline = time.monotonic() + 90
    while not any(s >= step for s in logged_steps(run)):
        assert child.poll() is None, f"the run ended before step {step}: {child.stdout.read()}"
        assert time.monotonic() < deadline, f"no step {step} after 90 s"
        time.sleep(0.01)


def read_until(child: subprocess.Popen, text: str) -> str:
    lines = []
    while not lines or text not in lines[-1]:
        lines.append(child.stdout.readline())
        assert lines[-1], f"the run ended before printing {text!r}: {''.join(lines)}"
    return "".join(lines)


def latest_step(run: Path) -> int:
    with warnings.catch_warnings():  # an unfinished temporary folder of a killed save: expected here
        warnings.simplefilter("ignore", CheckpointWarning)
        return int(find_checkpoint(run, "latest").name.split("-")[1])


def resumed_from(output: str) -> int:
    return int(re.search(r"resuming run from step-(\d+)", output).group(1))


def test_kill_9_sigterm_and_a_damaged_checkpoint_never_lose_the_run(dataset, tmp_path):
    """One run through four processes (each start costs seconds, so the show items share them):
    kill -9 at a random step of the fresh run, then of the resumed run; a checkpoint damaged by hand;
    SIGTERM; and the printed resume command finishes the run."""
    rng = random.Random(9)
    run, steps, every = tmp_path / "run", 14, 3
    args = ["--set", f"train.max_steps={steps}", "--set", f"train.save_every={every}"]
    logged, latest = every - 1, None
    for resume in ([], ["--resume", "latest"]):  # the fresh run (after its first save), then the resumed one
        child = launch(tmp_path, dataset, *args, *resume)
        wait_for_step(child, run, rng.randint(logged + 2, logged + 4))
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment: in a step or in a save
        child.kill()
        out, _ = child.communicate(timeout=30)
        if resume:
            assert resumed_from(out) == latest
        logged = max(logged_steps(run))
        latest = latest_step(run)
        assert logged - latest <= every, (logged, latest)

    # The newest checkpoint truncated by hand: --resume latest warns in one line and takes the one before.
    complete = sorted(p for p in (run / "checkpoints").glob("step-*"))
    assert len(complete) >= 2 and complete[-1].name == f"step-{latest:06d}"
    state = complete[-1] / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    child = launch(tmp_path, dataset, *args, "--resume", "latest")
    head = read_until(child, "training tiny")  # set up: metrics.jsonl now ends at the resumed step
    wait_for_step(child, run, resumed_from(head) + 1)
    child.send_signal(signal.SIGTERM)
    out = head + child.communicate(timeout=60)[0]
    warning = [line for line in out.splitlines() if "skipping checkpoint" in line]
    assert len(warning) == 1 and warning[0].startswith(f"warning: skipping checkpoint run/checkpoints/"
                                                       f"{complete[-1].name}: state.safetensors has 100 bytes"), out
    assert resumed_from(out) == int(complete[-2].name.split("-")[1])

    # SIGTERM: the step finishes, a checkpoint is written, the resume command is printed, exit 143.
    assert child.returncode == 143, out
    assert "SIGTERM: finishing this step and saving a checkpoint" in out
    stopped = int(re.search(rf"stopped at step (\d+) of {steps} \(SIGTERM\); checkpoint run/checkpoints/"
                            r"step-0+\1\n", out)[1])
    assert latest_step(run) == stopped < steps
    command = re.search(r"resume with: (.*)", out)[1]
    assert command == shlex.join(["finetune", "train", "--preset", "tiny-demo", "--dataset", str(dataset),
                                  "--base", "tiny", "--out", "run", *QUICK[2:], *args]) + " --resume latest"

    final = subprocess.run([sys.executable, "-m", "finetune", *shlex.split(command)[1:]], cwd=tmp_path,
                           env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    assert resumed_from(final.stdout) == stopped and f"done: {steps} steps" in final.stdout
    assert logged_steps(run) == list(range(1, steps + 1))  # every step logged once
    assert json.loads((run / "run.json").read_text())["steps"] == steps


# ---------------------------------------------------------------- two processes (accelerate launch, CPU, gloo)
def test_two_processes_keep_the_same_weights_only_the_main_one_writes_and_resume_is_exact(dataset, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "finetune", "train", "--preset", "tiny-demo", "--dataset", str(dataset), "--out", "run", *QUICK,
               "--set", "train.max_steps=4", "--set", "train.save_every=2"]
    env = {**ONE_THREAD, "ACCELERATE_USE_CPU": "true"}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("done: 4 steps") == 1  # printed by the main process only
    assert logged_steps(run) == [1, 2, 3, 4]  # each step once: only the main process writes

    end = load_checkpoint(run / "checkpoints" / "step-000004")
    assert end["config"]["_num_processes"] == 2 and len(end["rng"]) == 2
    assert not torch.equal(end["rng"][0]["torch"], end["rng"][1]["torch"])  # each process its own noise
    # Every process hashed its own LoRA weights at the save; both equal the weights saved.
    assert end["param_digests"] == [tensors_digest(end["trainable"])] * 2

    # One process cannot continue a two-process run (the data order is sharded by process).
    r = train_cli(dataset, "--set", "train.max_steps=4", "--set", "train.save_every=2",
                  "--resume", "run/checkpoints/step-000002")
    assert "the number of processes (_num_processes) 2 -> 1" in one_line_error(r)

    again = subprocess.run([*command, "--resume", "run/checkpoints/step-000002"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("resuming run from step-000002 (step 2 of 4); deleted the newer checkpoints "
                              "step-000004") == 1
    redone = load_checkpoint(run / "checkpoints" / "step-000004")
    assert redone["param_digests"] == end["param_digests"]
    for name, weight in end["trainable"].items():
        assert torch.equal(redone["trainable"][name], weight), name
    assert_equal_state(redone["optimizer"], end["optimizer"])

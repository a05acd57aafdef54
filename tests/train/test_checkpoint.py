"""Checkpoints: exact round-trips (bnb 8-bit AdamW included), atomic saves, "latest" that always loads."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import runs
from finetune.errors import FinetuneError
from finetune.runs import CheckpointWarning, find_checkpoint
from finetune.train import checkpoint as ck
from finetune.train.checkpoint import (capture_rng, check_resume_compatible, load_checkpoint, restore_rng,
                                       save_checkpoint)

LORA = {"unet.down.lora_A.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}


def make_state(step: int, **extra) -> dict:
    return {"step": step, "config": {"train": {"seed": 1}}, "trainable": {"w": torch.full((4,), float(step))},
            "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": step},
            "grad_scaler": None, "sampler": {"epoch": 0, "position": step}, "rng": capture_rng(), **extra}


def names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def assert_same(a, b, path="state"):
    """Equal in value, type and bits (floats by their bytes, tensors by dtype, shape and content)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_state_round_trips_bit_for_bit_without_pickle(tmp_path):
    shared = torch.linspace(0, 1, 256)  # bnb shares one qmap tensor between parameters
    state = make_state(7, extra={
        "floats": [0.1, -0.0, math.inf, -math.inf, 1e-300, 2.0**0.5], "big": 2**80, "none": None,
        "tuple": (0.9, 0.999), "int_keys": {0: {"a": shared}, 1: {"a": shared}},
        "__dunder": {"__bnb_optimizer_quant_state__": {"state1": torch.randint(0, 255, (5, 3), dtype=torch.uint8)}},
        "dtypes": [torch.randn(3, dtype=torch.bfloat16), torch.randn(2, dtype=torch.float16), torch.tensor(3.5),
                   torch.zeros(0, 4), torch.tensor([True, False]), torch.arange(5, dtype=torch.int64)],
        "view": torch.arange(10.0)[2:6], "numpy": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "np_scalar": np.float64(1 / 3), "nan": float("nan")})
    out = save_checkpoint(tmp_path, 7, lora_files=LORA, state=state, keep=3)

    assert out == tmp_path / "checkpoints" / "step-000007"
    assert names(tmp_path) == ["step-000007"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["COMPLETE", "lora/pytorch_lora_weights.safetensors", "rng-rank0.json",
                     "rng-rank0.safetensors", "state.json", "state.safetensors"]
    marker = json.loads((out / "COMPLETE").read_text())
    assert marker["step"] == 7 and marker["finetune_version"] and marker["time"]
    assert set(marker["files"]) == set(files) - {"COMPLETE"}
    assert all(len(m["sha256"]) == 64 and m["size"] > 0 for m in marker["files"].values())

    loaded = load_checkpoint(out)
    nan = loaded["extra"].pop("nan")
    assert math.isnan(nan) and math.isnan(state["extra"].pop("nan"))
    assert_same(state, loaded)
    assert loaded["extra"]["int_keys"][0]["a"] is loaded["extra"]["int_keys"][1]["a"]  # shared stays shared
    from safetensors.torch import load_file
    assert torch.equal(load_file(out / "lora" / runs.WEIGHT_NAME)["unet.down.lora_A.weight"],
                       LORA["unet.down.lora_A.weight"])


def test_state_that_cannot_be_stored_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lacks optimizer"):
        save_checkpoint(tmp_path, 1, lora_files=LORA, state={k: v for k, v in make_state(1).items()
                                                             if k != "optimizer"}, keep=1)
    with pytest.raises(TypeError, match=r"cannot store sampler/fn \(builtin_function_or_method\)"):
        save_checkpoint(tmp_path, 1, lora_files=LORA, state=make_state(1) | {"sampler": {"fn": print}}, keep=1)
    with pytest.raises(ValueError, match="saving step 2"):
        save_checkpoint(tmp_path, 2, lora_files=LORA, state=make_state(1), keep=1)
    assert names(tmp_path) == []  # the failed attempts left nothing behind


def draws() -> list:
    return [random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.normal()]


def test_rng_capture_restore_and_per_rank_files(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    rank0 = capture_rng()
    first = draws()
    rank1 = capture_rng()
    second = draws()
    out = save_checkpoint(tmp_path, 1, lora_files=LORA, state=make_state(1) | {"rng": [rank0, rank1]}, keep=1)
    assert (out / "rng-rank1.json").is_file() and (out / "rng-rank1.safetensors").is_file()

    draws()
    loaded = load_checkpoint(out)["rng"]
    assert isinstance(loaded, list) and len(loaded) == 2
    restore_rng(loaded[0])
    assert draws() == first
    restore_rng(loaded[1])
    assert draws() == second


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_round_trip(tmp_path):
    torch.cuda.manual_seed_all(5)
    rng = capture_rng()
    first = torch.rand(4, device="cuda").cpu()
    out = save_checkpoint(tmp_path, 1, lora_files=LORA, state=make_state(1) | {"rng": rng}, keep=1)
    torch.rand(100, device="cuda")
    restore_rng(load_checkpoint(out)["rng"])
    assert torch.equal(torch.rand(4, device="cuda").cpu(), first)


# ------------------------------------------------------------------ optimizer, scheduler, resume


def build(kind: str, seed: int):
    from diffusers.optimization import get_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 8))
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=16)  # default 4096: 32-bit here
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    return model, opt, sched, scaler


def train_steps(model, opt, sched, n):
    for _ in range(n):
        x = torch.randn(4, 64)  # drawn from the global generator: resume must restore it
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def trainable(model):
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["adamw8bit", "adamw"])
def test_resume_continues_bit_exact(tmp_path, kind):
    model, opt, sched, scaler = build(kind, seed=0)
    train_steps(model, opt, sched, 3)
    state = {"step": 3, "config": {}, "trainable": trainable(model), "optimizer": opt.state_dict(),
             "lr_scheduler": sched.state_dict(), "grad_scaler": scaler.state_dict(),
             "sampler": {"epoch": 0, "position": 3}, "rng": capture_rng()}
    out = save_checkpoint(tmp_path, 3, lora_files=LORA, state=state, keep=1)
    train_steps(model, opt, sched, 3)  # 6 straight

    model2, opt2, sched2, scaler2 = build(kind, seed=123)  # other weights, other RNG state
    loaded = load_checkpoint(out)
    with torch.no_grad():
        for name, p in model2.state_dict().items():
            p.copy_(loaded["trainable"][name])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["lr_scheduler"])
    scaler2.load_state_dict(loaded["grad_scaler"])
    restore_rng(loaded["rng"])
    train_steps(model2, opt2, sched2, 3)

    assert_same(trainable(model), trainable(model2))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert_same(s1["state"], s2["state"])
    assert s1["param_groups"] == s2["param_groups"]
    assert sched.get_last_lr() == sched2.get_last_lr()
    if kind == "adamw8bit":  # really 8-bit state, and it survived the round trip as such
        quant = s2["state"][0]["__bnb_optimizer_quant_state__"]
        assert quant["state1"].dtype == torch.uint8 and quant["state2"].dtype == torch.uint8


# ------------------------------------------------------------------------------- keep, latest


def test_keep_deletes_oldest_and_stale_temp_folders(tmp_path):
    ckpts = tmp_path / "checkpoints"
    done = subprocess.Popen(["true"])
    done.wait()  # a process that died mid-save, and one of our own earlier attempts
    left = [ckpts / f".step-000009.tmp-{done.pid}", ckpts / f".step-000008.old-{os.getpid()}"]
    live = ckpts / ".step-000007.tmp-1"  # pid 1 runs: another process may be writing there
    for step in range(1, 6):
        if step == 3:
            for d in (*left, live):
                d.mkdir(parents=True)
                (d / "state.json").write_text("{")
        save_checkpoint(tmp_path, step, lora_files=LORA, state=make_state(step), keep=2)
    assert names(tmp_path) == [live.name, "step-000004", "step-000005"]
    with pytest.warns(CheckpointWarning, match=r"\.step-000007\.tmp-1 \(a save was interrupted\)"):
        assert load_checkpoint(find_checkpoint(tmp_path, "latest"))["step"] == 5


def test_same_step_saved_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 2, lora_files=LORA, state=make_state(2), keep=3)
    out = save_checkpoint(tmp_path, 2, lora_files=LORA, state=make_state(2, note="again"), keep=3)
    assert names(tmp_path) == ["step-000002"]
    assert load_checkpoint(out)["note"] == "again"


def test_damaged_folders_are_skipped_with_a_warning(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, lora_files=LORA, state=make_state(step), keep=10)
    ckpts = tmp_path / "checkpoints"
    data = (ckpts / "step-000005" / "state.safetensors").read_bytes()
    (ckpts / "step-000005" / "state.safetensors").write_bytes(data[: len(data) // 2])  # truncated by hand
    (ckpts / "step-000004" / "lora" / runs.WEIGHT_NAME).unlink()  # deleted by hand
    rng = ckpts / "step-000003" / "rng-rank0.safetensors"
    flipped = bytearray(rng.read_bytes())
    flipped[-1] ^= 1
    rng.write_bytes(bytes(flipped))  # same size, other content
    (ckpts / "step-000006").mkdir()  # a folder without a marker
    (ckpts / ".step-000007.tmp-123").mkdir()

    with pytest.warns(CheckpointWarning) as caught:
        found = find_checkpoint(tmp_path, "latest")
    assert found == ckpts / "step-000002"
    text = "\n".join(str(w.message) for w in caught)
    assert "step-000006: no COMPLETE marker" in text
    assert "step-000005: state.safetensors has" in text and "truncated" in text
    assert "step-000004: lora/pytorch_lora_weights.safetensors is missing" in text
    assert "step-000003: rng-rank0.safetensors does not match its recorded sha256" in text
    assert ".step-000007.tmp-123 (a save was interrupted)" in text
    assert load_checkpoint(found)["step"] == 2

    with pytest.raises(FinetuneError, match="step-000005 cannot be loaded: state.safetensors has"):
        load_checkpoint(ckpts / "step-000005")
    with pytest.raises(FinetuneError, match="cannot be resumed: lora/pytorch_lora_weights.safetensors is missing"):
        find_checkpoint(tmp_path, "step-000004")


def test_find_by_name_step_path_or_run_folder(tmp_path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, lora_files=LORA, state=make_state(step), keep=5)
    ckpts = tmp_path / "checkpoints"
    assert find_checkpoint(tmp_path, "step-000010") == ckpts / "step-000010"
    assert find_checkpoint(tmp_path, "10") == ckpts / "step-000010"
    assert find_checkpoint(tmp_path, str(ckpts / "step-000020")) == ckpts / "step-000020"
    assert find_checkpoint(tmp_path / "elsewhere", tmp_path) == ckpts / "step-000020"
    with pytest.raises(FinetuneError, match=r"--resume 30: no such checkpoint folder \(complete ones: step-000010, "
                                            r"step-000020\)"):
        find_checkpoint(tmp_path, "30")


def test_nothing_to_resume_is_one_line(tmp_path):
    with pytest.raises(FinetuneError) as e:
        find_checkpoint(tmp_path / "outputs" / "x", "latest")
    run = tmp_path / "outputs" / "x"
    assert str(e.value) == (f"no complete checkpoint in {run / 'checkpoints'}: nothing to resume; start the run over "
                            f"without --resume, with --out NEW_FOLDER or after deleting {run}")


def test_every_checkpoint_damaged_says_how_to_start_over(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, lora_files=LORA, state=make_state(step), keep=10)
    for step in (1, 2):
        state = tmp_path / "checkpoints" / f"step-00000{step}" / "state.safetensors"
        state.write_bytes(state.read_bytes()[:100])
    with pytest.warns(CheckpointWarning), pytest.raises(FinetuneError) as e:
        find_checkpoint(tmp_path, "latest")
    assert str(e.value) == (f"no complete checkpoint in {tmp_path / 'checkpoints'} (each one is damaged or unfinished: "
                            "see the warnings above): nothing to resume; start the run over without --resume, with "
                            f"--out NEW_FOLDER or after deleting {tmp_path}")


# ---------------------------------------------------------------------------- failures mid-save


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, lora_files=LORA, state=make_state(1), keep=1)
    real = ck._write_bytes

    def full(path, data):
        if path.name == "state.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ck, "_write_bytes", full)
    with pytest.raises(FinetuneError) as e:
        save_checkpoint(tmp_path, 2, lora_files=LORA, state=make_state(2), keep=1)
    msg = str(e.value)
    assert msg.startswith(f"no space left on device while writing checkpoint step-000002 in {tmp_path / 'checkpoints'}; "
                          "the previous checkpoint step-000001 is intact")
    assert "\n" not in msg
    assert names(tmp_path) == ["step-000001"]  # no temporary folder left
    assert load_checkpoint(find_checkpoint(tmp_path, "latest"))["step"] == 1

    # diffusers' save_lora_weights writes through safetensors' Rust code, which has its own error type
    def lora_full(folder):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')

    with pytest.raises(FinetuneError, match="no space left on device .* step-000001 is intact"):
        save_checkpoint(tmp_path, 2, lora_files=lora_full, state=make_state(2), keep=1)
    assert names(tmp_path) == ["step-000001"]


def test_disk_full_on_first_save(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "_write_bytes", lambda p, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(FinetuneError, match="step-000001 .*; there is no earlier checkpoint"):
        save_checkpoint(tmp_path, 1, lora_files=LORA, state=make_state(1), keep=1)
    assert names(tmp_path) == []


def test_interrupt_during_save_leaves_nothing_half_written(tmp_path):
    save_checkpoint(tmp_path, 1, lora_files=LORA, state=make_state(1), keep=3)

    def ctrl_c(folder):
        (folder / runs.WEIGHT_NAME).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, lora_files=ctrl_c, state=make_state(2), keep=3)
    with pytest.raises(KeyboardInterrupt):  # re-saving an existing step: the old folder comes back
        save_checkpoint(tmp_path, 1, lora_files=ctrl_c, state=make_state(1), keep=3)
    assert names(tmp_path) == ["step-000001"]
    assert load_checkpoint(find_checkpoint(tmp_path, "latest"))["step"] == 1


def test_lora_writer_must_write_something(tmp_path):
    with pytest.raises(RuntimeError, match="wrote nothing"):
        save_checkpoint(tmp_path, 1, lora_files=lambda folder: None, state=make_state(1), keep=1)
    assert names(tmp_path) == []


SAVER = """
import sys, torch
from pathlib import Path
from finetune.errors import FinetuneError
from finetune.runs import find_checkpoint
from finetune.train.checkpoint import capture_rng, load_checkpoint, save_checkpoint

run = Path(sys.argv[1])
try:
    step = load_checkpoint(find_checkpoint(run, "latest"))["step"]
except FinetuneError:
    step = 0
while True:
    step += 1
    big = torch.full((256, 1024), float(step))  # 1 MB, so that kills land inside saves too
    state = {"step": step, "config": {}, "trainable": {"w": big}, "optimizer": {"state": {0: {"m": big * 2}}},
             "lr_scheduler": {}, "grad_scaler": None, "sampler": {"epoch": 0, "position": step},
             "rng": capture_rng()}
    save_checkpoint(run, step, lora_files={"unet.a.lora_A.weight": big[:8]}, state=state, keep=2)
    print("saved", step, flush=True)
"""


@pytest.mark.filterwarnings("ignore::finetune.train.checkpoint.CheckpointWarning")  # killed saves' temp folders
def test_kill_9_at_random_moments_never_leaves_an_unloadable_latest(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    run = tmp_path / "run"
    rng = random.Random(1234)
    previous = 0
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # the loop is running (imports are done)
        assert first.startswith("saved"), first
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        printed = [int(line.split()[1]) for line in [first, *child.stdout.readlines()]]
        child.stdout.close()

        found = find_checkpoint(run, "latest")
        state = load_checkpoint(found)
        step = state["step"]
        assert found.name == f"step-{step:06d}"
        assert torch.equal(state["trainable"]["w"], torch.full((256, 1024), float(step)))
        assert torch.equal(state["optimizer"]["state"][0]["m"], torch.full((256, 1024), 2.0 * step))
        # Every save that reported success survived; at most the one being written was lost.
        assert step >= printed[-1] and step >= previous, (attempt, step, printed)
        previous = step
    assert previous >= 4  # each child saved at least once before its kill


# ------------------------------------------------------------------------------- resume config


def run_cfg(**changes) -> dict:
    from finetune.config import load_config

    cfg = load_config("tiny-demo").to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg | {"_dataset_hash": "a" * 64, "_base_hash": "b" * 64, "_num_processes": 1}


def test_resume_may_change_length_saving_logging_sampling_export():
    saved = run_cfg()
    check_resume_compatible(saved, saved)
    check_resume_compatible(saved, run_cfg(train__max_steps=5000, train__save_every=7, train__keep_checkpoints=9,
                                           train__log_every=3, train__gradient_checkpointing=True,
                                           sample__prompts=["x"], sample__every=1, export__dtype="fp32",
                                           export__formats=["kohya"], data__workers=3))


def test_resume_refuses_changed_model_lora_data_and_loop_naming_each():
    saved = run_cfg()
    rank, opt = saved["lora"]["rank"], saved["train"]["optimizer"]
    other_opt = "adamw" if opt == "adamw8bit" else "adamw8bit"
    new = run_cfg(model__base="other", lora__rank=rank + 1, lora__targets=["to_q"], lora__train_text_encoder=True,
                  train__seed=saved["train"]["seed"] + 1, train__batch_size=saved["train"]["batch_size"] + 1,
                  train__grad_accum=saved["train"]["grad_accum"] + 1, train__optimizer=other_opt,
                  train__max_steps=9999) | {"_dataset_hash": "c" * 64}
    with pytest.raises(FinetuneError) as e:
        check_resume_compatible(saved, new)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith('cannot resume: the config differs from the checkpoint\'s run in the dataset (_dataset_hash) "aaaaaaaa')
    for part in ('model.base "', f"lora.rank {rank} -> {rank + 1}", 'lora.targets [', "lora.train_text_encoder false -> true",
                 "train.seed", "train.batch_size", "train.grad_accum", f'train.optimizer "{opt}" -> "{other_opt}"'):
        assert part in msg, part
    assert "train.max_steps " not in msg  # allowed, so not named as a change
    with pytest.raises(FinetuneError, match=r"lora.use_dora false -> true; set these back or start a new run "
                                            r"without --resume \(only train.max_steps"):
        check_resume_compatible(saved, run_cfg(lora__use_dora=True))
    with pytest.raises(FinetuneError, match=r"the number of processes \(_num_processes\) 1 -> 2"):
        check_resume_compatible(saved, saved | {"_num_processes": 2})
    with pytest.raises(FinetuneError, match=rf"train.lr {json.dumps(saved['train']['lr'])} -> <unset>"):
        check_resume_compatible(saved, {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
                                | {"train": {k: v for k, v in saved["train"].items() if k != "lr"}})

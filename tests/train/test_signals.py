"""GracefulStop: the first SIGINT/SIGTERM asks the loop to stop after its step; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finetune.runs import find_checkpoint
from finetune.train.checkpoint import load_checkpoint
from finetune.train.signals import GracefulStop


def wait_for(condition, seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_sigterm_requests_a_stop_and_a_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop(notice=False, repeat_after=0.0) as stop:
        assert not stop.requested and stop.exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.requested)
        assert stop.signum == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun follows Ctrl-C with SIGTERM: keep saving
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_duplicate_ctrl_c_from_the_launcher_does_not_count():
    with GracefulStop(notice=False, repeat_after=0.3) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_for(lambda: stop.requested)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwards the terminal's Ctrl-C to its workers
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):  # a person pressing Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)


def test_sigint_exit_code_and_notice(capfd):
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_for(lambda: stop.requested)
    assert stop.exit_code == 130
    assert "SIGINT: finishing this step and saving a checkpoint; press Ctrl-C again to stop at once" in capfd.readouterr().err


def test_ignored_signals_stay_ignored():
    original = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with GracefulStop(notice=False) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, original)


def test_must_be_entered_in_the_main_thread():
    errors = []

    def enter():
        try:
            with GracefulStop():
                pass
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


LOOP = """
import sys, time, torch
from pathlib import Path
from finetune.train.checkpoint import capture_rng, save_checkpoint
from finetune.train.signals import GracefulStop
from finetune import runs

run, slow = Path(sys.argv[1]), sys.argv[2] == "slow"

def state(step):
    return {"step": step, "config": {}, "trainable": {"w": torch.full((4,), float(step))},
            "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}, "grad_scaler": None,
            "sampler": {"epoch": 0, "position": step}, "rng": capture_rng()}

def lora(folder):
    (folder / runs.WEIGHT_NAME).write_bytes(b"half")
    if slow:
        print("saving", flush=True)
        time.sleep(30)

with GracefulStop() as stop:
    save_checkpoint(run, 0, lora_files={"a": torch.ones(2)}, state=state(0), keep=5)
    step = 0
    while True:
        step += 1
        time.sleep(0.02)  # one training step
        print("step", step, flush=True)
        if stop.requested:
            save_checkpoint(run, step, lora_files=lora, state=state(step), keep=5)
            print("resume with --resume latest", flush=True)
            sys.exit(stop.exit_code)
"""


def read_until(child: subprocess.Popen, line: str) -> None:
    while (got := child.stdout.readline()).strip() != line:
        assert got, f"the child ended before printing {line!r}: {child.stderr.read()}"


def start(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_loop_finishes_its_step_saves_and_exits_with_128_plus_signal(tmp_path, signum, code):
    child = start(tmp_path, "fast")
    read_until(child, "step 3")
    child.send_signal(signum)
    out, err = child.communicate(timeout=30)
    assert child.returncode == code, err
    steps = [3] + [int(line.split()[1]) for line in out.splitlines() if line.startswith("step")]
    assert out.splitlines()[-1] == "resume with --resume latest"
    found = find_checkpoint(tmp_path / "run", "latest")
    assert load_checkpoint(found)["step"] == steps[-1] >= 3
    assert f"{signal.Signals(signum).name}: finishing this step" in err


def test_second_ctrl_c_during_the_save_stops_at_once_and_corrupts_nothing(tmp_path):
    child = start(tmp_path, "slow")
    read_until(child, "step 2")
    child.send_signal(signal.SIGINT)
    read_until(child, "saving")
    time.sleep(1.2)  # a person's second Ctrl-C, not the launcher's duplicate of the first
    t0 = time.monotonic()
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=20)
    assert time.monotonic() - t0 < 10  # not the 30 s the save would have taken
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000"]
    assert load_checkpoint(find_checkpoint(tmp_path / "run", "latest"))["step"] == 0

"""The run folder's one completeness check, and an unfinished run flagged alike by export, sample and review."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune import runs
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.sample import SheetSettings, sample

from helpers_run import make_fake_run


def test_one_check_at_three_strictnesses(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    (folder / "lora").mkdir(parents=True)
    assert runs.checkpoint_problem(folder) == "no COMPLETE marker (its save did not finish)"
    (folder / "lora" / runs.WEIGHT_NAME).write_bytes(b"x" * 10)
    (folder / "state.json").write_text("{}")
    files = {f"lora/{runs.WEIGHT_NAME}": {"size": 10, "sha256": "0" * 64}, "state.json": {"size": 2, "sha256": "0" * 64}}
    (folder / "COMPLETE").write_text(json.dumps({"step": 2, "files": files}))
    assert runs.checkpoint_problem(folder) is None  # the adapter is there, at its size: export and sample use it
    assert runs.checkpoint_problem(folder, state=True) == "it holds no training state"  # nothing to resume
    files["state.safetensors"] = {"size": 0, "sha256": "0" * 64}
    (folder / "state.safetensors").write_bytes(b"")
    (folder / "COMPLETE").write_text(json.dumps({"step": 2, "files": files}))
    assert runs.checkpoint_problem(folder, state=True) is None
    assert "sha256" in runs.checkpoint_problem(folder, state=True, hashes=True)
    (folder / "lora" / runs.WEIGHT_NAME).write_bytes(b"x" * 9)
    assert "has 9 bytes" in runs.checkpoint_problem(folder)
    assert runs.complete_checkpoints(tmp_path / "run") == []


def adapter_checkpoint(run, step: int):
    """A checkpoint holding only the adapter (what export and sample need), complete."""
    folder = runs.checkpoint_dir(run, step)
    (folder / runs.LORA_DIR).mkdir(parents=True)
    runs.checkpoint_lora(folder).write_bytes(b"x" * step)
    files = {f"{runs.LORA_DIR}/{runs.WEIGHT_NAME}": {"size": step, "sha256": "0" * 64}}
    (folder / runs.MARKER).write_text(json.dumps({"step": step, "files": files}))
    return folder


def test_one_reading_of_latest_step_path_and_run(tmp_path):
    run = tmp_path / "run"
    first, second = adapter_checkpoint(run, 2), adapter_checkpoint(run, 4)
    (runs.checkpoint_dir(run, 6) / runs.LORA_DIR).mkdir(parents=True)  # unfinished: no marker
    find = lambda which: runs.find_checkpoint(run, which, resume=False)  # noqa: E731
    assert find("latest") == second  # the unfinished step 6 is not "latest"
    assert find("step-2") == find("2") == find("step-000002") == find(str(first)) == first
    assert find(str(run)) == second  # a run folder: its latest
    assert runs.find_checkpoint(tmp_path / "elsewhere", run, resume=False) == second
    assert runs.run_of(first) == runs.run_of(run) == run
    with pytest.raises(FinetuneError, match=r"--checkpoint 6: .*step-000006 is not a complete checkpoint: no COMPLETE "
                                            r"marker .* \(complete ones: step-000002, step-000004\)"):
        find("6")
    with pytest.raises(FinetuneError, match=r"--checkpoint step-8: .*step-000008 does not exist"):
        find("step-8")
    with pytest.raises(FinetuneError, match=r"--checkpoints 'best-one': use latest or step-N"):
        runs.find_checkpoint(run, "best-one", resume=False, option="--checkpoints")
    # to resume, the training state is needed too: these adapter-only checkpoints are none
    with pytest.warns(runs.CheckpointWarning, match="holds no training state"):
        with pytest.raises(FinetuneError, match="nothing to resume"):
            runs.find_checkpoint(run, "latest")
    with pytest.raises(FinetuneError, match="step-000002 cannot be resumed: it holds no training state"):
        runs.find_checkpoint(run, "step-2")


def test_an_unfinished_run_is_flagged_by_export_sample_and_review(tmp_path, monkeypatch):
    run = make_fake_run(tmp_path)
    assert runs.unfinished_note(run) is None
    shutil.rmtree(run / "lora")  # stopped at its checkpoint step-000005
    note = runs.unfinished_note(run)
    assert note.startswith(f"training unfinished: {run} stopped at step 5 of 10") and "step-000005" in note

    said = []
    path = export(run, "peft", echo=said.append)
    assert "step-000005" in path.name and f"warning: {note}" in said

    said = []
    quick = SheetSettings(seeds=[1], scales=[1.0], steps=2, width=64, height=64, watermark=False)
    gallery = sample(run, prompts=["a photo of [trigger] person"], settings=quick, out=tmp_path / "g",
                     progress=False, echo=said.append)  # sampled, not refused: what review's hint and export agree on
    assert said == [f"warning: {note}"]
    assert json.loads((gallery / "gallery.json").read_text())["checkpoints"] == ["step-000005"]

    from finetune.review import server

    class Bound(Exception):
        pass

    def bind(run_dir, port):
        raise Bound(run_dir)

    monkeypatch.setattr(server, "bind", bind)
    said = []
    with pytest.raises(Bound):
        server.review(run, open_browser=False, echo=said.append)
    assert said == [f"warning: {note}"]

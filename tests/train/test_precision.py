"""train.mixed_precision = "auto": what it picks on which hardware, where it is recorded, and resume refusing
another precision."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.train import precision as prec
from finetune.runs import find_checkpoint
from finetune.train.checkpoint import load_checkpoint
from finetune.train.lora import setup, train
from finetune.train.precision import resolve_precision

from train_helpers import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("caps, mode, reason", [
    ({"amx_bf16": True, "avx512_bf16": True}, "bf16", "AMX-BF16"),
    ({"amx_bf16": False, "avx512_bf16": True, "avx512_f": True}, "bf16", "AVX512-BF16"),
    ({"avx512_f": True, "avx2": True}, "no", "neither AMX-BF16 nor AVX512-BF16"),
    ({}, "no", "neither"),  # torch could not read the CPU's features
])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, caps, mode, reason):
    monkeypatch.setattr(prec, "cpu_capabilities", lambda: caps)
    p = resolve_precision("auto", CPU)
    assert p.mode == mode and reason in p.reason and p.reason.startswith("auto: ")
    assert p.dtype == {"bf16": torch.bfloat16, "no": torch.float32}[mode]


@pytest.mark.parametrize("capability, mode", [((9, 0), "bf16"), ((8, 6), "bf16"), ((8, 0), "bf16"),
                                              ((7, 5), "fp16"), ((6, 1), "fp16")])
def test_auto_on_cuda_is_bf16_from_ampere_on_else_fp16(monkeypatch, capability, mode):
    monkeypatch.setattr(prec, "cuda_capability", lambda device: capability)
    p = resolve_precision("auto", CUDA)
    assert p.mode == mode and f"{capability[0]}.{capability[1]}" in p.reason
    assert ("scaler" in p.reason) == (mode == "fp16")


def test_a_set_precision_is_kept_and_other_devices_get_fp32(monkeypatch):
    monkeypatch.setattr(prec, "cpu_capabilities", lambda: {})
    for asked in ("no", "bf16", "fp16"):
        assert resolve_precision(asked, CPU) == prec.Precision(asked, "set in the config")
    assert resolve_precision("auto", torch.device("mps")).mode == "no"


def test_the_user_presets_default_to_auto():
    from finetune.config import list_presets, load_preset

    for name in list_presets():
        expected = "no" if "tiny" in name else "auto"
        assert load_preset(name).train.mixed_precision == expected, name


def test_auto_is_recorded_with_its_reason_and_resume_refuses_another_precision(dataset, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(prec, "cpu_capabilities", lambda: {"avx512_bf16": True})
    cfg = tiny_config("train.max_steps=2", "train.mixed_precision=auto", "train.optimizer=adamw")
    run_dir = train(cfg, dataset, tmp_path / "run")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["precision"] == "bf16" and info["precision_reason"] == "auto: the CPU has AVX512-BF16"
    assert "bf16 (auto: the CPU has AVX512-BF16)" in capsys.readouterr().out  # the run header
    state = load_checkpoint(find_checkpoint(run_dir, "latest"))
    assert state["config"]["_precision"] == "bf16"

    longer = tiny_config("train.max_steps=3", "train.mixed_precision=auto", "train.optimizer=adamw")
    monkeypatch.setattr(prec, "cpu_capabilities", lambda: {})  # the same run on a CPU without bf16
    with pytest.raises(FinetuneError, match=r"cannot resume: the checkpoint was trained in bf16, but this run would "
                                            r"train in fp32 \(auto: the CPU has neither .*\).*"
                                            r"--set train.mixed_precision=bf16"):
        setup(longer, dataset, run_dir, resume="latest")
    with pytest.raises(FinetuneError, match=r"trained in bf16, but this run would train in fp32 \(set in the config\)"):
        setup(tiny_config("train.max_steps=3", "train.mixed_precision=no", "train.optimizer=adamw"), dataset,
              run_dir, resume="latest")
    # What "auto" resolved to, asked for by name, continues the run.
    run = setup(tiny_config("train.max_steps=3", "train.mixed_precision=bf16", "train.optimizer=adamw"), dataset,
                run_dir, resume="latest")
    assert run.step == 2 and run.precision.mode == "bf16"


def test_a_checkpoint_from_before_the_precision_was_recorded_reads_its_config(dataset, tmp_path):
    assert prec.saved_precision({"train": {"mixed_precision": "fp16"}}) == "fp16"
    assert prec.saved_precision({"train": {"mixed_precision": "auto"}, "_precision": "bf16"}) == "bf16"


def test_a_run_resumes_only_under_the_compile_setting_it_started_with(dataset, tmp_path):
    # Compiled kernels round differently from eager ones: exact resume holds under the same setting only.
    run_dir = train(tiny_config("train.max_steps=2", "train.optimizer=adamw"), dataset, tmp_path / "run")
    with pytest.raises(FinetuneError, match=r"cannot resume: the config differs from the checkpoint's run in "
                                            r"train.compile \"off\" -> \"denoiser\""):
        setup(tiny_config("train.max_steps=3", "train.optimizer=adamw", "train.compile=denoiser"), dataset, run_dir,
              resume="latest")


def lora_image(lora_dir, seed: int = 1):
    """A 64 px image from the fp32 tiny base with the LoRA (fixed prompt, seed and steps)."""
    import numpy as np

    from finetune.models import load_base

    pipe = load_base("tiny").pipe
    pipe.load_lora_weights(lora_dir)
    out = pipe("a photo of ohwx person", num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return np.asarray(out, dtype=np.float64)


def test_an_auto_trained_lora_draws_what_an_fp32_one_does_and_learns_alike(dataset, tmp_path, monkeypatch):
    """What bf16 costs, on the tiny base: the loss curves of fp32 and auto (bf16 here) follow each other,
    and an auto-trained LoRA's image is as near the fp32-trained one's as fp32 itself stays when only the
    order of its sums changes (2 threads instead of 1), and nearer than a change of seed takes it."""
    import numpy as np

    from finetune.train.metrics import read_metrics

    monkeypatch.setattr(prec, "cpu_capabilities", lambda: {"avx512_bf16": True})
    runs, threads = {}, torch.get_num_threads()
    try:
        for name, precision, seed, n in (("fp32", "no", 42, 1), ("fp32, 2 threads", "no", 42, 2),
                                         ("auto", "auto", 42, 1), ("other seed", "no", 7, 1)):
            torch.set_num_threads(n)
            cfg = tiny_config("train.max_steps=30", "train.optimizer=adamw", f"train.mixed_precision={precision}",
                              "train.log_every=5", f"train.seed={seed}")
            runs[name] = train(cfg, dataset, tmp_path / name.replace(" ", "-").replace(",", ""))
    finally:
        torch.set_num_threads(threads)
    assert json.loads((runs["auto"] / "run.json").read_text())["precision"] == "bf16"
    curves = {p: np.array([r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r])
              for p, d in runs.items()}
    # Measured: the 6 logged means (5 steps each) of auto within 0.21% of fp32's (another seed: ~8% off).
    assert (np.abs(curves["auto"] - curves["fp32"]) / curves["fp32"]).max() < 0.02, curves
    images = {name: lora_image(d / "lora") for name, d in runs.items()}
    gaps = {n: np.abs(images[n] - images["fp32"]) for n in images if n != "fp32"}
    mean, worst = ({n: getattr(g, stat)() for n, g in gaps.items()} for stat in ("mean", "max"))
    # Measured (mean / largest pixel difference): auto 0.0081 / 0.066, fp32 on 2 threads 0.0064 / 0.050,
    # another seed 0.0098 / 0.078 (the LoRA itself moves the base's image by 0.0084 on average). So no
    # tolerance tighter than ~0.05 holds between two trainings on this base, fp32 against fp32 included:
    # 30 steps amplify any change of rounding. The 0.03 of the fp16 export test (tests/test_export.py's
    # MERGED_FP16_TOL) measures another thing, one LoRA's finished weights rounded once. Here the bound is
    # that chaos: bf16 may move the image at most twice as far as a change of thread count does.
    for stat in (mean, worst):
        assert stat["auto"] < 2 * stat["fp32, 2 threads"], (mean, worst)
        assert stat["auto"] < stat["other seed"], (mean, worst)

"""Once their outputs are cached, the text encoders and the VAE leave the device; sampling brings them back."""

from __future__ import annotations

import contextlib
import mmap
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from finetune.models import load_base
from finetune.train import common
from finetune.train.lora import finish, fit, setup
from finetune.train.residency import Parked

from train_helpers import tiny_config, tiny_sdxl_config


def devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def assert_same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = dict([*reference.named_parameters(), *reference.named_buffers()])
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if "lora_" not in name:
            assert torch.equal(t, ref[name.replace(".base_layer", "")].to(t.dtype)), name


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_cached_encoders_and_vae_leave_the_device_and_come_back_for_sampling(dataset, tmp_path, arch):
    make = tiny_config if arch == "sd1" else tiny_sdxl_config
    cfg = make("train.max_steps=2", "sample.every=1", "sample.prompts=['a photo of [trigger] [class]']",
               "sample.steps=2", "train.optimizer=adamw")
    run = setup(cfg, dataset, tmp_path / "run")
    pipe = run.base.pipe
    idle = ["vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    assert sorted(run.idle_components()) == sorted(idle)
    for name in idle:  # emptied: no memory held (CPU run), structure and dtype kept
        assert devices(getattr(pipe, name)) == {"meta"}, name
    assert devices(run.denoiser) == {"cpu"}

    seen = {}
    original = run.parked.back

    def back():  # what sampling finds while the components are back
        with original():
            seen.update({n: devices(getattr(pipe, n)) for n in idle})
            yield

    run.parked.back = contextlib.contextmanager(back)
    fit(run)
    assert seen == {n: {"cpu"} for n in idle}
    assert (run.dir / "samples" / "step-000001" / "0-1.png").is_file()
    for name in idle:  # parked again after sampling
        assert devices(getattr(pipe, name)) == {"meta"}, name

    # What comes back is the base's weights, bit for bit.
    reference = load_base(cfg.model.base).pipe
    with original():
        for name in idle:
            assert_same_weights(getattr(pipe, name), getattr(reference, name))
    finish(run)
    assert (run.dir / "samples" / "step-000002" / "0-1.png").is_file()


def test_what_the_loop_runs_stays(dataset, tmp_path):
    run = setup(tiny_config("train.max_steps=1", "train.cache_latents=false"), dataset, tmp_path / "a")
    assert run.idle_components() == ["text_encoder"] and devices(run.base.pipe.vae) == {"cpu"}
    fit(run)
    run = setup(tiny_config("train.max_steps=1", "lora.train_text_encoder=true"), dataset, tmp_path / "b")
    assert run.idle_components() == ["vae"] and devices(run.base.pipe.text_encoder) == {"cpu"}
    fit(run)


def test_parked_on_an_accelerator_moves_to_cpu_memory_and_back():
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, *args, **kwargs):
            self.moves.append(str(args[0]))
            return self

    pipe = SimpleNamespace(vae=Module(), text_encoder=None)
    parked = Parked(pipe, torch.device("cuda", 0))
    assert parked.park(["vae", "text_encoder"]) == ["vae"]  # a pipeline without the component: nothing to do
    assert pipe.vae.moves == ["cpu"]
    with parked.back():
        assert pipe.vae.moves == ["cpu", "cuda:0"]
    assert pipe.vae.moves == ["cpu", "cuda:0", "cpu"]


def test_tied_weights_come_back_tied(tmp_path):
    """T5 (FLUX.1's second text encoder) holds its input embedding under two names."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    encoder[1].weight = encoder[0].weight
    want = encoder[0].weight.detach().clone()
    pipe = SimpleNamespace(text_encoder_2=encoder)
    parked = Parked(pipe, torch.device("cpu"))
    parked.park(["text_encoder_2"])
    assert devices(encoder) == {"meta"}
    with parked.back():
        assert encoder[1].weight is encoder[0].weight
        assert torch.equal(encoder[0].weight, want)
    parked.close()


def file_resident_mb() -> float:
    """This process's resident memory read from mapped files (safetensors weights are), in MB."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_move_frozen_casts_tensor_by_tensor_and_lets_the_fp32_file_pages_go(tmp_path):
    """The frozen weights' bf16 copy is made without holding their fp32 file resident (Module.to held
    both: SD 1.5's UNet peaked at 3.3 GB fp32 + 1.7 GB bf16); the values are Module.to's."""
    from safetensors.torch import load_file, save_file

    from finetune.train.residency import move_frozen

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 4096), torch.nn.LayerNorm(4096))
    model.register_buffer("steps", torch.arange(5))  # not floating: moved, never cast
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    weights = load_file(str(tmp_path / "w.safetensors"))  # a memory map of the file, as diffusers reads it
    model.load_state_dict(weights, assign=True)
    parameter = model[1].weight
    before = file_resident_mb()
    expected = {k: t.to(torch.bfloat16) if t.is_floating_point() else t.clone() for k, t in weights.items()}
    assert file_resident_mb() - before > 70  # every page read: the file's 84 MB resident

    move_frozen(model, torch.device("cpu"), torch.bfloat16)
    # `weights` still maps the file (as the pipeline's loader does until its last tensor goes), yet the
    # pages the copies were made from have left this process's resident memory.
    assert file_resident_mb() - before < 10
    assert model[1].weight is parameter and parameter.dtype == torch.bfloat16
    for k, t in model.state_dict().items():
        assert t.dtype == expected[k].dtype and torch.equal(t, expected[k]), k
    # Read again, the released pages are the file's: the source tensors still hold their values.
    torch.testing.assert_close(weights["1.weight"].to(torch.bfloat16), expected["1.weight"], rtol=0, atol=0)


def test_move_frozen_without_a_dtype_only_moves():
    from finetune.train.residency import move_frozen

    model = torch.nn.Linear(4, 4)
    weight = model.weight.detach().clone()
    move_frozen(model, torch.device("cpu"))
    assert model.weight.dtype == torch.float32 and torch.equal(model.weight, weight)


REFAULTS = """
import resource, sys, torch
from finetune.train.residency import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
net = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096))
x = torch.randn(64, 4096)

def step():  # its weight gradients are 64 MB each: over glibc's largest mmap threshold, however it adapts
    net(x).square().mean().backward()
    net.zero_grad(set_to_none=True)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reused_memory_is_not_faulted_in_again_each_step():
    faults = {mode: int(subprocess.run([sys.executable, "-c", REFAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    gradients = 3 * 2 * 2**26 // mmap.PAGESIZE  # pages of the gradients made in the 3 steps
    assert faults["default"] > gradients * 0.9, faults  # each faulted in afresh
    assert faults["reuse"] < faults["default"] / 4, faults


def test_a_cpu_run_keeps_freed_memory_for_the_next_step(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(common, "reuse_freed_memory", lambda: calls.append(1) or True)
    common.make_accelerator(tiny_config(), tmp_path)
    assert calls == [1]

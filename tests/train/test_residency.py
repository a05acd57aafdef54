"""Once their outputs are cached, the text encoders and the VAE leave the device; sampling brings them back."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from finetune.models import load_base
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

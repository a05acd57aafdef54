"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from finetune.config import TrainConfig
from finetune.train.lora import fit, setup
from finetune.train.optim import make_lr_scheduler, make_optimizer

from train_helpers import tiny_config


def test_adamw8bit_keeps_8bit_state_for_every_lora_matrix(dataset, tmp_path):
    run = setup(tiny_config("train.max_steps=2", "train.optimizer=adamw8bit", "lora.rank=4"), dataset, tmp_path / "run")
    import bitsandbytes as bnb

    optimizer = run.optimizer.optimizer  # accelerate's wrapper holds the bitsandbytes optimizer
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    fit(run)
    lora = [(n, p) for n, p in run.denoiser.named_parameters() if p.requires_grad]
    assert len(lora) == 256 and min(p.numel() for _, p in lora) == 128  # rank 4 x 32: far below 4096
    for name, p in lora:
        state = optimizer.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, name
        assert state["state1"].shape == p.shape


def test_torch_adamw_is_the_alternative():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(optimizer="adamw", adam_beta1=0.8, weight_decay=0.0)
    opt = make_optimizer([{"params": [p], "lr": 0.1}], cfg)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.8, cfg.adam_beta2)


def test_torch_adamw_on_a_cpu_is_fused_and_steps_as_the_loop_over_tensors_does():
    torch.manual_seed(0)
    shapes = [(4, 32), (32, 4), (4, 64)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    cfg = TrainConfig(optimizer="adamw", weight_decay=1e-2)
    finals = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        if fused:
            opt = make_optimizer([{"params": params, "lr": 1e-3}], cfg)
            assert opt.param_groups[0]["fused"] is True  # one kernel, not a Python loop per tensor
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                    weight_decay=cfg.weight_decay, foreach=False)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        finals[fused] = params
    for a, b in zip(finals[True], finals[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
    ("cosine", [0.0, 0.5, 1.0, 0.75, 0.25]),
])
def test_lr_schedules(name, expected):
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr_scheduler=name, warmup_steps=2, max_steps=5, optimizer="adamw")
    opt = make_optimizer([{"params": [p], "lr": 1.0}], cfg)
    sched = make_lr_scheduler(opt, cfg)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)

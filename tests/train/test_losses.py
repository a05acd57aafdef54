"""The objective: targets, min-SNR-gamma weights, noise offset, the DreamBooth loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from finetune.models.tiny import SCHEDULER_CONFIG
from finetune.train.losses import dreambooth_loss, make_noise, min_snr_weights, per_sample_mse, target_for


@pytest.fixture()
def scheduler():
    return DDPMScheduler.from_config(SCHEDULER_CONFIG)


def test_min_snr_changes_the_per_sample_weights(scheduler):
    t = torch.tensor([10, 200, 500, 999])
    w = min_snr_weights(scheduler, t, 5.0)
    snr = compute_snr(scheduler, t)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.05 and w[-1] == 1.0  # easy (low-noise) timesteps are down-weighted, hard ones kept
    assert torch.all(w[:-1] <= w[1:])
    assert torch.equal(min_snr_weights(scheduler, t, 0.0), torch.ones(4))  # gamma 0 = off


def test_v_prediction_target_and_weights():
    scheduler = DDPMScheduler.from_config({**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    torch.testing.assert_close(target_for(scheduler, latents, noise, t), scheduler.get_velocity(latents, noise, t))
    snr = compute_snr(scheduler, t)
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_epsilon_target_is_the_noise(scheduler):
    noise = torch.randn(1, 4, 8, 8)
    assert target_for(scheduler, torch.randn(1, 4, 8, 8), noise, torch.tensor([3])) is noise


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    plain = make_noise(latents)
    torch.manual_seed(0)
    offset = make_noise(latents, 0.1)
    shift = offset - plain
    assert shift.abs().max() > 0
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))  # constant over each channel


def test_dreambooth_loss_weights_the_class_half():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert dreambooth_loss(per_sample, 2, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert dreambooth_loss(per_sample, 4, 0.5).item() == pytest.approx(8.5)
    assert per_sample_mse(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]

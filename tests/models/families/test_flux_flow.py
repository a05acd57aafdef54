"""FLUX.1's flow-matching objective, checked against FluxPipeline and its scheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from finetune.models.families import flux_flow
from finetune.models.families.flux_flow import FlowSampling
from finetune.models.families.flux_tiny import SCHEDULER_CONFIGS, TRANSFORMER_CONFIG


def test_packing_and_ids_are_flux_pipelines():
    latents = torch.randn(2, 16, 6, 8)
    packed = flux_flow.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(flux_flow.unpack(packed, 6, 8), latents)
    assert torch.equal(flux_flow.image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert flux_flow.seq_len(latents) == 12
    with pytest.raises(ValueError, match="multiples of 16 px"):
        flux_flow.pack(torch.randn(1, 16, 5, 8))


def test_flux_shift_is_the_pipelines_resolution_shift():
    s = FlowSampling()
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["dev"])
    u = torch.linspace(0.05, 0.95, 7)
    for seq in (16, 256, 1024, 4096):  # 64 px ... 1024 px
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert flux_flow.resolution_mu(seq, s) == pytest.approx(mu)
        assert torch.allclose(flux_flow.shift_sigmas(u, math.exp(mu)), sched.time_shift(mu, 1.0, u), atol=1e-6)
    # 1024 px is pushed further toward noise than 512 px
    ss = FlowSampling(sampler="flux_shift")
    assert (flux_flow.sigmas(u, 4096, ss) > flux_flow.sigmas(u, 1024, ss)).all()


def test_fixed_shift_is_the_schedulers():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # FLUX.1's static shift
    plain = torch.linspace(1.0, 1 / 1000, 1000)
    assert torch.allclose(flux_flow.shift_sigmas(plain, 3.0), sched.sigmas, atol=1e-5)


def test_samplers_draw_what_they_say():
    torch.manual_seed(0)
    u = flux_flow.draw_uniform(20000)
    uni = flux_flow.sigmas(u, 16, FlowSampling(sampler="uniform"))
    sig = flux_flow.sigmas(u, 16, FlowSampling(sampler="sigmoid", sigmoid_scale=1.0))
    logits = torch.logit(sig)
    assert abs(uni.mean() - 0.5) < 0.01 and abs(logits.mean()) < 0.03 and abs(logits.std() - 1.0) < 0.03
    narrow = flux_flow.sigmas(u, 16, FlowSampling(sampler="sigmoid", sigmoid_scale=0.5))
    assert narrow.std() < sig.std() < uni.std()  # logit-normal weights the middle
    shifted = flux_flow.sigmas(u, 16, FlowSampling(sampler="shift", shift=3.0))
    assert shifted.median() > 0.7 and torch.allclose(shifted, flux_flow.shift_sigmas(sig, 3.0))
    assert ((0 < shifted) & (shifted < 1)).all()
    with pytest.raises(ValueError, match="uniform, sigmoid, shift, flux_shift"):
        FlowSampling(sampler="cosine")


def test_velocity_target_follows_the_schedulers_euler_step():
    x, n = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    assert torch.equal(flux_flow.noisy(x, n, torch.tensor([0.0])), x)
    assert torch.equal(flux_flow.noisy(x, n, torch.tensor([1.0])), n)
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["schnell"])
    sched.set_timesteps(sigmas=[0.8, 0.3])
    at = flux_flow.noisy(x, n, torch.tensor([0.8]))
    # the exact velocity moves the scheduler from one point of the line to the next
    step = sched.step(flux_flow.velocity(x, n), sched.timesteps[0], at).prev_sample
    assert torch.allclose(step, flux_flow.noisy(x, n, torch.tensor([0.3])), atol=1e-5)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_predict_calls_the_transformer_as_the_pipeline_does(guidance):
    torch.manual_seed(0)
    t = FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=guidance).eval()
    latents, hidden, pooled = torch.randn(2, 16, 4, 6), torch.randn(2, 5, 32), torch.randn(2, 32)
    sig = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        got = flux_flow.predict(t, latents, sig, hidden, pooled, 3.5 if guidance else None)
        want = t(hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 4, 6), encoder_hidden_states=hidden,
                 pooled_projections=pooled, timestep=sig, img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
                 txt_ids=torch.zeros(5, 3), guidance=torch.full((2,), 3.5) if guidance else None).sample
    assert torch.equal(got, FluxPipeline._unpack_latents(want, 32, 48, 8))
    if guidance:
        other = flux_flow.predict(t, latents, sig, hidden, pooled, 1.0)
        assert not torch.allclose(other, got)  # the guidance input reaches the model
        with pytest.raises(ValueError, match="give the training guidance"):
            flux_flow.predict(t, latents, sig, hidden, pooled, None)
    else:
        with pytest.raises(ValueError, match="no guidance embedding"):
            flux_flow.predict(t, latents, sig, hidden, pooled, 3.5)

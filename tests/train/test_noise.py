"""The trainer's draws (fastpref.train.noise): one per (seed, pair, epoch), independent of the batch, and
noising that matches the diffusers schedulers."""

from __future__ import annotations

import pytest
import torch

from fastpref.train.models import TINY_MODELS, build_tiny_model
from fastpref.train.noise import WEIGHTING_SCHEMES, add_noise, derive_seed, draw_noise, noise_pairs, vae_generators

SEED = 11
SHAPE = (3, 4, 4)


def _ddpm(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def _flow():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.mark.parametrize("scheduler", [_ddpm, _flow], ids=["ddpm", "flow"])
def test_a_pair_draws_the_same_whatever_its_batch(scheduler):
    s = scheduler()
    n1, t1 = draw_noise(s, SHAPE, [5], 0, SEED)
    n2, t2 = draw_noise(s, SHAPE, [0, 5, 9], 0, SEED)
    assert torch.equal(n1[0], n2[1]) and torch.equal(t1[0], t2[1])
    n3, _ = draw_noise(s, SHAPE, [5], 1, SEED)  # another epoch: another draw
    n4, _ = draw_noise(s, SHAPE, [5], 0, SEED + 1)  # another seed: another draw
    assert not torch.equal(n1, n3) and not torch.equal(n1, n4)
    assert not torch.equal(n2[0], n2[2])  # pairs of one batch draw differently
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(1, 2, 0) != derive_seed(1, 2)


def test_vae_generators_are_per_pair_and_image():
    a = [torch.randn(3, generator=g) for g in vae_generators(SEED, [4, 7])]  # w4, w7, l4, l7
    b = [torch.randn(3, generator=g) for g in vae_generators(SEED, [7])]  # w7, l7
    assert torch.equal(a[1], b[0]) and torch.equal(a[3], b[1])
    assert not torch.equal(a[1], a[3])  # winner and loser of a pair: different samples


@pytest.mark.parametrize("scheduler", ["ddpm", "flow"])
def test_the_vae_draws_are_not_the_noise_draws(scheduler):
    # image j's posterior sample and the pair's noise at epoch j once came from one generator: the noise of
    # epoch 0 was the winner's latent sample shifted by one timestep draw (correlated, not independent)
    sched = _flow() if scheduler == "flow" else _ddpm()
    n = 4 * 8 * 8
    for epoch in (0, 1):
        noise, _ = draw_noise(sched, (4, 8, 8), [5], epoch, SEED)
        z = torch.randn(n + 8, generator=vae_generators(SEED, [5])[epoch]).double()
        flat = noise.reshape(-1).double()
        for shift in range(8):  # the timestep draw consumes a few values of the stream before the noise
            corr = torch.corrcoef(torch.stack([flat, z[shift: shift + n]]))[0, 1].abs().item()
            assert corr < 0.2, (epoch, shift, corr)


def test_flow_timestep_density_follows_the_weighting_scheme():
    s = _flow()
    _, t_logit = draw_noise(s, SHAPE, range(300), 0, SEED, "logit_normal")
    _, t_uniform = draw_noise(s, SHAPE, range(300), 0, SEED, "none")
    # logit-normal puts ~68% of u in (σ(−1), σ(1)) = (0.27, 0.73); uniform ~46%
    middle = lambda t: ((t >= 269) & (t < 731)).float().mean().item()  # noqa: E731
    assert middle(t_logit) > 0.58 > middle(t_uniform)
    assert "sigma_sqrt" not in WEIGHTING_SCHEMES  # a loss weighting, not a density: would sample uniformly
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        draw_noise(s, SHAPE, [0], 0, SEED, "cosmap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noising_matches_the_diffusers_schedulers(dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *SHAPE, generator=g, dtype=dtype)
    noise = torch.randn(2, *SHAPE, generator=g, dtype=dtype)
    t_index = torch.tensor([10, 900])
    eps, idx = torch.cat([noise, noise]), torch.cat([t_index, t_index])

    ddpm = _ddpm()
    out = add_noise(ddpm, x0, noise, t_index)
    torch.testing.assert_close(out.noisy, ddpm.add_noise(x0, eps, idx), rtol=0, atol=0)
    assert out.noisy.dtype == dtype and torch.equal(out.timesteps, idx)
    assert torch.equal(out.target, noise)  # ε-prediction: the pair's shared noise, (B, *S)

    v = _ddpm("v_prediction")
    out = add_noise(v, x0, noise, t_index)
    torch.testing.assert_close(out.target, v.get_velocity(x0, eps, idx), rtol=0, atol=0)

    flow = _flow()
    flow.set_timesteps(4)  # a sampler changed the live scheduler: training must not see it
    out = add_noise(flow, x0, noise, t_index)
    fresh = _flow()
    torch.testing.assert_close(out.timesteps, fresh.timesteps[idx])
    torch.testing.assert_close(out.noisy, fresh.scale_noise(x0, out.timesteps, eps))  # σ·ε + (1 − σ)·x0
    torch.testing.assert_close(out.target, eps - x0)
    with pytest.raises(ValueError, match="x0 must be"):
        add_noise(ddpm, x0[:3], noise, t_index)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_noise_pairs_share_noise_and_timestep(name):
    model = build_tiny_model(name, sample_size=8)
    x0 = torch.randn(6, 3, 8, 8)
    noised = noise_pairs(model, x0, [4, 0, 2], epoch=1, seed=SEED)
    assert torch.equal(noised.timesteps[:3], noised.timesteps[3:])
    noise, t_index = draw_noise(model.scheduler, x0.shape[1:], [4, 0, 2], 1, SEED, model.weighting_scheme)
    if model.prediction_type == "flow_matching":  # target = ε − x0
        torch.testing.assert_close(noised.target + x0, torch.cat([noise, noise]))
    elif model.prediction_type == "epsilon":
        assert torch.equal(noised.target, noise)
    else:
        assert noised.target.shape == (6, 3, 8, 8)
        assert torch.equal(noised.timesteps[:3], t_index)

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from editr2.flow import ode_step, sample, sde_step_with_logprob, sde_window, shifted_sigmas

# batched vs per-sample steps: rerun under other CPU kernels by `make test-numerics`
pytestmark = pytest.mark.numerics

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def linear_velocity(x, sigma):
    # a fixed "model": v = A x + b sin(sigma), enough to make trajectories depend on everything
    return (0.7 * x + 0.1 * torch.sin(sigma * 3)).to(x.dtype)


def test_shifted_sigmas():
    s = shifted_sigmas(10, shift=3.0)
    assert s.shape == (11,) and s.dtype == torch.float32 and s[0] == 1 and s[-1] == 0
    assert (s[1:] < s[:-1]).all()
    t = 0.5
    assert s[5].item() == pytest.approx(3 * t / (1 + 2 * t))
    assert torch.allclose(shifted_sigmas(4, shift=1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # the scheduler's static shift on the same base schedule gives the same sigmas
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    assert torch.allclose(scheduler.sigmas, s, atol=1e-6)
    with pytest.raises(ValueError):
        shifted_sigmas(0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ode_step_equals_diffusers_scheduler_exactly(dtype):
    sigmas = shifted_sigmas(8)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # shift 1: use our sigmas unchanged
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())
    assert torch.equal(scheduler.sigmas, sigmas)
    x = ours = randn(2, 16, 8, dtype=dtype)
    for i, t in enumerate(scheduler.timesteps):
        v = randn(2, 16, 8, seed=i + 1, dtype=dtype)
        x = scheduler.step(v, t, x).prev_sample
        ours = ode_step(v, ours, sigmas[i], sigmas[i + 1])
        assert ours.dtype == x.dtype and torch.equal(ours, x)


def test_ode_step_per_row_sigma():
    x, v = randn(3, 4, 5), randn(3, 4, 5, seed=1)
    sigma, sigma_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.8, 0.4, 0.0])
    out = ode_step(v, x, sigma, sigma_next)
    for b in range(3):
        assert torch.equal(out[b:b + 1], ode_step(v[b:b + 1], x[b:b + 1], sigma[b].item(), sigma_next[b].item()))


def test_sde_step_matches_formula_and_gaussian_logprob():
    x, v = randn(2, 6, 3), randn(2, 6, 3, seed=1)
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    gen = torch.Generator().manual_seed(5)
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, a, generator=gen)
    std_dev_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    expected_mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    assert torch.allclose(mean, expected_mean, atol=1e-6)
    assert torch.allclose(std, torch.full((2,), std_dev_t))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(prev, expected_mean + std_dev_t * math.sqrt(-dt) * noise, atol=1e-6)
    step_std = std_dev_t * math.sqrt(-dt)
    normal = torch.distributions.Normal(expected_mean, step_std)
    assert torch.allclose(log_prob, normal.log_prob(prev).mean(dim=(1, 2)), atol=1e-5)
    assert log_prob.shape == (2,) and log_prob.dtype == torch.float32


def test_sde_sigma_one_uses_sigma_max():
    x, v = randn(1, 4), randn(1, 4, seed=1)
    _, _, _, std = sde_step_with_logprob(v, x, 1.0, 0.9, 0.5)
    assert std.item() == pytest.approx(0.5 * math.sqrt(1 / (1 - 0.9)))  # default: sigma_next stands in for sigma
    _, _, _, std = sde_step_with_logprob(v, x, 1.0, 0.9, 0.5, sigma_max=0.8)
    assert std.item() == pytest.approx(0.5 * math.sqrt(1 / (1 - 0.8)))
    _, log_prob, mean, _ = sde_step_with_logprob(v, x, 1.0, 0.9, 0.5)
    assert torch.isfinite(log_prob).all() and torch.isfinite(mean).all()


def test_sde_zero_noise_equals_ode():
    sigmas = shifted_sigmas(6)
    x, v = randn(2, 8, 4), randn(2, 8, 4, seed=1)
    for i in range(6):
        prev, log_prob, mean, std = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], 0.0)
        assert torch.equal(prev, ode_step(v, x, sigmas[i], sigmas[i + 1]))
        assert torch.equal(log_prob, torch.zeros(2)) and torch.equal(std, torch.zeros(2))
    # low precision: the ODE rounds dt * v to bf16, the SDE stays in float32; they agree to one rounding
    xb, vb = x.bfloat16(), v.bfloat16()
    prev, _, _, _ = sde_step_with_logprob(vb, xb, sigmas[2], sigmas[3], 0.0)
    assert prev.dtype == torch.bfloat16
    assert torch.allclose(prev.float(), ode_step(vb, xb, sigmas[2], sigmas[3]).float(), rtol=1e-2, atol=1e-2)


def test_zero_noise_logprob_has_finite_gradients():
    v = randn(2, 5).requires_grad_()
    _, log_prob, _, _ = sde_step_with_logprob(v, randn(2, 5, seed=1), 0.5, 0.3, 0.0)
    log_prob.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rescoring_gives_ratio_exactly_one(dtype):
    x, v = randn(3, 8, 4, dtype=dtype), randn(3, 8, 4, seed=1, dtype=dtype)
    prev, old, _, _ = sde_step_with_logprob(v, x, 0.8, 0.7, 1.3, generator=torch.Generator().manual_seed(0))
    assert prev.dtype == dtype
    _, new, _, _ = sde_step_with_logprob(v, x, 0.8, 0.7, 1.3, prev_sample=prev)
    assert torch.equal(torch.exp(new - old), torch.ones(3))


def test_logprob_gradient_flows_through_mean_only():
    x, v = randn(2, 6), randn(2, 6, seed=1).requires_grad_()
    prev, _, _, _ = sde_step_with_logprob(v.detach(), x, 0.8, 0.7, 1.0, generator=torch.Generator().manual_seed(0))
    _, log_prob, _, _ = sde_step_with_logprob(v, x, 0.8, 0.7, 1.0, prev_sample=prev)
    log_prob.sum().backward()
    assert v.grad.abs().sum() > 0 and torch.isfinite(v.grad).all()
    # the log-prob is maximal at the mean: moving the sample away lowers it
    _, lp_far, _, _ = sde_step_with_logprob(v.detach(), x, 0.8, 0.7, 1.0, prev_sample=prev + 1.0)
    assert (lp_far < log_prob.detach()).all()


def test_sde_per_row_sigma_matches_scalar():
    x, v = randn(2, 5, 3), randn(2, 5, 3, seed=1)
    sigma, sigma_next = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.3])
    gen = torch.Generator().manual_seed(1)
    prev, lp, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=gen)
    for b in range(2):
        _, lp_b, mean_b, std_b = sde_step_with_logprob(v[b:b + 1], x[b:b + 1], sigma[b].item(), sigma_next[b].item(),
                                                       0.7, prev_sample=prev[b:b + 1])
        assert torch.allclose(lp[b:b + 1], lp_b) and torch.allclose(mean[b:b + 1], mean_b)
        assert torch.allclose(std[b:b + 1], std_b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_zero_noise_window_equals_all_ode(dtype):
    sigmas = shifted_sigmas(8)
    x = randn(2, 6, 4, dtype=dtype)
    ode = sample(linear_velocity, x, sigmas)
    sde = sample(linear_velocity, x, sigmas, sde_steps=(2, 3), noise_level=0.0)
    assert sde.log_probs.shape == (2, 2) and torch.equal(sde.log_probs, torch.zeros(2, 2))
    assert ode.log_probs.shape == (2, 0) and ode.latents.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(sde.latents, ode.latents)
    else:  # one float32-vs-low-precision rounding per SDE step
        assert torch.allclose(sde.latents.float(), ode.latents.float(), atol=3e-2)
    # the ODE sampler is diffusers' Euler scheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())
    ref = x
    for i, t in enumerate(scheduler.timesteps):
        ref = scheduler.step(linear_velocity(ref, scheduler.sigmas[i]), t, ref).prev_sample
    assert torch.equal(ref, ode.latents)


def test_sample_records_window_and_rescoring_is_on_policy():
    sigmas = shifted_sigmas(6)
    x = randn(3, 5, 2)
    seen = []
    out = sample(linear_velocity, x, sigmas, sde_steps=(1, 2), noise_level=1.0,
                 generator=torch.Generator().manual_seed(0), callback=lambda i, lat: seen.append(i))
    assert seen == list(range(6)) and out.sde_steps == (1, 2)
    assert len(out.trajectory) == len(out.next_latents) == len(out.means) == 2 and out.stds.shape == (3, 2)
    assert torch.equal(out.trajectory[1], out.next_latents[0])  # consecutive steps chain
    for k, i in enumerate(out.sde_steps):
        v = linear_velocity(out.trajectory[k], sigmas[i])
        _, lp, _, _ = sde_step_with_logprob(v, out.trajectory[k], sigmas[i], sigmas[i + 1], 1.0,
                                            prev_sample=out.next_latents[k], sigma_max=sigmas[1])
        assert torch.equal(torch.exp(lp - out.log_probs[:, k]), torch.ones(3))
    # noise changes the result, the same generator seed reproduces it
    again = sample(linear_velocity, x, sigmas, sde_steps=(1, 2), noise_level=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, out.latents)
    assert not torch.equal(sample(linear_velocity, x, sigmas).latents, out.latents)
    with pytest.raises(ValueError, match="sde_steps"):
        sample(linear_velocity, x, sigmas, sde_steps=(6,))


def test_sde_window():
    gen = torch.Generator().manual_seed(0)
    windows = {sde_window(10, 2, (0, 7), generator=gen) for _ in range(200)}
    assert windows == {(s, s + 1) for s in range(0, 6)}  # inside [0, 7)
    assert sde_window(10, 0) == ()
    assert sde_window(3, 2, (0, 7), generator=gen) in {(0, 1), (1, 2)}  # clipped to the schedule
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(10, 3, (0, 2))

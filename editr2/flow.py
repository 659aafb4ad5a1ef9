"""Rectified flow: the training loss (`training_sigmas`, `flow_matching_loss`) and sampling (the shifted schedule, the
Euler ODE step, and Flow-GRPO's SDE step with a Gaussian log-prob).

Conventions: `x` is the noisy latent `(B, ...)`, `v` the predicted velocity (noise - data), `sigma` runs from 1 (noise)
to 0 (data), and one step moves from `sigma` to `sigma_next < sigma`. Log-probs are computed in float32 and averaged
(not summed) over every non-batch dimension, as in Flow-GRPO, so their scale does not depend on the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


def shifted_sigmas(num_steps: int, shift: float = 3.0, device=None) -> Tensor:
    """`(num_steps + 1,)` float32 sigmas from 1 to 0 with the static shift `s*t / (1 + (s-1)*t)`."""
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"need num_steps >= 1 and shift > 0, got num_steps={num_steps}, shift={shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).to(device=device, dtype=torch.float32)


def _per_row(sigma, x: Tensor) -> Tensor:
    """A float, 0-dim or `(B,)` sigma as float32 `(B, 1, ..., 1)`, broadcastable against `x`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


def ode_step(v: Tensor, x: Tensor, sigma, sigma_next) -> Tensor:
    """Euler step `x + (sigma_next - sigma) * v`, rounded like diffusers' `FlowMatchEulerDiscreteScheduler.step`.

    Like the scheduler (with its sigmas on the latents' device), `dt` is computed in float32, `dt * v` in `v`'s dtype,
    the sum in float32 (`x` upcast), and the result is cast back to `v`'s dtype: both give bit-identical latents.
    """
    dt = _per_row(sigma_next, x) - _per_row(sigma, x)  # (B, 1, ..., 1) float32
    return (x.float() + dt.to(v.dtype) * v).to(v.dtype)


def sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, *, prev_sample=None, generator=None, sigma_max=None):
    """One SDE step of Flow-GRPO and the Gaussian log-prob of its sample.

    The step has `std_dev_t = noise_level * sqrt(sigma / (1 - sigma))` and
    `mean = x * (1 + std_dev_t**2 / (2 sigma) * dt) + v * (1 + std_dev_t**2 (1 - sigma) / (2 sigma)) * dt`,
    and draws `prev = mean + std_dev_t * sqrt(-dt) * eps`. At `sigma == 1` the ratio is infinite; like Flow-GRPO the
    denominator then uses the schedule's second sigma, `sigma_max` (default: `sigma_next`, which is that sigma for the
    first step).

    Args:
        v, x: `(B, ...)` velocity and current latent (any float dtype; the math runs in float32).
        sigma, sigma_next: floats, 0-dim or `(B,)` tensors (one sigma per batch row).
        noise_level: the SDE noise scale `a` (0 gives the ODE step).
        prev_sample: a sample to score instead of drawing one (the ratio's recomputation).
        generator: a `torch.Generator` for the noise.
        sigma_max: the value used in place of `sigma` in `1 - sigma` where `sigma == 1`.

    Returns:
        `(prev_sample, log_prob, mean, std)`: the sample `(B, ...)` in `x`'s dtype (the log-prob is of this rounded
        sample, so rescoring it gives the same number); `log_prob (B,)` float32, the Gaussian log-density averaged over
        non-batch dims, and exactly 0 for rows whose step std is 0 (noise_level 0 or dt 0), where there is no density;
        `mean (B, ...)` float32; `std (B,)` float32, the `std_dev_t` above (the step's std is `std * sqrt(-dt)`).
    """
    x32, v32 = x.float(), v.float()
    sigma, sigma_next = _per_row(sigma, x), _per_row(sigma_next, x)  # (B, 1, ..., 1)
    guard = _per_row(sigma_next if sigma_max is None else sigma_max, x)
    dt = sigma_next - sigma  # <= 0
    std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, guard, sigma)))
    mean = x32 * (1 + std_dev_t**2 / (2 * sigma) * dt) + v32 * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_dev_t * torch.sqrt(-dt)  # (B, 1, ..., 1)
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device).to(x.device)
        prev_sample = (mean + step_std * noise).to(x.dtype)
    # zero-std rows: score with std 1 and zero the result, so no NaN reaches the values or the gradients
    has_density = step_std > 0
    safe_std = torch.where(has_density, step_std, torch.ones_like(step_std))
    log_prob = -((prev_sample.detach().float() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std)
    log_prob = log_prob - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(has_density, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std_dev_t.reshape(-1)


@dataclass
class SampleOutput:
    """What `sample` returns. K = len(sde_steps).

    Args:
        latents: `(B, ...)` final latent, in the input's dtype.
        trajectory: K latents `(B, ...)`, the input `x` of each SDE step (what the policy is re-run on).
        next_latents: K latents `(B, ...)`, the sample each SDE step drew (the `prev_sample` the ratio scores).
        log_probs: `(B, K)` float32 log-probs of those samples.
        means: K float32 `(B, ...)` SDE means (for the KL to a reference model).
        stds: `(B, K)` float32 `std_dev_t` of each SDE step.
        sde_steps: the step indices that used the SDE.
    """

    latents: Tensor
    trajectory: list[Tensor] = field(default_factory=list)
    next_latents: list[Tensor] = field(default_factory=list)
    log_probs: Tensor | None = None
    means: list[Tensor] = field(default_factory=list)
    stds: Tensor | None = None
    sde_steps: tuple[int, ...] = ()


def sample(velocity_fn: Callable, x: Tensor, sigmas: Tensor, *, sde_steps=(), noise_level=0.0, generator=None,
           callback=None) -> SampleOutput:
    """Integrates from `sigmas[0]` to `sigmas[-1]`: ODE steps everywhere except the indices in `sde_steps`.

    Args:
        velocity_fn: `velocity_fn(x, sigma) -> v`, with `x (B, ...)` and `sigma` a 0-dim float32 tensor.
        x: `(B, ...)` starting latent (noise at `sigmas[0]`).
        sigmas: `(num_steps + 1,)` decreasing schedule, e.g. `shifted_sigmas(num_steps)`.
        sde_steps: step indices (in `[0, num_steps)`) that use the SDE and record a log-prob (the RL window).
        noise_level: SDE noise scale for those steps.
        generator: a `torch.Generator` for the SDE noise.
        callback: `callback(i, x)` called after step i with the new latent.
    """
    sde_steps = tuple(sorted(set(int(i) for i in sde_steps)))
    num_steps = len(sigmas) - 1
    if any(not 0 <= i < num_steps for i in sde_steps):
        raise ValueError(f"sde_steps must lie in [0, {num_steps}), got {sde_steps}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    out = SampleOutput(latents=x, sde_steps=sde_steps)
    log_probs, stds = [], []
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, sigma)  # (B, ...)
        if i in sde_steps:
            x_next, log_prob, mean, std = sde_step_with_logprob(
                v, x, sigma, sigma_next, noise_level, generator=generator, sigma_max=sigmas[1]
            )
            out.trajectory.append(x)
            out.next_latents.append(x_next)
            out.means.append(mean)
            log_probs.append(log_prob)
            stds.append(std)
        else:
            x_next = ode_step(v, x, sigma, sigma_next).to(x.dtype)
        x = x_next
        if callback is not None:
            callback(i, x)
    out.latents = x
    out.log_probs = torch.stack(log_probs, dim=1) if log_probs else x.new_zeros(x.shape[0], 0, dtype=torch.float32)
    out.stds = torch.stack(stds, dim=1) if stds else x.new_zeros(x.shape[0], 0, dtype=torch.float32)
    return out


def sde_window(num_steps: int, window_size: int = 2, window_range: tuple[int, int] = (0, 7), generator=None):
    """A random window of `window_size` consecutive SDE steps lying inside `[window_range[0], window_range[1])`.

    The start is drawn uniformly from `window_range[0] .. window_range[1] - window_size` (Flow-GRPO-Fast's choice).
    """
    low, high = window_range
    high = min(high, num_steps)
    if window_size < 0 or low < 0 or high - low < window_size:
        raise ValueError(f"a window of {window_size} steps does not fit in {window_range} with {num_steps} steps")
    if window_size == 0:
        return ()
    start = int(torch.randint(low, high - window_size + 1, (1,), generator=generator))
    return tuple(range(start, start + window_size))


# ---------------------------------------------------------------------------------------------------------------------
# Training (flow matching)
# ---------------------------------------------------------------------------------------------------------------------


def training_sigmas(batch_size: int, generator: torch.Generator | None = None, logit_mean: float = 0.0,
                    logit_std: float = 1.0, high_sigma_prob: float = 0.0, high_sigma_min: float = 0.85) -> Tensor:
    """`(B,)` training noise levels: `sigmoid(N(logit_mean, logit_std))` (logit-normal), each replaced with
    probability `high_sigma_prob` by `U(high_sigma_min, 1)` (where sampling decides the layout).

    Draws, in this order, `randn(B)` and, when `high_sigma_prob > 0`, `rand(B)` twice from `generator` (CPU).
    """
    if batch_size < 1 or logit_std < 0 or not 0 <= high_sigma_prob <= 1 or not 0 <= high_sigma_min < 1:
        raise ValueError(f"pass batch_size >= 1, logit_std >= 0, high_sigma_prob in [0, 1] and high_sigma_min in "
                         f"[0, 1); got {batch_size}, {logit_std}, {high_sigma_prob}, {high_sigma_min}.")
    sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator))  # (B,)
    if high_sigma_prob > 0:
        high = torch.rand(batch_size, generator=generator) < high_sigma_prob  # (B,)
        uniform = high_sigma_min + (1 - high_sigma_min) * torch.rand(batch_size, generator=generator)  # (B,)
        sigma = torch.where(high, uniform, sigma)
    return sigma


def flow_matching_loss(velocity_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, noise: Tensor, sigma: Tensor,
                       weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The rectified-flow (flow-matching) loss: `x_s = (1 - s) x0 + s eps`, velocity target `eps - x0` (the sampler's
    and the scheduler's convention: `v` points from data to noise).

    Args:
        velocity_fn: `(x_s (B, N, C), sigma (B,)) -> v (B, N, C)`, the model (any dtype; the error is taken in fp32).
        x0: `(B, N, C)` clean (packed) latents.
        noise: `(B, N, C)` standard Gaussian noise.
        sigma: `(B,)` noise levels in [0, 1].
        weight: optional `(B, N)` per-token weights of the squared error (e.g. edit regions weighted up).

    Returns:
        `(loss, err)`: the scalar mean of `weight * err` (of `err` without weights), and `err (B, N)`, the squared
        velocity error averaged over channels.
    """
    if x0.shape != noise.shape or sigma.shape != x0.shape[:1]:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must match, and sigma "
                         f"{tuple(sigma.shape)} be (B,) = ({x0.shape[0]},).")
    s = sigma[:, None, None]  # (B, 1, 1)
    noisy = (1 - s) * x0 + s * noise  # (B, N, C)
    v = velocity_fn(noisy, sigma)  # (B, N, C)
    err = ((v.float() - (noise - x0)) ** 2).mean(-1)  # (B, N)
    loss = err.mean() if weight is None else (weight * err).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"flow-matching loss is {loss.item()}: lower the learning rate or check the inputs.")
    return loss, err

"""RL building blocks shared by the text (reasoning tokens) and image (SDE steps) sides of Edit-R2.

Every function is pure and small: group-normalised advantages, the PPO clipped surrogate, Flow-GRPO's KL between the
SDE means of the policy and a reference, the multi-turn trajectory filter, and a finite-loss guard.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor


def _as_rewards(rewards) -> Tensor:
    """Rewards as a float tensor (float32, or float64 when given); None, NaN and +-inf (a missing reward) become NaN."""
    if isinstance(rewards, Tensor):
        r = rewards if rewards.dtype == torch.float64 else rewards.float()
    else:
        r = torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float32)
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))


def missing_rewards(rewards) -> Tensor:
    """`(N,)` bool: which rewards are missing (None, NaN or +-inf). Every function of this module skips them."""
    return torch.isnan(_as_rewards(rewards).reshape(-1))


def _group_index(group_ids, n: int, device=None) -> tuple[Tensor, int]:
    """`(N,)` long index of each entry's group (0..num_groups-1) and the number of groups."""
    if isinstance(group_ids, Tensor):
        ids = group_ids.reshape(-1).tolist()
    else:
        ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries but rewards has {n}; pass one group id per reward")
    index: dict[Hashable, int] = {}
    inverse = torch.tensor([index.setdefault(g, len(index)) for g in ids], dtype=torch.long, device=device)
    return inverse, len(index)


def _group_stats(rewards: Tensor, group_ids) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(inverse (N,), mean (num_groups,), std (num_groups,), valid (N,))` over the valid (non-NaN) rewards."""
    valid = ~torch.isnan(rewards)  # (N,)
    inverse, num_groups = _group_index(group_ids, rewards.numel(), rewards.device)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    zeros = rewards.new_zeros(num_groups)
    count = zeros.index_add(0, inverse, valid.to(rewards.dtype)).clamp(min=1)  # (num_groups,)
    mean = zeros.index_add(0, inverse, r) / count
    sq = torch.where(valid, (r - mean[inverse]) ** 2, torch.zeros_like(r))
    std = (zeros.index_add(0, inverse, sq) / count).sqrt()  # population std, as Flow-GRPO's np.std
    return inverse, mean, std, valid


def group_advantages(rewards, group_ids, *, global_std: bool = True, eps: float = 1e-4, clip: float | None = 5.0):
    """GRPO advantages: `(r - group mean) / (std + eps)`, clipped to `[-clip, clip]`.

    Args:
        rewards: `(N,)` tensor or sequence of floats. None, NaN or +-inf marks a missing reward (a judge that failed):
            it is left out of every mean and std and its advantage is 0, so that sample gets no gradient, never a
            made-up one.
        group_ids: `(N,)` int tensor or a sequence of hashables; entries with the same id form one group (the G rollouts
            of one prompt / session / turn).
        global_std: divide by the population std of all valid rewards in the batch (Flow-GRPO's default) instead of
            the group's own std. Pass the whole step's batch (every process, every micro-batch): over a batch of one
            session, a group whose rewards differ only by noise gets advantages of order 1 (`std_sample_count`).
        eps: added to the std, so a group whose rewards all match gets advantage 0.
        clip: clip magnitude (None: no clipping).

    Returns:
        `(N,)` float32 advantages; within each group the valid ones have zero mean (up to the clipping).
    """
    r = _as_rewards(rewards).reshape(-1).double()  # (N,) float64: near-equal rewards would cancel badly in float32
    inverse, mean, group_std, valid = _group_stats(r, group_ids)
    if global_std:
        std = r[valid].std(unbiased=False) if valid.any() else r.new_zeros(())
    else:
        std = group_std[inverse]
    adv = (r - mean[inverse]) / (std + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return torch.where(valid, adv, torch.zeros_like(adv)).float()


def std_sample_count(rewards, group_ids, *, global_std: bool = True) -> int:
    """How many valid rewards the std of `group_advantages` is taken over: all of the batch with `global_std`, else
    the smallest group's (0 when there is none)."""
    valid = ~missing_rewards(rewards)  # (N,)
    if global_std:
        return int(valid.sum())
    inverse, num_groups = _group_index(group_ids, valid.numel())
    if num_groups == 0:
        return 0
    return int(torch.zeros(num_groups, dtype=torch.long).index_add(0, inverse, valid.long()).min())


def frac_reward_zero_std(rewards, group_ids) -> float:
    """Fraction of groups whose valid rewards are all equal (no learning signal; TRL's metric name).

    Compared exactly (max == min), not through a float std. A group with at most one valid reward counts as equal.
    """
    r = _as_rewards(rewards).reshape(-1)  # (N,)
    inverse, num_groups = _group_index(group_ids, r.numel(), r.device)
    if num_groups == 0:
        return 0.0
    valid = ~torch.isnan(r)
    high = r.new_full((num_groups,), -float("inf")).scatter_reduce(0, inverse[valid], r[valid], "amax")
    low = r.new_full((num_groups,), float("inf")).scatter_reduce(0, inverse[valid], r[valid], "amin")
    return ((high <= low) | torch.isinf(high)).float().mean().item()


def _clip_bounds(clip_range) -> tuple[float, float]:
    low, high = clip_range if isinstance(clip_range, (tuple, list)) else (clip_range, clip_range)
    if low < 0 or high < 0:
        raise ValueError(f"clip_range must be >= 0 (an epsilon, or a (low, high) pair of epsilons), got {clip_range}")
    return 1.0 - low, 1.0 + high


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range, mask=None):
    """PPO clipped surrogate `mean(max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)))`, with `r = exp(lp - old_lp)`.

    Args:
        log_prob: `(B,)` image-step log-probs or `(B, L)` token log-probs of the current policy.
        old_log_prob: same shape, from the sampling policy (no gradient needed).
        advantages: `(B,)` (broadcast over tokens) or the shape of `log_prob`.
        clip_range: eps, or `(eps_low, eps_high)` for asymmetric clipping (ratio kept in `[1 - low, 1 + high]`).
        mask: bool or 0/1 tensor of `log_prob`'s shape (or broadcastable to it); False entries (padding, filtered
            turns) contribute exactly zero loss and zero gradient, even when their log-probs are not finite.

    Returns:
        `(loss, clip_fraction, ratio)`: the masked mean over all kept entries (token-level mean for text), the
        fraction of kept entries where clipping removed the gradient, and the `ratio` tensor (1 where masked).
    """
    low, high = _clip_bounds(clip_range)
    adv = advantages.reshape(advantages.shape + (1,) * (log_prob.ndim - advantages.ndim)).to(log_prob.dtype)
    keep = torch.ones_like(log_prob, dtype=torch.bool) if mask is None else mask.bool().expand_as(log_prob)
    # where (not multiply) so a NaN/inf in a masked entry cannot leak into values or gradients
    ratio = torch.exp(torch.where(keep, log_prob - old_log_prob, torch.zeros_like(log_prob)))
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(low, high)
    loss = torch.where(keep, torch.maximum(unclipped, clipped), torch.zeros_like(ratio))
    was_clipped = keep & (((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0)))
    num_kept = keep.sum().clamp(min=1)
    return loss.sum() / num_kept, was_clipped.sum() / num_kept, ratio


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std) -> Tensor:
    """Per-sample KL between the policy's and the reference's SDE steps: `mean((mean - ref)^2) / (2 std^2)`, `(B,)`.

    Both steps are Gaussians with the same std, so the KL is the squared mean gap over twice the variance. The step
    variance is `std^2 |dt|`; like Flow-GRPO we drop `|dt|` (it only rescales beta per step), so beta values tuned for
    Flow-GRPO transfer. `std` is `sde_step_with_logprob`'s `std_dev_t`, a float or `(B,)`, and must be > 0.
    """
    sq = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))  # (B,)
    std = torch.as_tensor(std, dtype=torch.float32, device=sq.device).reshape(-1)
    return sq / (2 * std**2)


FILTER_MODES = ("if_zero", "threshold", "none")


def trajectory_filter(if_scores: Tensor, mode: str = "if_zero", threshold: float = 0.0) -> Tensor:
    """Which turns of each rollout get gradient, `(G, T)` bool (True = trains).

    After the first turn k that fails hard, the turns after k are masked: they were conditioned on a broken state, so
    their rewards say little about their own actions. Turn k itself still trains (its low reward is the signal).

    Args:
        if_scores: `(G, T)` instruction-following scores per rollout and turn; NaN (missing) never triggers the filter.
        mode: "if_zero" (fail = IF == 0), "threshold" (fail = IF <= threshold) or "none" (all turns train).
        threshold: the threshold for mode "threshold".
    """
    if mode not in FILTER_MODES:
        raise ValueError(f"mode must be one of {FILTER_MODES}, got {mode!r}")
    if if_scores.ndim != 2:
        raise ValueError(f"if_scores must be (G, T), got shape {tuple(if_scores.shape)}")
    if mode == "none":
        return torch.ones_like(if_scores, dtype=torch.bool)
    failed = if_scores == 0 if mode == "if_zero" else if_scores <= threshold  # NaN compares False
    failed_before = failed.long().cumsum(dim=1) - failed.long()  # (G, T) failures strictly before each turn
    return failed_before == 0


def is_finite_loss(loss: Tensor) -> bool:
    """True when every element of `loss` is finite; the trainer skips the optimiser step otherwise.

    Under data parallelism, reduce this flag across ranks (all must skip together) before acting on it.
    """
    return bool(torch.isfinite(loss.detach()).all())

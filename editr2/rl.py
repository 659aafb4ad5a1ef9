"""The Edit-R2 objective, for the text (reasoning tokens) and image (SDE steps) sides, as pure torch functions.

In the order a training step uses them: reasoning-token log-probs from logits (`token_logps_from_logits`),
session-group ids (`session_group_ids`) and group-normalised advantages (`group_advantages`), the multi-turn
trajectory filter and the masks it gives (`trajectory_filter`, `training_masks`), the PPO clipped surrogate
(`clipped_surrogate`), Flow-GRPO's KL between the SDE means of the policy and a reference (`gaussian_mean_kl`), the
joint loss of one turn's G rollouts over both (`joint_clipped_loss`), and a finite-loss guard. The model calls
(transformer velocities, the text encoder's logits) live in `trl_editr2.policy`.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor


def token_logps_from_logits(logits: Tensor, token_ids: Tensor, mask: Tensor | None = None, *,
                            temperature: float = 1.0, suppressed_ids: Sequence[int] = ()) -> Tensor:
    """`(G, L)` float32 log-probs of `token_ids` under `log_softmax(logits / temperature)` (TRL's per-token logps).

    Args:
        logits: `(G, L, V)`, `logits[:, k]` predicting `token_ids[:, k]` (of a forward over `[prompt | completion]`,
            the caller passes `logits[:, P - 1 : -1]`).
        token_ids: `(G, L)` long.
        mask: `(G, L)` bool, False at padding (log-prob 0 there); None keeps every token.
        temperature: the sampling temperature (> 0).
        suppressed_ids: tokens the sampler never draws: probability 0, as in the distribution it drew from.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    if logits.ndim != 3 or logits.shape[:2] != token_ids.shape:
        raise ValueError(f"logits must be (G, L, V) for token_ids (G, L) = {tuple(token_ids.shape)}, got "
                         f"{tuple(logits.shape)}; pass the logits that predict the tokens, logits[:, P - 1 : -1]")
    scaled = logits.float() / temperature  # (G, L, V), a new tensor: filled in place (no second vocabulary-size copy)
    if len(suppressed_ids):
        index = torch.as_tensor(list(suppressed_ids), dtype=torch.long, device=scaled.device)
        scaled.index_fill_(-1, index, -float("inf"))
    logps = torch.log_softmax(scaled, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (G, L)
    return logps if mask is None else torch.where(mask.bool(), logps, torch.zeros_like(logps))


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


GROUP_KEYS = ("session", "turn")


def session_group_ids(num_sessions: int, num_generations: int, num_turns: int, group_key: str = "session") -> Tensor:
    """`(S * G * T,)` long advantage-group ids of S sessions x G rollouts x T turns, in (session, rollout, turn) order.

    `group_key="session"`: the G x T samples of a session form one group (the paper's), id s; `"turn"`: the G
    rollouts of one turn of a session do, id `s * T + turn`.
    """
    if group_key not in GROUP_KEYS:
        raise ValueError(f"group_key must be one of {GROUP_KEYS}, got {group_key!r}")
    sample = torch.arange(num_sessions * num_generations * num_turns)  # (S * G * T,)
    session = sample // max(num_generations * num_turns, 1)
    return session if group_key == "session" else session * num_turns + sample % max(num_turns, 1)


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


def _surrogate_terms(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range, mask):
    """Per-entry clipped-surrogate terms: `(loss, was_clipped, ratio, keep)`, all of `log_prob`'s shape."""
    low, high = _clip_bounds(clip_range)
    adv = advantages.reshape(advantages.shape + (1,) * (log_prob.ndim - advantages.ndim)).to(log_prob.dtype)
    keep = torch.ones_like(log_prob, dtype=torch.bool) if mask is None else mask.bool().expand_as(log_prob)
    # where (not multiply) so a NaN/inf in a masked entry cannot leak into values or gradients
    ratio = torch.exp(torch.where(keep, log_prob - old_log_prob, torch.zeros_like(log_prob)))
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(low, high)
    loss = torch.where(keep, torch.maximum(unclipped, clipped), torch.zeros_like(ratio))
    was_clipped = keep & (((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0)))
    return loss, was_clipped, ratio, keep


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
    loss, was_clipped, ratio, keep = _surrogate_terms(log_prob, old_log_prob, advantages, clip_range, mask)
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
    """Which turns of each rollout get gradient, `(G, T)` (or `(B, G, T)`) bool (True = trains).

    After the first turn k that fails hard, the turns after k are masked: they were conditioned on a broken state, so
    their rewards say little about their own actions. Turn k itself still trains (its low reward is the signal).

    Args:
        if_scores: `(G, T)` instruction-following scores per rollout and turn, or `(B, G, T)` for B sessions; NaN
            (missing) never triggers the filter.
        mode: "if_zero" (fail = IF == 0), "threshold" (fail = IF <= threshold) or "none" (all turns train).
        threshold: the threshold for mode "threshold".
    """
    if mode not in FILTER_MODES:
        raise ValueError(f"mode must be one of {FILTER_MODES}, got {mode!r}")
    if if_scores.ndim not in (2, 3):
        raise ValueError(f"if_scores must be (G, T) or (B, G, T), got shape {tuple(if_scores.shape)}")
    if mode == "none":
        return torch.ones_like(if_scores, dtype=torch.bool)
    failed = if_scores == 0 if mode == "if_zero" else if_scores <= threshold  # NaN compares False
    failed_before = failed.long().cumsum(dim=-1) - failed.long()  # (..., T) failures strictly before each turn
    return failed_before == 0


def training_masks(rewards: Tensor, keep: Tensor, filter_text: bool = False) -> tuple[Tensor, Tensor]:
    """`(image_mask, text_mask)`: which samples train their SDE steps and their reasoning tokens.

    `rewards` (NaN where missing) and [`trajectory_filter`]'s `keep` have one shape. A missing reward trains nothing; a
    filtered turn trains neither its image nor, unless `filter_text`, its reasoning.
    """
    valid = ~torch.isnan(rewards)
    return keep & valid, (keep | filter_text) & valid


def joint_clipped_loss(advantages: Tensor, step_log_probs: Tensor, old_step_log_probs: Tensor, image_mask: Tensor,
                       clip_range_image, *, step_kl: Tensor | None = None, beta: float = 0.0,
                       token_logps: Tensor | None = None, old_token_logps: Tensor | None = None,
                       token_mask: Tensor | None = None, clip_range_text=None, scale: float = 1.0) -> dict[str, Tensor]:
    """The Edit-R2 loss of one turn's G rollouts: the clipped surrogate of the SDE steps (+ KL) and of the reasoning.

    Per rollout `g` (the paper's accounting, where the text loss rides on the first of the K window steps):

        loss_g = (1 / K) * [ sum_j (L_img[g, j] + beta * KL[g, j]) * image_mask[g] + L_text[g] ]

    `L_img[g, j]` is the clipped surrogate of SDE step j (one entry), `L_text[g]` the mean of rollout g's clipped token
    surrogates over its own kept tokens (sequence-level mean), both with the rollout's one advantage. Masked
    terms are excluded with `where`, so they contribute exactly zero gradient even if not finite. The loss returned
    is `scale * sum_g loss_g`.

    Args:
        advantages: `(G,)`, shared by the text and the image.
        step_log_probs, old_step_log_probs: `(G, K)` SDE-window step log-probs, current policy / at rollout time.
        image_mask: `(G,)` bool: which rollouts train their image steps.
        clip_range_image, clip_range_text: eps or `(eps_low, eps_high)`.
        step_kl: `(G, K)` KL of each step to the reference ([`gaussian_mean_kl`]); None when `beta` is 0.
        beta: the KL weight.
        token_logps, old_token_logps: `(G, L)` reasoning-token log-probs; None when the text does not train.
        token_mask: `(G, L)` bool: the tokens that train (completion tokens of rollouts whose reasoning trains).
        scale: multiplies the summed loss (the trainer passes 1 / samples in the local optimizer step).

    Returns:
        `dict` with `loss` (scalar), `per_rollout` `(G,)` (`loss_g`), and detached diagnostics: `ratio_image (G, K)`,
        `kl (G, K)` (masked; zeros without `step_kl`), `clip_image` (clipped kept steps), `n_image` (kept steps),
        and with text `ratio_text (G, L)` (1 at padding), `clip_text` (sum of the per-rollout clip fractions over
        rollouts with a kept token) and `n_text` (how many such rollouts).
    """
    num_rollouts, num_steps = step_log_probs.shape
    if advantages.shape != (num_rollouts,) or image_mask.shape != (num_rollouts,):
        raise ValueError(f"advantages and image_mask must be (G,) = ({num_rollouts},), got "
                         f"{tuple(advantages.shape)} and {tuple(image_mask.shape)}")
    if beta > 0 and step_kl is None:
        raise ValueError("beta > 0 needs step_kl, the (G, K) KL of each step to the reference (gaussian_mean_kl)")
    adv = advantages.float()
    keep_steps = image_mask.bool().unsqueeze(1)  # (G, 1)
    step_loss, step_clipped, ratio_image, _ = _surrogate_terms(
        step_log_probs, old_step_log_probs, adv, clip_range_image, keep_steps
    )  # (G, K) each; a step is its own one-entry mean
    out = {"ratio_image": ratio_image.detach(), "clip_image": step_clipped.sum(),
           "n_image": keep_steps.sum() * num_steps}
    if step_kl is not None:
        kl = torch.where(keep_steps, step_kl, torch.zeros_like(step_kl))  # (G, K)
        step_loss = step_loss + beta * kl
        out["kl"] = kl.detach()
    else:
        out["kl"] = adv.new_zeros(num_rollouts, num_steps)
    per_rollout = step_loss.sum(dim=1)  # (G,)
    if token_logps is not None:
        if old_token_logps is None or token_mask is None or clip_range_text is None:
            raise ValueError("with token_logps, pass old_token_logps, token_mask and clip_range_text too")
        token_loss, token_clipped, ratio_text, keep_tokens = _surrogate_terms(
            token_logps, old_token_logps, adv, clip_range_text, token_mask
        )  # (G, L) each
        num_kept = keep_tokens.sum(dim=1).clamp(min=1)  # (G,): each rollout's mean over its own kept tokens
        per_rollout = per_rollout + token_loss.sum(dim=1) / num_kept
        out["ratio_text"] = ratio_text.detach()
        out["clip_text"] = (token_clipped.sum(dim=1) / num_kept).sum()  # per-rollout clip fractions, summed
        out["n_text"] = keep_tokens.any(dim=1).sum()  # rollouts with a kept token
    out["per_rollout"] = per_rollout / max(num_steps, 1)
    out["loss"] = scale * per_rollout.sum() / max(num_steps, 1)
    return out


def is_finite_loss(loss: Tensor) -> bool:
    """True when every element of `loss` is finite; the trainer skips the optimiser step otherwise.

    Under data parallelism, reduce this flag across ranks (all must skip together) before acting on it.
    """
    return bool(torch.isfinite(loss.detach()).all())

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editr2.rl import (
    clipped_surrogate,
    frac_reward_zero_std,
    gaussian_mean_kl,
    group_advantages,
    is_finite_loss,
    joint_clipped_loss,
    session_group_ids,
    token_logps_from_logits,
    training_masks,
    trajectory_filter,
)

# ----------------------------------------------------------------------------------------------------------------------
# Advantages


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.floats(-10, 10) | st.none()), min_size=1, max_size=24),
    st.booleans(),
)
def test_advantages_zero_mean_per_group(entries, global_std):
    groups, rewards = [g for g, _ in entries], [r for _, r in entries]
    adv = group_advantages(rewards, groups, global_std=global_std, clip=None)
    assert adv.shape == (len(entries),) and torch.isfinite(adv).all()
    for g in set(groups):
        kept = [a for a, gg, r in zip(adv.tolist(), groups, rewards) if gg == g and r is not None]
        if kept:
            assert abs(sum(kept) / len(kept)) < 1e-4 * max(1.0, max(abs(a) for a in kept))
    for a, r in zip(adv.tolist(), rewards):
        if r is None:
            assert a == 0.0  # missing reward: no advantage, never a default score


def test_advantages_numeric():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = group_advantages(rewards, ["a", "a", "b", "b"], eps=0.0)
    std = rewards.std(unbiased=False).item()  # global population std
    assert torch.allclose(adv, torch.tensor([0.5 / std, -0.5 / std, 0.0, 0.0]))
    per_group = group_advantages(rewards, torch.tensor([0, 0, 1, 1]), global_std=False, eps=1e-4)
    assert torch.allclose(per_group, torch.tensor([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0]))
    # a NaN reward is left out of the statistics: same advantages as without it
    with_nan = group_advantages([1.0, float("nan"), 0.0, 0.5, 0.5], ["a", "a", "a", "b", "b"], eps=0.0)
    assert torch.allclose(with_nan[[0, 2, 3, 4]], adv) and with_nan[1] == 0


def test_advantages_clip_and_errors():
    rewards = torch.tensor([100.0] + [0.0] * 99)
    adv = group_advantages(rewards, [0] * 100)
    assert adv.max().item() == 5.0 and adv.min().item() < 0
    assert group_advantages([float("nan")] * 3, [0, 0, 1]).abs().sum() == 0
    with pytest.raises(ValueError, match="one group id per reward"):
        group_advantages([1.0, 2.0], [0])


def test_frac_reward_zero_std():
    rewards = [0.1, 0.1, 0.1, 1.0, 0.0, None, None, 2.0, 0.3, None]
    groups = [0, 0, 0, 1, 1, 2, 2, 3, 4, 4]
    assert frac_reward_zero_std(rewards, groups) == pytest.approx(4 / 5)  # groups 0, 2, 3, 4 carry no signal
    assert frac_reward_zero_std([1.0, 2.0], [0, 0]) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Clipped surrogate


def test_ratio_exactly_one_on_policy():
    log_prob = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    loss, clip_fraction, ratio = clipped_surrogate(log_prob, log_prob.detach().clone(), adv, 0.2)
    assert torch.equal(ratio, torch.ones(4, 7)) and clip_fraction.item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item())
    loss.backward()
    assert torch.allclose(log_prob.grad, (-adv / 28).unsqueeze(1).expand(4, 7))  # d/dlp of -A r = -A r


def test_clipping_numeric():
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clip_fraction, ratio = clipped_surrogate(log_prob, old, adv, 0.2)
    # per entry: -1.2 (clipped high, A>0), -0.5 (below, A>0: not clipped), 0.8 (clipped low, A<0), 1.1 (inside)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.1) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)
    loss.backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[2] == 0  # clipped entries: no gradient
    assert log_prob.grad[1] == pytest.approx(-0.5 / 4) and log_prob.grad[3] == pytest.approx(1.1 / 4)
    # asymmetric: (low 0.2, high 0.6) keeps ratio 1.5 unclipped
    loss, clip_fraction, _ = clipped_surrogate(log_prob.detach(), old, adv, (0.2, 0.6))
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 0.8 + 1.1) / 4) and clip_fraction.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_surrogate(log_prob, old, adv, -0.1)


def test_masked_entries_have_exactly_zero_gradient():
    gen = torch.Generator().manual_seed(1)
    log_prob = torch.randn(3, 5, generator=gen).requires_grad_()
    old = torch.randn(3, 5, generator=gen)
    adv = torch.tensor([1.0, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    poisoned = torch.where(mask, old, torch.full_like(old, float("nan")))  # padding may hold garbage
    loss, _, ratio = clipped_surrogate(log_prob, poisoned, adv, 0.2, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(log_prob.grad[~mask], torch.zeros(7))
    assert (log_prob.grad[mask] != 0).any() and torch.equal(ratio[~mask], torch.ones(7))
    # equals the mean over kept tokens only
    kept_loss, _, _ = clipped_surrogate(log_prob.detach()[mask], old[mask], adv[:, None].expand(3, 5)[mask], 0.2)
    assert loss.item() == pytest.approx(kept_loss.item())


def test_filter_mask_times_loss_gives_zero_gradient():
    # image steps: (B,) log-probs, a trajectory-filter mask multiplies the per-sample loss
    log_prob = torch.randn(4, generator=torch.Generator().manual_seed(2)).requires_grad_()
    keep = torch.tensor([True, False, True, False])
    loss, _, _ = clipped_surrogate(log_prob, log_prob.detach() - 0.1, torch.ones(4), 0.2, mask=keep)
    loss.backward()
    assert torch.equal(log_prob.grad[~keep], torch.zeros(2)) and (log_prob.grad[keep] != 0).all()
    everything_filtered, _, _ = clipped_surrogate(log_prob, log_prob.detach(), torch.ones(4), 0.2, mask=torch.zeros(4))
    assert everything_filtered.item() == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# KL, filter, guard


def test_gaussian_mean_kl():
    mean = torch.randn(2, 3, 4)
    assert torch.equal(gaussian_mean_kl(mean, mean.clone(), torch.tensor([0.5, 1.0])), torch.zeros(2))
    ref = mean + torch.tensor([0.1, 0.2]).view(2, 1, 1)
    kl = gaussian_mean_kl(mean, ref, torch.tensor([0.5, 1.0]))
    assert torch.allclose(kl, torch.tensor([0.01 / 0.5, 0.04 / 2.0]))
    # with |dt| = 1 it is the exact KL between the two Gaussians, averaged over elements
    p, q = torch.distributions.Normal(mean[0], 0.5), torch.distributions.Normal(ref[0], 0.5)
    assert kl[0].item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5)
    assert gaussian_mean_kl(mean, ref, 1.0).shape == (2,)


def test_trajectory_filter():
    nan = math.nan
    scores = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [1.0, nan, 0.5, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert trajectory_filter(scores).tolist() == [
        [True, True, False, False],  # turn 1 failed: it still trains, later turns do not
        [True, False, False, False],
        [True, True, True, True],  # missing IF never triggers the filter
        [True, True, True, True],
    ]
    assert trajectory_filter(scores, "threshold", threshold=0.5).tolist()[2] == [True, True, True, False]
    assert trajectory_filter(scores, "none").all()
    with pytest.raises(ValueError, match="mode must be one of"):
        trajectory_filter(scores, "first_fail")
    with pytest.raises(ValueError, match=r"\(G, T\)"):
        trajectory_filter(scores[0])


def test_is_finite_loss():
    assert is_finite_loss(torch.tensor(1.0)) and not is_finite_loss(torch.tensor(float("nan")))
    assert not is_finite_loss(torch.tensor([1.0, float("inf")]))


def test_non_finite_rewards_are_missing_like_none():
    from editr2.rl import missing_rewards, std_sample_count

    ids = [0, 0, 0, 1, 1, 1]
    with_none = group_advantages([1.0, None, 0.0, 0.5, 0.2, None], ids)
    for bad in (float("nan"), float("inf"), -float("inf")):
        got = group_advantages(torch.tensor([1.0, bad, 0.0, 0.5, 0.2, bad]), ids)
        assert torch.equal(got, with_none)
        assert torch.isfinite(got).all()
    rewards = [1.0, float("inf"), None, float("nan"), 0.0]
    assert missing_rewards(rewards).tolist() == [False, True, True, True, False]
    assert std_sample_count(rewards, [0, 0, 1, 1, 1]) == 2
    assert std_sample_count(rewards, [0, 0, 1, 1, 1], global_std=False) == 1


def test_global_std_over_many_sessions_keeps_noise_small():
    """A session whose rewards differ only by judge jitter (0.002) gets advantages of order 1 when the std is its own,
    and ~0.002 / std when the std is taken over a batch of sessions with a real spread."""
    generator = torch.Generator().manual_seed(0)
    constant = 0.5 + 0.002 * torch.randn(18, generator=generator, dtype=torch.float64)
    alone = group_advantages(constant, [0] * 18, global_std=True)
    assert alone.abs().mean() > 0.5
    others = torch.rand(15 * 18, generator=generator, dtype=torch.float64)
    batch = torch.cat([constant, others])
    ids = torch.arange(16).repeat_interleave(18)
    together = group_advantages(batch, ids, global_std=True)[:18]
    assert together.abs().mean() < 0.01


# ----------------------------------------------------------------------------------------------------------------------
# Token log-probs, group ids, masks


def test_token_logps_from_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, generator=gen)
    ids = torch.tensor([[0, 5, 2], [4, 1, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = token_logps_from_logits(logits, ids, mask, temperature=0.5)
    expected = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, ids[..., None])[..., 0]
    assert torch.equal(got[mask], expected[mask]) and got[1, 2] == 0  # same ops: bit-equal; padding is 0
    # a suppressed token has probability 0: the log-probs are those over the rest of the vocabulary
    kept = [0, 1, 2, 4, 5]
    got = token_logps_from_logits(logits, ids, temperature=0.5, suppressed_ids=[3])
    rest = torch.log_softmax(logits[..., kept] / 0.5, dim=-1)
    expected = rest.gather(-1, torch.tensor([kept.index(int(i)) for i in ids.flatten()]).view(2, 3, 1))[..., 0]
    torch.testing.assert_close(got, expected)  # a softmax over 5 vs 6 columns: rounding may differ
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logps_from_logits(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match=r"logits\[:, P - 1 : -1\]"):
        token_logps_from_logits(logits[:, :2], ids)


def test_session_group_ids():
    # 2 sessions x 2 rollouts x 3 turns, in (session, rollout, turn) order
    assert session_group_ids(2, 2, 3).tolist() == [0] * 6 + [1] * 6
    assert session_group_ids(2, 2, 3, "turn").tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert session_group_ids(0, 2, 3).numel() == 0
    with pytest.raises(ValueError, match="group_key must be one of"):
        session_group_ids(2, 2, 3, "rollout")


def test_trajectory_filter_over_sessions_and_training_masks():
    scores = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [math.nan, 0.0, 1.0]]])  # (B, G, T)
    keep = trajectory_filter(scores)
    assert torch.equal(keep, torch.stack([trajectory_filter(s) for s in scores]))  # as each session on its own
    rewards = torch.ones(2, 2, 3)
    rewards[1, 1, 0] = math.nan  # a missing reward trains nothing
    image, text = training_masks(rewards, keep)
    assert torch.equal(image, keep & ~torch.isnan(rewards)) and torch.equal(text, image)
    image, text = training_masks(rewards, keep, filter_text=True)  # the reasoning of filtered turns still trains
    assert torch.equal(text, ~torch.isnan(rewards)) and not image[0, 0, 2]


# ----------------------------------------------------------------------------------------------------------------------
# Per-rollout surrogate and the joint loss


def _joint_inputs(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    G, K, L = 3, 2, 4
    return dict(
        advantages=torch.tensor([1.5, -0.7, 2.0]),
        step_log_probs=(0.2 * torch.randn(G, K, generator=gen)).requires_grad_(),
        old_step_log_probs=torch.zeros(G, K),
        image_mask=torch.tensor([True, True, False]),
        step_kl=(torch.rand(G, K, generator=gen)).requires_grad_(),
        token_logps=(0.2 * torch.randn(G, L, generator=gen)).requires_grad_(),
        old_token_logps=torch.zeros(G, L),
        token_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool),
    )


def test_joint_clipped_loss_matches_the_per_rollout_formula():
    x = _joint_inputs()
    out = joint_clipped_loss(**x, clip_range_image=0.1, beta=0.3, clip_range_text=(0.2, 0.3), scale=0.25)
    # the paper's accounting, rollout by rollout and step by step (the Python loop this function replaces)
    G, K = x["step_log_probs"].shape
    expected = []
    for g in range(G):
        total = torch.zeros(())
        for j in range(K):
            keep = x["image_mask"][g : g + 1]
            step, _, _ = clipped_surrogate(x["step_log_probs"][g, j : j + 1], x["old_step_log_probs"][g, j : j + 1],
                                           x["advantages"][g], 0.1, mask=keep)
            total = total + step + 0.3 * torch.where(keep, x["step_kl"][g, j], torch.zeros(()))[0]
        text, _, _ = clipped_surrogate(x["token_logps"][g], x["old_token_logps"][g], x["advantages"][g], (0.2, 0.3),
                                       mask=x["token_mask"][g])
        expected.append((total + text) / K)
    expected = torch.stack(expected)
    torch.testing.assert_close(out["per_rollout"], expected, atol=1e-7, rtol=1e-6)  # batched sums: a tolerance
    torch.testing.assert_close(out["loss"], 0.25 * expected.sum(), atol=1e-7, rtol=1e-6)
    assert out["n_image"] == 2 * K and out["n_text"] == 3
    assert torch.equal(out["kl"][2], torch.zeros(K)) and torch.equal(out["kl"][:2], x["step_kl"][:2].detach())
    assert out["ratio_image"].shape == (G, K) and out["ratio_text"].shape == (G, 4)


def test_joint_clipped_loss_masked_terms_have_exactly_zero_gradient():
    x = _joint_inputs(6)
    x["old_step_log_probs"][2] = math.nan  # rollout 2's image is filtered: garbage there must not leak
    x["old_token_logps"][0, 3] = math.inf  # padding
    out = joint_clipped_loss(**x, clip_range_image=0.9, beta=0.3, clip_range_text=0.9)  # nothing clipped
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.equal(x["step_log_probs"].grad[2], torch.zeros(2)) and (x["step_log_probs"].grad[:2] != 0).all()
    assert torch.equal(x["step_kl"].grad[2], torch.zeros(2))
    assert torch.equal(x["token_logps"].grad[~x["token_mask"]], torch.zeros(4))
    # on-policy: every ratio is exactly 1
    on = joint_clipped_loss(x["advantages"], x["step_log_probs"], x["step_log_probs"].detach(), x["image_mask"], 0.1,
                            token_logps=x["token_logps"], old_token_logps=x["token_logps"].detach(),
                            token_mask=x["token_mask"], clip_range_text=0.2)
    assert torch.equal(on["ratio_image"], torch.ones(3, 2)) and torch.equal(on["ratio_text"], torch.ones(3, 4))
    assert on["clip_image"] == 0 and on["clip_text"] == 0 and torch.equal(on["kl"], torch.zeros(3, 2))


def test_joint_clipped_loss_errors():
    x = _joint_inputs()
    with pytest.raises(ValueError, match="beta > 0 needs step_kl"):
        joint_clipped_loss(x["advantages"], x["step_log_probs"], x["old_step_log_probs"], x["image_mask"], 0.1,
                           beta=0.1)
    with pytest.raises(ValueError, match=r"must be \(G,\)"):
        joint_clipped_loss(x["advantages"][:2], x["step_log_probs"], x["old_step_log_probs"], x["image_mask"], 0.1)
    with pytest.raises(ValueError, match="pass old_token_logps, token_mask and clip_range_text"):
        joint_clipped_loss(x["advantages"], x["step_log_probs"], x["old_step_log_probs"], x["image_mask"], 0.1,
                           token_logps=x["token_logps"])

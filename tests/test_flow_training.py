"""The flow-matching training loss (`editr2.flow.flow_matching_loss`, `training_sigmas`) and the one padding helper of
batched text conditioning (`editr2.batching.pad_prompt_embeds`)."""

from __future__ import annotations

import pytest
import torch

from editr2 import flow
from editr2.batching import pad_prompt_embeds


def test_the_exact_velocity_has_zero_loss_and_a_wrong_one_its_squared_error():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    sigma = flow.training_sigmas(3, gen)
    seen = {}

    def exact(x, s):
        seen["x"] = x
        return noise - x0  # the rectified-flow target

    loss, err = flow.flow_matching_loss(exact, x0, noise, sigma)
    assert loss.item() == 0.0 and err.shape == (3, 5)
    torch.testing.assert_close(seen["x"], (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise)
    weight = torch.ones(3, 5)
    weight[0] = 5.0
    loss, err = flow.flow_matching_loss(lambda x, s: torch.zeros_like(x), x0, noise, sigma, weight)
    torch.testing.assert_close(err, ((noise - x0) ** 2).mean(-1))
    torch.testing.assert_close(loss, (weight * err).mean())


def test_training_sigmas_draw_as_documented():
    gen = torch.Generator().manual_seed(1)
    expected = torch.sigmoid(0.5 + 2.0 * torch.randn(4, generator=gen))
    torch.testing.assert_close(flow.training_sigmas(4, torch.Generator().manual_seed(1), 0.5, 2.0), expected)
    high = flow.training_sigmas(1000, torch.Generator().manual_seed(2), high_sigma_prob=1.0, high_sigma_min=0.9)
    assert high.min() >= 0.9 and high.max() <= 1.0
    with pytest.raises(ValueError, match="high_sigma_prob"):
        flow.training_sigmas(2, high_sigma_prob=2.0)


def test_flow_matching_loss_refuses_mismatched_shapes_and_non_finite_losses():
    x0 = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="sigma"):
        flow.flow_matching_loss(lambda x, s: x, x0, x0, torch.zeros(3))
    with pytest.raises(FloatingPointError):
        flow.flow_matching_loss(lambda x, s: x * float("nan"), x0, x0, torch.zeros(2))


def test_pad_prompt_embeds_pads_like_a_batch():
    a, b = torch.randn(3, 4), torch.randn(1, 5, 4)
    embeds, mask = pad_prompt_embeds([a, b])
    assert embeds.shape == (2, 5, 4) and mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert torch.equal(embeds[0, :3], a) and torch.equal(embeds[0, 3:], torch.zeros(2, 4))
    assert torch.equal(embeds[1], b[0])
    _, mask = pad_prompt_embeds([b], [torch.tensor([[1, 1, 0, 1, 1]])])
    assert mask.tolist() == [[1, 1, 0, 1, 1]]
    with pytest.raises(ValueError, match="at least one"):
        pad_prompt_embeds([])

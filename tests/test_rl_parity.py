"""Parity checks of the Edit-R2 trainer's RL wiring on the tiny pipeline (these must always hold).

- on-policy ratios are exactly 1, for the reasoning tokens and for the SDE steps;
- the SDE with noise 0 reproduces the pipeline's ODE sampler;
- advantages have zero mean within each group (session or turn);
- a filtered turn contributes exactly zero gradient (with `filter_text`, its reasoning still does);
- the adapter-off reference equals the base model;
- a reward function returning None or raising never becomes a default score;
- a NaN/inf loss is caught: the optimizer step is skipped and counted.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_editr2.policy import LossWeights
from trl_editr2.rollout import rollout_session, seeded_generator
from trl_editr2.testing import TINY_IMAGE_SIZE, pixel_hash_reward, tiny_dataset, tiny_trainer

# exact on-policy ratios and masks: rerun under other CPU kernels by `make test-numerics`
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """Reasoning on and trained, beta > 0: every part of the loss is exercised."""
    return tiny_trainer(tmp_path_factory.mktemp("parity"), beta=0.5, per_device_train_batch_size=2)


@pytest.fixture(scope="module")
def rollouts(trainer):
    """Two sessions rolled out with the initial (identity) adapters; the scoring tests share them."""
    dataset = tiny_dataset()
    return trainer.rollout([dataset[0], dataset[1]])


@pytest.fixture(scope="module")
def turn(rollouts):
    """Turn 2 of the first session (its reference image is rollout-specific)."""
    return rollouts[0].turns[1]


def _score(trainer, rollouts, reward_funcs, **settings):
    """`trainer.score` with other reward functions (each weighing 1) and config values."""
    saved = {k: getattr(trainer.args, k) for k in settings}
    try:
        for key, value in settings.items():
            setattr(trainer.args, key, value)
        names = [f.__name__ for f in reward_funcs]
        trainer.set_reward_funcs(reward_funcs, {n: 1.0 for n in names})
        return trainer.score(rollouts)
    finally:
        for key, value in saved.items():
            setattr(trainer.args, key, value)


def _perturb_adapters(policy, seed: int = 0) -> None:
    """Give every LoRA B matrix random values, so the adapters are no longer the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def _grads(policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _loss_grads(policy, turn, advantages, image_mask, text_mask) -> dict[str, torch.Tensor]:
    policy.zero_grad(set_to_none=True)
    weights = LossWeights(torch.tensor(advantages), torch.tensor(image_mask), torch.tensor(text_mask), scale=0.5)
    policy(turn, weights)["loss"].backward()
    grads = _grads(policy)
    policy.zero_grad(set_to_none=True)
    return grads


# ---------------------------------------------------------------------------------------------------------------------
# Ratios, SDE vs ODE, reference
# ---------------------------------------------------------------------------------------------------------------------


def test_on_policy_ratio_is_exactly_one_for_text_and_image(trainer, turn):
    # at the start the adapters are the identity: the policy is its reference (KL 0)
    ones = torch.ones(2, dtype=torch.bool)
    out = trainer.policy(turn, LossWeights(torch.tensor([1.0, -1.0]), ones, ones, 1.0))
    assert torch.equal(out["kl"], torch.zeros_like(out["kl"]))
    # with adapters away from the identity, a fresh rollout re-scored by the loss is still exactly on-policy
    # (as in training: the rollout runs in eval mode, the loss in train mode)
    _perturb_adapters(trainer.policy, seed=3)
    trainer.policy.eval()
    fresh = rollout_session(trainer.policy, tiny_dataset()[2], trainer.args, seed=5).turns[1]
    trainer.policy.train()
    out = trainer.policy(fresh, LossWeights(torch.tensor([1.0, -1.0]), ones, ones, 1.0))
    trainer.policy.eval()
    assert out["ratio_image"].shape == (2, trainer.args.sde_window_size)
    assert torch.equal(out["ratio_image"], torch.ones_like(out["ratio_image"]))
    assert fresh.text is not None and fresh.text.completion_mask.any()
    assert torch.equal(out["ratio_text"], torch.ones_like(out["ratio_text"]))
    # the old log-probs are real log-probs (not placeholders) and the KL to the reference is now positive
    assert (fresh.text.old_logps[fresh.text.completion_mask] < 0).all()
    assert fresh.old_log_probs.abs().min() > 0
    assert (out["kl"] > 0).all()


def test_sde_with_zero_noise_reproduces_the_pipeline_ode(tmp_path):
    trainer = tiny_trainer(tmp_path, noise_level=0.0, reasoning="none", train_reasoning=False, num_turns=1)
    record = tiny_dataset(num_turns=1)[0]
    for cfg in (1.0, 4.0):
        trainer.args.true_cfg_scale = cfg
        rollout = rollout_session(trainer.policy, record, trainer.args, seed=7)
        turn = rollout.turns[0]
        assert torch.equal(turn.old_log_probs, torch.zeros_like(turn.old_log_probs))  # zero-std steps have no density
        pipe = trainer.pipeline
        channels = pipe.transformer.config.in_channels // 4
        size = TINY_IMAGE_SIZE
        noise = pipe.prepare_latents(1, channels, size, size, torch.float32, "cpu", seeded_generator(7, 0, "noise"))
        expected = pipe(
            image=record["source_image"], prompt=record["instruction"][0], reasoning="none", latents=noise,
            num_inference_steps=trainer.args.num_inference_steps, height=size, width=size, reference_area=None,
            condition_area=size * size, output_type="latent", true_cfg_scale=cfg,
            negative_prompt=" " if cfg > 1 else None,
        ).images  # (1, N, C)
        # same initial noise for the group: both rollouts are the ODE image (batch of 2 vs 1: float rounding only)
        torch.testing.assert_close(turn.final_latents, expected.expand_as(turn.final_latents), atol=1e-5, rtol=0)


def test_keep_unedited_in_the_rollout_is_the_pipelines(tmp_path):
    """`keep_unedited` in the RL config: the rewarded, carried latent is what `__call__(keep_unedited=...)` gives (the
    ODE rollout again, so both sample the same latent before the copy); the sampled log-probs are not touched."""
    trainer = tiny_trainer(tmp_path, noise_level=0.0, reasoning="none", train_reasoning=False, num_turns=1,
                           reference_area=None)
    record = tiny_dataset(num_turns=1)[0]
    pipe, size = trainer.pipeline, TINY_IMAGE_SIZE
    channels = pipe.transformer.config.in_channels // 4
    for threshold in (0.5, 1e6):  # a mix of kept and sampled latent pixels; everything kept
        trainer.args.keep_unedited = threshold
        turn = rollout_session(trainer.policy, record, trainer.args, seed=7).turns[0]
        noise = pipe.prepare_latents(1, channels, size, size, torch.float32, "cpu", seeded_generator(7, 0, "noise"))
        expected = pipe(image=record["source_image"], prompt=record["instruction"][0], reasoning="none", latents=noise,
                        num_inference_steps=trainer.args.num_inference_steps, height=size, width=size,
                        reference_area=None, condition_area=size * size, output_type="latent",
                        keep_unedited=threshold).images  # (1, N, C)
        torch.testing.assert_close(turn.final_latents, expected.expand_as(turn.final_latents), atol=1e-5, rtol=0)
    source = turn.conditioning.image_latents[:1, : turn.final_latents.shape[1]]
    torch.testing.assert_close(turn.final_latents, source.expand_as(turn.final_latents))  # nothing changed enough


def test_adapter_off_reference_equals_the_base_model(trainer, turn):
    from diffusers_editr2.testing import tiny_pipeline

    _perturb_adapters(trainer.policy)
    base = tiny_pipeline(0)  # the same base weights, no adapters
    x = turn.latents[0]
    timestep = turn.step_timesteps[0].expand(x.shape[0])
    with torch.no_grad():
        reference = trainer.policy.velocity(x, timestep, turn.conditioning, reference=True)
        policy = trainer.policy.velocity(x, timestep, turn.conditioning)
        expected = base.predict_velocity(x, timestep, turn.conditioning, 1.0)
    assert torch.equal(reference, expected)
    assert not torch.allclose(policy, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Filtering: exactly zero gradient
# ---------------------------------------------------------------------------------------------------------------------


def test_filtered_turn_contributes_exactly_zero_gradient(trainer, turn):
    policy = trainer.policy
    _perturb_adapters(policy, seed=1)  # away from the identity, so every term has a gradient
    keep, drop = [True, False], [True, False]
    # rollout 1 is filtered (image and text): its advantage, however large, must not matter at all
    a = _loss_grads(policy, turn, [0.7, 3.0], keep, drop)
    b = _loss_grads(policy, turn, [0.7, -1e6], keep, drop)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and it equals the gradient of rollout 0 alone
    c = _loss_grads(policy, turn, [0.7, 0.0], [True, False], [True, False])
    for name in a:
        assert torch.equal(a[name], c[name]), name


def test_filter_text_keeps_the_reasoning_gradient_of_filtered_turns(trainer, turn):
    policy = trainer.policy
    _perturb_adapters(policy, seed=2)
    # filter_text: rollout 1's image is filtered, its text is not
    a = _loss_grads(policy, turn, [0.7, 3.0], [True, False], [True, True])
    b = _loss_grads(policy, turn, [0.7, -3.0], [True, False], [True, True])
    text = [n for n in a if n.startswith("text_encoder.")]
    image = [n for n in a if n.startswith("transformer.")]
    assert text and image
    for name in image:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], b[name]) for name in text)


def test_trajectory_filter_masks_turns_after_an_if_zero(trainer, rollouts):
    def IF(prompts, images, turn, rollout, **kwargs):  # session 1, rollout 0 fails turn 1; everything else succeeds
        first = [True] * (len(turn) // 2) + [False] * (len(turn) // 2)
        return [0.0 if (f and g == 0 and t == 0) else 1.0 for f, g, t in zip(first, rollout, turn)]

    for filter_text in (False, True):
        batch = _score(trainer, rollouts, [IF], filter_text=filter_text, trajectory_filter="if_zero")
        expected_image = torch.ones(2, 2, 2, dtype=torch.bool)  # (B, G, T)
        expected_image[0, 0, 1] = False
        assert torch.equal(batch["image_mask"], expected_image)
        assert torch.equal(batch["text_mask"], torch.ones_like(expected_image) if filter_text else expected_image)
        assert trainer._metrics["filter/frac_filtered"][-1] == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------------------------------------------------
# Advantages and missing rewards
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_key", ["session", "turn"])
def test_advantages_have_zero_mean_per_group(trainer, rollouts, group_key):
    batch = _score(trainer, rollouts, [pixel_hash_reward], group_key=group_key, global_std=False, trajectory_filter="none")
    adv = batch["advantages"]  # (B, G, T)
    assert adv.abs().sum() > 0
    groups = adv.flatten(1) if group_key == "session" else adv.permute(0, 2, 1)  # (B, G*T) or (B, T, G)
    torch.testing.assert_close(groups.mean(-1), torch.zeros(groups.shape[:-1]), atol=1e-6, rtol=0)


def test_missing_or_failing_rewards_never_become_scores(trainer, rollouts):
    calls = {"flaky": 0}

    def partial(prompts, images, rollout, turn, **kwargs):  # rollout 1, turn 2 is "not applicable" (None)
        return [None if (g, t) == (1, 1) else 0.1 * (1 + g + 2 * t) for g, t in zip(rollout, turn)]

    def flaky(prompts, images, **kwargs):  # fails once, then answers: the retry is used, nothing is lost
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("timeout")
        return [0.5] * len(prompts)

    def broken(prompts, images, **kwargs):
        raise RuntimeError("judge server down")

    batch = _score(trainer, rollouts, [partial, flaky], trajectory_filter="none", reward_retries=1)
    assert calls["flaky"] == 2
    missing = torch.zeros(2, 2, 2, dtype=torch.bool)
    missing[:, 1, 1] = True
    assert torch.equal(batch["advantages"][missing], torch.zeros(2))
    assert torch.equal(batch["image_mask"], ~missing) and torch.equal(batch["text_mask"], ~missing)
    assert trainer._metrics["rewards/partial/missing"][-1] == pytest.approx(0.25)
    assert trainer._metrics["rewards/flaky/failures"][-1] == 0
    assert batch["advantages"][~missing].abs().min() > 0  # the valid samples keep their own spread

    batch = _score(trainer, rollouts, [broken, flaky], trajectory_filter="none", reward_retries=1)
    assert torch.equal(batch["advantages"], torch.zeros_like(batch["advantages"]))
    assert not batch["image_mask"].any() and not batch["text_mask"].any()
    assert trainer._metrics["rewards/broken/failures"][-1] == 1
    assert trainer._metrics["rewards/broken/missing"][-1] == 1
    assert math.isnan(trainer._metrics["reward"][-1])


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    from trl_editr2.policy import EditR2Policy

    trainer = tiny_trainer(tmp_path, reward_funcs=[pixel_hash_reward],
                           reward_weights={"pixel_hash_reward": 1.0}, max_steps=2, num_turns=1,
                           logging_steps=1, dataset=tiny_dataset(num_turns=1), trajectory_filter="none")
    forward = EditR2Policy.forward
    calls = {"n": 0}

    def poisoned(self, turn, weights):  # the first step's loss is NaN, the second is normal
        out = forward(self, turn, weights)
        calls["n"] += 1
        if calls["n"] == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(EditR2Policy, "forward", poisoned)
    params = {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    snapshots = []

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in params.items()})

    trainer.add_callback(Snapshot())
    trainer.train()
    assert len(snapshots) == 2
    for name in params:  # step 1 skipped: not even AdamW's weight decay moved a weight
        assert torch.equal(snapshots[0][name], before[name]), name
    assert any(not torch.equal(snapshots[1][n], before[n]) for n in params)  # step 2 trained
    logs = [h for h in trainer.state.log_history if "skipped_steps" in h]
    assert [h["skipped_steps"] for h in logs] == [1.0, 1.0]

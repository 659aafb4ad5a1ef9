"""Rolling several sessions out together (`rollout_sessions`): the same rollouts as one session at a time, to float
rounding, with each session's own seeds, and exactly on-policy for the loss."""

from __future__ import annotations

import pytest
import torch

from trl_editr2.policy import LossWeights
from trl_editr2.rollout import rollout_session, rollout_sessions
from trl_editr2.testing import tiny_dataset, tiny_trainer

SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    trainer = tiny_trainer(tmp_path_factory.mktemp("batching"), per_device_train_batch_size=3, num_inference_steps=4,
                           sde_window_range=[0, 3])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters away from the identity, so the on-policy check is not trivial
        for name, param in trainer.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    trainer.policy.eval()
    return trainer


@pytest.fixture(scope="module")
def records():
    dataset = tiny_dataset()
    return [dataset[0], dataset[1], dataset[2]]


@pytest.fixture(scope="module")
def batched(trainer, records):
    return rollout_sessions(trainer.policy, records, trainer.args, SEEDS)


@pytest.mark.slow
def test_one_session_is_bit_identical_to_rollout_session(trainer, records):
    alone = rollout_session(trainer.policy, records[0], trainer.args, SEEDS[0])
    (together,) = rollout_sessions(trainer.policy, records[:1], trainer.args, SEEDS[:1])
    for a, b in zip(alone.turns, together.turns):
        assert torch.equal(a.final_latents, b.final_latents)
        assert torch.equal(a.old_log_probs, b.old_log_probs)


@pytest.mark.slow
def test_batched_sessions_keep_their_seeds_and_match_one_by_one(trainer, records, batched):
    for record, seed, together in zip(records, SEEDS, batched):
        alone = rollout_session(trainer.policy, record, trainer.args, seed)
        assert together.record is record and len(together.turns) == trainer.args.num_turns
        for a, b in zip(alone.turns, together.turns):
            # the session's own draws: reasoning tokens, SDE window (noise: via the latents below)
            assert [i.text for i in a.intents] == [i.text for i in b.intents]
            assert torch.equal(a.text.completion_ids, b.text.completion_ids)
            assert a.sde_steps == b.sde_steps
            # the transformer's batch (more prompt padding) changes float rounding only
            torch.testing.assert_close(b.final_latents, a.final_latents, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.old_log_probs, a.old_log_probs, atol=1e-4, rtol=1e-5)
            for x, y in zip(a.next_latents, b.next_latents):
                torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_batched_rollout_is_exactly_on_policy(trainer, batched):
    # the loss re-runs one session's turn with the padding it was sampled with: ratios are exactly 1
    policy = trainer.policy
    policy.train()
    try:
        for session in batched:
            for turn in session.turns:
                ones = torch.ones(2, dtype=torch.bool)
                out = policy(turn, LossWeights(torch.tensor([1.0, -1.0]), ones, ones, 1.0))
                assert torch.equal(out["ratio_image"], torch.ones_like(out["ratio_image"]))
                assert torch.equal(out["ratio_text"], torch.ones_like(out["ratio_text"]))
    finally:
        policy.eval()


def test_rollout_sessions_needs_one_seed_per_record(trainer, records):
    with pytest.raises(ValueError, match="one seed per record"):
        rollout_sessions(trainer.policy, records, trainer.args, SEEDS[:1])


@pytest.mark.slow
def test_trainer_batches_sessions_unless_told_not_to(tmp_path, records):
    steps = {}
    for batch in (True, False):
        trainer = tiny_trainer(tmp_path / str(batch), per_device_train_batch_size=3, batch_sessions=batch)
        rollouts = trainer.rollout(records)
        steps[batch] = rollouts
    for a, b in zip(steps[False], steps[True]):
        for x, y in zip(a.turns, b.turns):
            assert [i.text for i in x.intents] == [i.text for i in y.intents]
            torch.testing.assert_close(y.final_latents, x.final_latents, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_reasoning_of_all_sessions_is_one_generate_call_per_turn(trainer, records, monkeypatch):
    # one batched `generate` per turn for every session's G answers (not one per session)
    text_encoder = trainer.policy.pipeline.text_encoder
    calls = []
    original = text_encoder.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(text_encoder, "generate", counting)
    rollout_sessions(trainer.policy, records, trainer.args, SEEDS)
    assert calls == [len(records) * trainer.args.num_generations] * trainer.args.num_turns


def test_a_sessions_answers_do_not_depend_on_the_sessions_beside_it(trainer, records):
    # each row samples from its own generator: session A's tokens alone == A's tokens next to B
    from trl_editr2.rollout import _start_sessions, generate_answers_batched, reasoning_generators

    args, pipe = trainer.args, trainer.policy.pipeline
    a, b = (_start_sessions(pipe, r, args) for r in records[:2])
    instruction_a, instruction_b = records[0]["instruction"][0], records[1]["instruction"][0]
    with torch.no_grad():
        (alone,) = generate_answers_batched(pipe, [(a, instruction_a, reasoning_generators((5, 0), len(a)))], args)
        _, beside = generate_answers_batched(pipe, [(b, instruction_b, reasoning_generators((6, 0), len(b))),
                                                    (a, instruction_a, reasoning_generators((5, 0), len(a)))], args)
    assert alone[0] == beside[0]
    assert torch.equal(alone[2], beside[2]) and torch.equal(alone[3], beside[3])
    for key, value in alone[1].items():  # the session's own prompt batch, padded as when generated alone
        assert torch.equal(value, beside[1][key]), key


@pytest.mark.slow
def test_row_sampler_samples_the_tempered_softmax():
    from trl_editr2.rollout import RowSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.7
    sampler = RowSampler([torch.Generator().manual_seed(0)], temperature)
    draws = torch.stack([sampler(None, logits).argmax(-1) for _ in range(5000)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(logits[0].double() / temperature, -1)
    torch.testing.assert_close(frequencies, expected, atol=0.025, rtol=0)  # ~3.5 standard errors


def test_row_sampler_refuses_bad_input():
    from trl_editr2.rollout import RowSampler

    with pytest.raises(ValueError, match="temperature"):
        RowSampler([torch.Generator()], 0.0)
    with pytest.raises(ValueError, match="generators"):
        RowSampler([torch.Generator()], 1.0)(None, torch.zeros(2, 4))

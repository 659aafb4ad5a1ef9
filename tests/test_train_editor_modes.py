"""Editor training for the pipeline's other conditioning modes (`EditorConfig.prompt_mode` "none" and "history"): the
batched conditioning, the carried pool, the evaluations and the configs of the three equal-budget runs."""

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from recipes.shapes_tiny import common, train_editor
from recipes.shapes_tiny.carried import CarriedPool, Slot

from test_train_default import _assert_same, _editor_cfg, _weights, stages  # noqa: F401 (stages: a fixture)

CARRIED = dict(carried_schedule=[[0.0, 0.5]], carried_pool=3, carried_turns=3, carried_refresh=2, carried_steps=2)
CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "shapes_tiny" / "configs"


def _undo_session(turns: int = 4, size: int = 64):
    """A cu session with an undo turn whose gold intent names an earlier state: `(session, that turn)`."""
    from editr2.bench.shapes import generate_session
    from editr2.intent import parse_restore

    for seed in range(300):
        session = generate_session("cu", turns, seed, size)
        for t, gold in enumerate(session.gold_intent):
            if t > 0 and parse_restore(gold, t) is not None:
                return session, t
    raise AssertionError("no session with an undo turn")


# ---- config and data (no models) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [({"prompt_mode": "reasoning"}, "prompt_mode"),
                                              ({"max_history_images": -1}, "max_history_images"),
                                              ({"prompt_mode": "history", "render": "torch"}, "render")])
def test_prompt_mode_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        train_editor.EditorConfig(**overrides)


def test_intent_mode_draws_as_before():
    # the default mode draws the same turns and texts as `draw_turn` always did (same random stream)
    from editr2.bench.shapes import generate_session

    cfg = train_editor.EditorConfig(batch_size=6)
    rng, replay = random.Random(3), random.Random(3)
    for refs, target, text in train_editor.draw_examples(rng, cfg):
        family = replay.choice(("cm", "cu"))
        num_turns = replay.randint(1, cfg.max_turns)
        session = generate_session(family, num_turns, common.TRAIN_SEED_OFFSET + replay.randrange(10**9), 64)
        turn = replay.randrange(num_turns)
        expected = session.gold_intent[turn]
        if train_editor.self_contained(session, turn) and replay.random() < cfg.raw_instruction_prob:
            expected = session.instruction[turn]
        if replay.random() < cfg.drop_text_prob:
            expected = " "
        assert refs == [session.scenes[turn]] and target == session.scenes[turn + 1] and text == expected


@pytest.mark.slow  # imports diffusers (history_prompt)
@pytest.mark.parametrize("mode", ["none", "history"])
def test_none_and_history_modes_condition_on_the_instructions(mode):
    from diffusers_editr2.pipeline_editr2 import history_prompt

    session, undo = _undo_session()
    cfg = train_editor.EditorConfig(prompt_mode=mode, max_history_images=2)
    for t in range(len(session.instruction)):
        text = train_editor.mode_text(cfg, session, t)
        if mode == "none":
            assert text == session.instruction[t]
            assert train_editor.earlier_states(cfg, t) == []
        else:
            assert text == history_prompt(session.instruction[:t], session.instruction[t])
            assert train_editor.earlier_states(cfg, t) == list(range(t))[-2:]  # oldest first, as the pipeline
    assert train_editor.mode_text(cfg, session, undo) != session.gold_intent[undo]  # an undo is an instruction too
    # the texts drawn: the mode's text or the empty prompt, never the intent
    cfg = replace(cfg, drop_text_prob=0.5)
    rng = random.Random(0)
    texts = {train_editor.example_text(rng, cfg, session, 1) for _ in range(40)}
    assert texts == {" ", train_editor.mode_text(cfg, session, 1)}


def test_history_batch_examples_share_their_reference_count():
    cfg = train_editor.EditorConfig(prompt_mode="history", max_history_images=2, max_turns=4, batch_size=5)
    counts = set()
    for seed in range(40):
        examples = train_editor.draw_examples(random.Random(seed), cfg)
        sizes = {len(refs) for refs, _, _ in examples}
        assert len(sizes) == 1 and len(examples) == 5
        counts |= sizes
        if counts == {1, 2, 3}:
            break
    assert counts == {1, 2, 3}  # the first turn's count rules each batch; every count occurs


def test_grouped_loss_is_the_example_weighted_mean():
    cfg = train_editor.EditorConfig()
    pipe = SimpleNamespace(predict_velocity=lambda noisy, t, cond: 0.5 * noisy + cond.image_latents[:, :4])
    torch.manual_seed(0)
    groups = [(SimpleNamespace(image_latents=torch.randn(b, 4 * r, 8)), torch.randn(b, 4, 8)) for b, r in ((3, 1),
                                                                                                          (1, 2))]
    loss, stats = train_editor.grouped_flow_loss(pipe, groups, cfg, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    parts = [train_editor.flow_loss(pipe, cond, x0, cfg, generator) for cond, x0 in groups]
    torch.testing.assert_close(loss, 0.75 * parts[0][0] + 0.25 * parts[1][0])
    assert stats["mse"] == pytest.approx(0.75 * parts[0][1]["mse"] + 0.25 * parts[1][1]["mse"])
    single, _ = train_editor.grouped_flow_loss(pipe, groups[:1], cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(single, train_editor.flow_loss(pipe, *groups[0], cfg, torch.Generator().manual_seed(0))[0],
                               rtol=0, atol=0)


def test_the_three_carried_configs_differ_only_in_prompt_mode():
    base = yaml.safe_load((CONFIGS / "editor_carried.yaml").read_text())
    assert base.get("prompt_mode", "intent") == "intent"
    for mode in ("none", "history"):
        other = yaml.safe_load((CONFIGS / f"editor_carried_{mode}.yaml").read_text())
        assert other.pop("prompt_mode") == mode
        assert other == base
        train_editor.EditorConfig(**{**other, "prompt_mode": mode})  # valid


# ---- with the micro models ------------------------------------------------------------------------------------------


def _history_state(pipe, cfg, session, turns: int):
    """The pipeline's own session after `turns` history-mode turns of `session` (2 sampling steps each)."""
    state = pipe.start_session(session.source_image(), cfg.image_size, cfg.image_size, reference_area=None)
    for t in range(turns):
        state = pipe(prompt=session.instruction[t], session=state, reasoning="history",
                     generator=torch.Generator().manual_seed(t), **train_editor.call_kwargs(cfg, steps=2)).session
    return state


@pytest.mark.slow
@pytest.mark.parametrize("batch_text_encoding", [False, True])
def test_batched_conditioning_matches_the_pipeline_in_each_mode(stages, batch_text_encoding):  # noqa: F811
    from editr2.bench.shapes import generate_session

    session = generate_session("cm", 4, 5)
    pipe = train_editor.build_pipeline(_editor_cfg(stages, prompt_mode="history", eval_steps=2))
    states = {turns: _history_state(pipe, _editor_cfg(stages, prompt_mode="history"), session, turns)
              for turns in (1, 2, 3)}
    for mode, turns in (("intent", 2), ("none", 2), ("history", 2), ("history", 1), ("history", 3)):
        cfg = _editor_cfg(stages, prompt_mode=mode, max_history_images=2, batch_text_encoding=batch_text_encoding)
        state = states[turns]
        texts = [train_editor.mode_text(cfg, session, turns), " "]  # different lengths: padded like diffusers
        images = state.images
        refs = [images[-1]] + [images[k] for k in train_editor.earlier_states(cfg, turns)]
        carried = [state.turns[-1].latents[0]] + [state.source_latents[0] if k == 0 else state.turns[k - 1].latents[0]
                                                  for k in train_editor.earlier_states(cfg, turns)]
        # clean path (references VAE-encoded) vs the same images in a session without latents; carried path
        encoded = replace(state, turns=tuple(replace(t, latents=None) for t in state.turns), source_latents=None)
        for latents, reference_state in ((None, encoded), (torch.cat(carried)[None].repeat(2, 1, 1), state)):
            batched = train_editor.conditioning(pipe, [refs, refs], texts, cfg, image_latents=latents)
            for i, text in enumerate(texts):
                single = pipe.prepare_conditioning(reference_state, text, reasoning=mode, reference_area=None,
                                                   condition_area=cfg.condition_size**2, max_history_images=2)
                n = single.prompt_embeds.shape[1]
                torch.testing.assert_close(batched.prompt_embeds[i, :n], single.prompt_embeds[0], atol=1e-4,
                                           rtol=1e-4)
                assert batched.prompt_embeds_mask[i].sum() == n
                torch.testing.assert_close(batched.image_latents[i], single.image_latents[0], atol=1e-5, rtol=1e-4)
                assert batched.img_shapes == single.img_shapes


@pytest.mark.slow
def test_history_step_batch_has_the_pipelines_layout(stages):  # noqa: F811
    cfg = _editor_cfg(stages, prompt_mode="history", max_turns=4, batch_size=3)
    pipe = train_editor.build_pipeline(cfg)
    n = train_editor.num_tokens(pipe, cfg)
    counts = set()
    for step in range(12):
        cond, x0 = train_editor.make_batch(pipe, cfg, step)
        r = cond.image_latents.shape[1] // n
        assert x0.shape[:2] == (3, n) and cond.image_latents.shape[1] == r * n and len(cond.img_shapes[0]) == 1 + r
        assert cond.prompt_embeds.shape[0] == 3
        counts.add(r)
        if len(counts) > 1:
            break
    assert len(counts) > 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "history"])
def test_pool_edits_undo_turns_in_instruction_modes(stages, mode):  # noqa: F811
    session, undo = _undo_session(turns=4)
    cfg = _editor_cfg(stages, prompt_mode=mode, **CARRIED)
    pipe = train_editor.build_pipeline(cfg)
    pool = CarriedPool(pipe, cfg, size=2, turns=4, seed=0)
    pool.fill()
    source = pool.latents[0][0]
    pool.slots[0] = Slot(family=session.family, seed=session.seed, turn=undo, states=list(range(undo + 1)))
    pool.latents[0] = [source] * (undo + 1)
    pool._sessions[(session.family, session.seed)] = session
    assert not pool._restore(0)  # the editor edits the undo: no exact restore
    assert len(pool.references(0)) == (1 + min(undo, 2) if mode == "history" else 1)
    for step in range(6):
        pool.refresh(2, step, pipe.transformer)  # slots at different turns: one sampling run per reference count
        for i, slot in enumerate(pool.slots):
            assert slot.states == list(range(slot.turn + 1))  # every turn an edit, never a restore
            assert torch.isfinite(pool.current(i)).all()
    for refs, text, scene, _ in pool.draw_references(2, random.Random(0)):
        slot = next(s for s in pool.slots if pool.session(s).scenes[s.turn + 1] is scene)
        assert len(refs) == len(train_editor.earlier_states(cfg, slot.turn)) + 1
        assert text in (" ", train_editor.mode_text(cfg, pool.session(slot), slot.turn))


@pytest.mark.slow
def test_intent_pool_still_restores_undo_exactly(stages):  # noqa: F811
    session, undo = _undo_session(turns=4)
    cfg = _editor_cfg(stages, **CARRIED)
    pool = CarriedPool(train_editor.build_pipeline(cfg), cfg, size=1, turns=4, seed=0)
    pool.fill()
    source = pool.latents[0][0]
    pool.slots[0] = Slot(family=session.family, seed=session.seed, turn=undo, states=list(range(undo + 1)))
    pool.latents[0] = [source] * (undo + 1)
    pool._sessions[(session.family, session.seed)] = session
    assert pool._restore(0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "history"])
def test_evaluations_run_the_mode_on_raw_instructions(stages, mode, monkeypatch):  # noqa: F811
    session, undo = _undo_session(turns=4)
    cfg = _editor_cfg(stages, prompt_mode=mode, eval_steps=2)
    pipe = train_editor.build_pipeline(cfg)
    calls = []
    call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append((kwargs["prompt"], kwargs["reasoning"], kwargs.get("max_history_images")))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    monkeypatch.setattr(pipe, "restore_turn", lambda *a, **k: pytest.fail("no exact restore in this mode"))
    images = train_editor.gold_session(pipe, cfg, session, 0)
    assert len(images) == 5
    expected_history = cfg.max_history_images if mode == "history" else None
    assert calls == [(text, mode, expected_history) for text in session.instruction]
    curve = train_editor.evaluate_carried(pipe, cfg, num_sessions=1, num_turns=2)
    assert len(curve["IF"]) == 2
    metrics = train_editor.evaluate(pipe, replace(cfg, eval_carried_sessions=0), num_sessions=1)
    assert 0.0 <= metrics["IF"] <= 1.0 and calls[-1][1] == mode


@pytest.mark.slow
def test_history_carried_training_resumes_exactly(stages, tmp_path):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    overrides = dict(max_steps=3, prompt_mode="history", max_turns=3, **CARRIED)
    metrics = train_editor.train(_editor_cfg(stages, **overrides), full, show_progress=False)
    assert 0.0 <= metrics["IF"] <= 1.0
    rows = common.RunLog(full).rows("train")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["carried"] == 1
    assert train_editor.train(_editor_cfg(stages, **overrides), split, False, stop_after=2) is None
    train_editor.train(_editor_cfg(stages, **overrides), split, show_progress=False)
    _assert_same(_weights(full), _weights(split))

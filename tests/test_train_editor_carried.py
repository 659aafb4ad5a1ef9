"""Editor training on its own carried state (recipes/shapes_tiny/carried.py) and the gold-intent carried curve."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from recipes.shapes_tiny import common, train_editor
from recipes.shapes_tiny.carried import POOL_STATE, POOL_TENSORS, CarriedPool, carried_fraction_at

from test_train_default import _assert_same, _editor_cfg, _weights, stages  # noqa: F401 (stages: a fixture)

CARRIED = dict(carried_schedule=[[0.0, 0.5]], carried_pool=3, carried_turns=3, carried_refresh=2, carried_steps=2)


@pytest.mark.parametrize("schedule", [[[0.0]], [[0.0, 1.5]], [[-0.1, 0.5]]])
def test_carried_schedule_is_checked(schedule):
    with pytest.raises(ValueError, match="carried_schedule"):
        train_editor.EditorConfig(carried_schedule=schedule)


def test_carried_fraction_follows_the_schedule():
    schedule = [[0.0, 0.25], [0.5, 0.5]]
    assert carried_fraction_at((), 5, 10) == 0.0
    assert carried_fraction_at(schedule, 0, 10) == 0.25
    assert carried_fraction_at(schedule, 4, 10) == 0.25
    assert carried_fraction_at(schedule, 5, 10) == 0.5
    assert carried_fraction_at([[0.5, 0.5]], 2, 10) == 0.0


@pytest.mark.slow
def test_carried_training_resumes_exactly_with_its_pool(stages, tmp_path):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    cfg = _editor_cfg(stages, max_steps=3, **CARRIED)
    metrics = train_editor.train(cfg, full, show_progress=False)
    assert 0.0 <= metrics["IF"] <= 1.0
    rows = common.RunLog(full).rows("train")
    assert [r["carried"] for r in rows] == [round(0.5 * cfg.batch_size)] * 3  # the first refresh fills the pool
    assert train_editor.train(_editor_cfg(stages, max_steps=3, **CARRIED), split, False, stop_after=2) is None
    checkpoint = common.latest_checkpoint(split)
    assert (checkpoint / POOL_STATE).is_file() and (checkpoint / POOL_TENSORS).is_file()
    train_editor.train(_editor_cfg(stages, max_steps=3, **CARRIED), split, show_progress=False)
    _assert_same(_weights(full), _weights(split))


@pytest.mark.slow
def test_pool_rolls_sessions_forward_and_restores_undo_exactly(stages):  # noqa: F811
    cfg = _editor_cfg(stages, **CARRIED)
    pipe = train_editor.build_pipeline(cfg)
    pool = CarriedPool(pipe, cfg, size=2, turns=3, seed=0)
    pool.fill()
    assert [slot.turn for slot in pool.slots] == [0, 0] and pool.carried_indices() == []
    for step in range(8):
        pool.refresh(1, step, pipe.transformer)
        for i, slot in enumerate(pool.slots):
            assert 0 <= slot.turn < 3 and len(slot.states) == slot.turn + 1
            assert torch.isfinite(pool.current(i)).all()
    assert pool.draws > 2  # sessions ended and new ones started
    examples = pool.draw(4, random.Random(0))
    assert 1 <= len(examples) <= 2
    for latent, image, text, scene in examples:
        assert latent.shape == pool.latents[0][0].shape and image.size == (cfg.image_size,) * 2 and text


@pytest.mark.slow
def test_gold_session_continues_carried_latents_and_restores_exactly(stages):  # noqa: F811
    from editr2.bench.shapes import generate_session
    from editr2.intent import parse_restore

    cfg = _editor_cfg(stages, eval_steps=2)
    pipe = train_editor.build_pipeline(cfg)
    session = next(s for s in (generate_session("cu", 4, seed, cfg.image_size) for seed in range(200))
                   if any(parse_restore(g, t) is not None for t, g in enumerate(s.gold_intent)))
    images = train_editor.gold_session(pipe, cfg, session, 0)
    assert len(images) == 5
    for t, gold in enumerate(session.gold_intent):
        restored = parse_restore(gold, t)
        if restored is not None:
            assert np.array_equal(np.asarray(images[t + 1]), np.asarray(images[restored]))
    curve = train_editor.evaluate_carried(pipe, cfg, num_sessions=1, num_turns=2)
    assert len(curve["IF"]) == 2 and all(0.0 <= v <= 1.0 for v in curve["cm"]["CC"])


def test_export_keeps_the_request_template_of_an_exported_reasoner_folder(tmp_path):
    import json

    from diffusers_editr2.call_defaults import CALL_DEFAULTS_FILE
    from recipes.shapes_tiny import export

    (tmp_path / CALL_DEFAULTS_FILE).write_text(json.dumps({"template": "Instruction: {instruction}"}))
    assert export.call_defaults(tmp_path)["template"] == "Instruction: {instruction}"
    assert export.call_defaults(tmp_path / "missing") == {**common.CALL_KWARGS}


def test_edit_region_marks_changed_tokens_and_grows_them():
    before = torch.zeros(1, 16, 4)
    after = before.clone()
    after[0, 5] = 1.0  # token (1, 1) of a 4 x 4 grid
    assert train_editor.edit_region(before, after, 0.1, 0)[0].nonzero().flatten().tolist() == [5]
    grown = train_editor.edit_region(before, after, 0.1, 1)[0].view(4, 4)
    assert grown[:3, :3].all() and grown.sum() == 9
    with pytest.raises(ValueError, match="square grid"):
        train_editor.edit_region(torch.zeros(1, 6, 4), torch.ones(1, 6, 4), 0.1, 1)


@pytest.mark.parametrize("value", ["mask", "Edit"])
def test_carried_target_is_checked(value):
    with pytest.raises(ValueError, match="carried_target"):
        train_editor.EditorConfig(carried_target=value)


@pytest.mark.slow
def test_edit_targets_keep_the_carried_latent_outside_the_edit(stages):  # noqa: F811
    from editr2.bench.shapes import generate_session
    from editr2.bench.shapes.render import render

    cfg = _editor_cfg(stages)
    pipe = train_editor.build_pipeline(cfg)
    session = generate_session("cu", 2, 3, cfg.image_size)
    current = torch.randn(1, (cfg.image_size // 8) ** 2, 4 * pipe.vae.config.z_dim)
    edit = train_editor.carried_targets(pipe, cfg, current, [session.scenes[0]], [session.scenes[1]])
    scene = train_editor.carried_targets(pipe, replace(cfg, carried_target="scene"), current, [session.scenes[0]],
                                         [session.scenes[1]])
    after = train_editor.encode_images(pipe, [render(session.scenes[1], cfg.image_size)], cfg.image_size)
    assert torch.equal(scene, after)
    kept = (edit == current).all(-1)[0]
    assert 0 < kept.sum() < kept.numel()  # the carried latent outside the edit region, the true scene inside
    assert torch.equal(edit[0, ~kept], after[0, ~kept])


@pytest.mark.slow
def test_filter_keeps_only_states_the_parser_reads_as_the_true_scene(stages):  # noqa: F811
    cfg = _editor_cfg(stages, **CARRIED, carried_filter=True)
    pipe = train_editor.build_pipeline(cfg)  # a random micro editor: its states are never the true scene
    pool = CarriedPool(pipe, cfg, size=2, turns=3, seed=0)
    pool.fill()
    for step in range(3):
        pool.refresh(2, step, pipe.transformer)
    assert pool.rejected >= 6 and pool.carried_indices() == [] and pool.draw(2, random.Random(0)) == []
    assert [slot.turn for slot in pool.slots] == [0, 0]


@pytest.mark.slow
def test_filter_accepts_a_state_that_is_the_true_scene(stages, monkeypatch):  # noqa: F811
    from editr2.bench.shapes.render import render

    cfg = _editor_cfg(stages, **CARRIED, carried_filter=True)
    pipe = train_editor.build_pipeline(cfg)
    pool = CarriedPool(pipe, cfg, size=2, turns=3, seed=0)
    pool.fill()
    parsed = []
    monkeypatch.setattr(pool, "image", lambda i: render(pool.session(pool.slots[i]).scenes[pool.slots[i].turn],
                                                        cfg.image_size))  # a perfect state, whatever the latent
    original = __import__("editr2.bench.shapes.parser", fromlist=["parse_batch"]).parse_batch

    def spy(images, *args, **kwargs):
        parsed.extend(images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr("editr2.bench.shapes.parser.parse_batch", spy)
    pool.refresh(2, 0, pipe.transformer)
    assert parsed and all(hasattr(im, "size") for im in parsed)  # PIL images, read in [0, 1]
    assert pool.rejected == 0 and all(slot.turn >= 1 for slot in pool.slots)  # (an undo next is applied at once)

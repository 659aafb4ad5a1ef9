"""MICE-Bench metrics on MICE-Shapes: exact for the oracle, discriminating for identity and literal editors."""

import numpy as np
import pytest
from PIL import Image

from editr2.bench.editors import IdentityEditor, LiteralEditor, OracleEditor, make_editor, repaint
from editr2.bench.metrics import BACKGROUND_TOLERANCE, score_session
from editr2.bench.shapes import generate_session, render
from editr2.bench.shapes.render import object_mask, to_array, to_image
from editr2.bench.shapes.runner import run_bench, run_session
from editr2.rewards import DEFAULT_WEIGHTS


def _first(family, predicate, turns=3):
    for seed in range(500):
        s = generate_session(family, turns, seed)
        if predicate(s):
            return s
    raise AssertionError("no such session")


@pytest.fixture(scope="module")
def results():
    out = {}
    for family in ("cm", "cu"):
        for name in ("oracle", "identity", "literal"):
            out[family, name] = run_bench(make_editor(name), family, num_sessions=30, num_turns=3, seed=100,
                                          progress=False)
    return out


@pytest.mark.slow
def test_oracle_scores_exactly_one(results):
    for family in ("cm", "cu"):
        r = results[family, "oracle"]
        metrics = ("IF", "CC", "GA", "reward")
        assert r["mean"] == {**dict.fromkeys(metrics, 1.0), **{f"{k}_ci": [1.0, 1.0] for k in metrics}}
        assert all(row[k] == 1.0 for row in r["per_turn"] for k in ("IF", "CC", "GA", "reward"))


def test_identity_never_follows(results):
    for family in ("cm", "cu"):
        r = results[family, "identity"]
        assert r["mean"]["IF"] == 0.0 and r["mean"]["GA"] == 0.0
        assert r["mean"]["CC"] > 0.8  # it keeps the content, it just does not edit
        assert r["mean"]["reward"] == pytest.approx(DEFAULT_WEIGHTS["CC"] * r["mean"]["CC"])


def test_literal_misses_rules_on_cm_and_references_on_cu(results):
    cm, cu = results["cm", "literal"]["mean"], results["cu", "literal"]["mean"]
    assert cm["GA"] <= 0.6 and cm["GA"] < cm["IF"] - 0.3  # follows the words but not the rule
    assert cu["IF"] <= 0.75  # cannot resolve "it", "the one you added first", "undo that"
    assert results["cu", "literal"]["per_turn"][0]["IF"] == 1.0  # turn 1 has nothing to resolve
    assert cm["CC"] > 0.95 and cu["CC"] > 0.95


def test_ga_is_cumulative():
    s = generate_session("cu", 4, 3)
    truth = [s.target_image(t) for t in range(5)]
    images = [truth[0], truth[0].copy()] + truth[2:]  # turn 1 not done, later turns perfect
    scores = score_session(s, images)
    assert scores[0].IF == 0.0
    assert [r.GA for r in scores] == [0.0, 0.0, 0.0, 0.0]


def test_rule_violation_costs_ga_not_if():
    s = _first("cm", lambda s: s.commands[0].op == "subject_add")
    cmd = s.commands[0]
    wrong = "green" if s.rule_color != "green" else "red"
    painted = [o.replace(color=wrong) if o.cell == cmd.cell else o for o in s.scenes[1].objects]
    image = repaint([s.source_image()], painted, s.scenes[1].tone)
    (score,) = score_session(s, [s.source_image(), image])
    assert score.IF == 1.0 and score.rule == 0.0 and score.GA == 0.0 and score.CC == 1.0


def test_cc_sees_background_damage():
    s = _first("cu", lambda s: s.commands[0].op != "background_change", turns=1)
    good = s.target_image(1)
    x = to_array(good)
    x[:, : x.shape[1] // 2] = np.clip(x[:, : x.shape[1] // 2] + 2 * BACKGROUND_TOLERANCE, 0, 1)  # damage half
    (clean,) = score_session(s, [s.source_image(), good])
    (damaged,) = score_session(s, [s.source_image(), to_image(x)])
    assert clean.CC == 1.0 and clean.background == 1.0
    assert 0.3 < damaged.background < 0.7


def test_editors_protocol_and_errors():
    s = generate_session("cm", 2, 0)
    images, _ = run_session(OracleEditor(), s)
    assert len(images) == 3 and all(im.size == (64, 64) for im in images)
    for t in (1, 2):  # the background is copied (exact where the tone is kept), objects repainted
        out, truth = np.asarray(images[t], np.int16), np.asarray(render(s.scenes[t]), np.int16)
        outside = ~(object_mask(s.scenes[t], 64) | object_mask(s.scenes[t - 1], 64))
        limit = 0 if s.scenes[t].tone == s.scenes[t - 1].tone else 3
        assert np.abs(out - truth)[outside].max() <= limit and np.abs(out - truth).max() <= 3
    with pytest.raises(ValueError, match="bind"):
        OracleEditor()([s.source_image()], [], s.instruction[0])
    assert IdentityEditor()([images[0]], [], "anything") is not images[0]
    assert LiteralEditor()([images[0]], [], "not an instruction").size == (64, 64)
    with pytest.raises(ValueError, match="resize"):
        score_session(s, [s.source_image(), Image.new("RGB", (32, 32))])
    with pytest.raises(ValueError, match="Unknown editor"):
        make_editor("magic")

"""Drift measures on scenes where the answer is known: the oracle gives none, a shifted / resized / recoloured object
gives its known shift, a brightened background its known error; decay slope, half-life and the bootstrap."""

import math

import numpy as np
import pytest

from editr2.bench.drift import (background_drift, decay_slope, drift_results, half_life, session_drift)
from editr2.bench.drift_report import drift_markdown
from editr2.bench.editors import make_editor
from editr2.bench.shapes import generate_session
from editr2.bench.shapes.grammar import Command
from editr2.bench.shapes.render import RADIUS, coverage, render_array, to_image, window_size
from editr2.bench.shapes.runner import run_bench, run_session
from editr2.bench.shapes.sessions import ShapesSession
from editr2.bench.shapes.world import COLORS, Obj, Scene
from editr2.bench.stats import bootstrap_ci

A = Obj("circle", "red", "small", (0, 0))
B = Obj("square", "blue", "small", (2, 2))
C = Obj("diamond", "green", "small", (1, 1))


def _session(tone_1: str = "neutral") -> ShapesSession:
    """Source: A and B; turn 1 adds C (A and B untouched)."""
    scene0 = Scene((A, B), 7, "neutral")
    scene1 = Scene((A, B, C), 7, tone_1)
    cmd = Command("subject_add", shape="diamond", color="green", size="small", cell=(1, 1))
    return ShapesSession(
        family="cu", seed=0, size=64, rule_color=None, scenes=[scene0, scene1], instruction=["Add ..."],
        task_type=["subject_add"], formatted_instruction=["Add ..."], bg_consistency=[tone_1 == "neutral"],
        unchanged_objects=[[A.name, B.name]], available_objects=[[A.name, B.name, C.name]],
        all_objects=[[A.name, B.name, C.name]], gold_intent=["Add ..."], commands=[cmd], references=["none"])


def _paint(array: np.ndarray, obj: Obj, dy: int = 0, dx: int = 0) -> np.ndarray:
    """`obj` painted over `array` with its template moved by (dy, dx) pixels."""
    out = array.copy()
    (y0, x0), cov = coverage(obj, 64)
    w = window_size(64)
    patch = out[y0 + dy:y0 + dy + w, x0 + dx:x0 + dx + w]
    patch[:] = patch * (1 - cov[..., None]) + np.asarray(COLORS[obj.color], np.float32) * cov[..., None]
    return out


def _image_without(session: ShapesSession, obj: Obj) -> np.ndarray:
    scene = session.scenes[1]
    return render_array(Scene(tuple(o for o in scene.objects if o != obj), scene.background, scene.tone))


def _drift(session, image_1):
    (row,) = session_drift(session, [session.source_image(), to_image(image_1)])
    return row


def test_exact_image_gives_zero_drift():
    s = _session()
    row = _drift(s, render_array(s.scenes[1]))
    assert (row.bg_mean, row.bg_worst, row.color_shift, row.position_shift, row.size_change) == (0, 0, 0, 0, 0)
    assert (row.objects, row.missing) == (2, 0)


def test_shifted_object_gives_its_shift():
    s = _session()
    row = _drift(s, _paint(_image_without(s, A), A, dy=0, dx=3))
    assert row.position_shift == pytest.approx(3.0 / 2, abs=0.05)  # A moved 3 px, B not: mean over the two
    assert row.size_change == pytest.approx(0.0, abs=0.02)
    assert row.bg_mean > 0 and row.bg_worst > row.bg_mean  # the uncovered background sits in one cell
    row = _drift(s, _paint(_image_without(s, A), A, dy=2, dx=2))
    assert row.position_shift == pytest.approx(math.hypot(2, 2) / 2, abs=0.05) and row.missing == 0


def test_resized_object_gives_its_scale():
    s = _session()
    big = _paint(_image_without(s, B), B.replace(size="large"))
    row = _drift(s, big)
    expected = RADIUS["large"] / RADIUS["small"] - 1  # a square: its area scales with the radius squared
    assert row.size_change == pytest.approx(expected / 2, rel=0.05)
    assert row.position_shift == pytest.approx(0.0, abs=0.1)


def test_recoloured_object_gives_its_colour_distance_and_a_missing_one():
    s = _session()
    row = _drift(s, _paint(_image_without(s, A), A.replace(color="orange")))
    distance = np.linalg.norm(np.subtract(COLORS["orange"], COLORS["red"]))
    assert row.color_shift == pytest.approx(distance / 2, abs=0.01)
    removed = _drift(s, _image_without(s, A))
    assert removed.missing == 1 and removed.position_shift == pytest.approx(0.0, abs=0.05)


def test_brightened_background_gives_its_error():
    s = _session()
    image = render_array(s.scenes[1]) + 0.05
    row = _drift(s, np.clip(image, 0, 1))
    assert row.bg_mean == pytest.approx(0.05, abs=0.003) and row.bg_worst == pytest.approx(0.05, abs=0.003)
    local = render_array(s.scenes[1])
    local[:21, 22:42] += 0.2  # the top centre cell only (no object there)
    row = _drift(s, local)
    assert row.bg_worst == pytest.approx(0.2, abs=0.01)
    assert 0.01 < row.bg_mean < 0.05


def test_background_reference_follows_a_tone_change():
    s = _session(tone_1="warm")
    row = _drift(s, render_array(s.scenes[1]))  # the source's texture in the new tone is the reference
    # 8-bit rounding against a float reference: under one step, and a small fraction of a pixel
    assert row.bg_mean < 1 / 255 and row.position_shift == pytest.approx(0.0, abs=0.1)


def test_background_drift_validates():
    a = np.zeros((8, 8, 3), np.float32)
    assert background_drift(a, a + 0.1, np.zeros((8, 8), bool)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same size"):
        background_drift(a, np.zeros((4, 4, 3)), np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="non-finite"):
        background_drift(a * np.nan, a, np.ones((8, 8), bool))


@pytest.mark.parametrize("family", ["cm", "cu"])
def test_oracle_gives_no_drift_over_16_turns(family):
    for seed in range(3):
        s = generate_session(family, 16, seed)
        images, _ = run_session(make_editor("oracle"), s)
        for row, same_tone in zip(session_drift(s, images), s.bg_consistency):
            if same_tone:  # the oracle copies the background: exactly the source's pixels
                assert row.bg_mean == 0 and row.bg_worst == 0
            else:  # re-tinted through the parser's texture estimate: under one 8-bit step
                assert row.bg_mean < 1 / 255
            assert row.missing == 0
            if row.objects:
                assert row.color_shift == 0
                # redrawn over a filled-in background: anti-aliased edges move the centroid by a fraction of a pixel
                assert row.position_shift < 0.25 and row.size_change < 0.03


def test_decay_slope_and_half_life_are_exact_on_a_linear_decay():
    turns = np.arange(1, 17)
    values = np.tile(1 - 0.1 * (turns - 1), (5, 1))
    assert decay_slope(values) == pytest.approx(-0.1)
    assert half_life(values) == pytest.approx(6.0)
    values = np.tile(1 - 0.08 * (turns - 1), (5, 1))  # 0.5 is crossed between turns 7 (0.52) and 8 (0.44)
    assert half_life(values) == pytest.approx(7.25)
    assert math.isinf(half_life(np.ones((3, 16))))


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    data = rng.normal(1.0, 1.0, size=400)
    low, high = bootstrap_ci(data, np.mean)
    assert low < 1.0 < high and high - low < 0.3
    assert bootstrap_ci(data, np.mean) == (low, high)  # seeded
    assert bootstrap_ci(np.full(10, 2.0), np.mean) == (2.0, 2.0)
    assert bootstrap_ci(np.ones((4, 3)), lambda x: float("inf")) == (math.inf, math.inf)
    with pytest.raises(ValueError, match="row"):
        bootstrap_ci(np.array([]), np.mean)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(data, np.mean, level=95)


@pytest.mark.slow
def test_bench_results_carry_drift_and_the_report_shows_it():
    results = run_bench(make_editor("literal"), family="cu", num_sessions=3, num_turns=5, seed=0, progress=False)
    drift = results["drift"]
    assert drift["sessions"] == 3 and [r["turn"] for r in drift["per_turn"]] == [1, 2, 3, 4, 5]
    assert set(drift["summary"]) >= {"IF", "CC", "GA", "bg_mean", "position_shift"}
    assert set(drift["summary"]["IF"]) == {"slope", "slope_ci", "half_life", "half_life_ci"}
    low, high = drift["summary"]["CC"]["slope_ci"]
    assert low <= drift["summary"]["CC"]["slope"] <= high
    text = drift_markdown(results)
    assert "## Drift per turn (3 sessions)" in text and "| CC |" in text and "half-life" in text
    again = drift_results([[]], [], 5)  # no drift recorded (results written before the measures): still a table
    assert again["sessions"] == 0 and again["per_turn"][0]["bg_mean"] is None

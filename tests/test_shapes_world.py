"""MICE-Shapes world: scenes, deterministic rendering and the oracle parser's accuracy (clean and noisy + blurred)."""

import random

import numpy as np
import pytest
from PIL import ImageFilter

from editr2.bench.shapes import (CELL_NAMES, COLOR_NAMES, SHAPES, TONE_NAMES, Obj, Scene, analyze, parse, parse_batch,
                                 random_scene, render)
from editr2.bench.shapes.render import object_mask, render_background


def _object_accuracy(parsed, truth):
    """Fraction of (cell, object) slots right, over cells where either scene has an object."""
    right = total = 0
    for p, s in zip(parsed, truth):
        for cell in CELL_NAMES:
            a, b = p.at(cell), s.at(cell)
            if a is None and b is None:
                continue
            total += 1
            right += a == b
    return right / total


@pytest.fixture(scope="module")
def scenes_and_images():
    rng = random.Random(1234)
    scenes = [random_scene(rng) for _ in range(1000)]
    return scenes, [render(s) for s in scenes]


def test_vocabulary_sizes():
    assert len(SHAPES) >= 4 and len(COLOR_NAMES) == 6 and len(CELL_NAMES) == 9


def test_obj_and_scene_validation():
    with pytest.raises(ValueError, match="Unknown shape"):
        Obj("hexagon", "red", "small", (0, 0))
    with pytest.raises(ValueError, match="off the 3x3 grid"):
        Obj("circle", "red", "small", (3, 0))
    a, b = Obj("circle", "red", "small", (1, 1)), Obj("square", "blue", "large", (1, 1))
    with pytest.raises(ValueError, match="share a cell"):
        Scene((a, b))
    scene = Scene((Obj("square", "blue", "large", (2, 2)), a), background=7, tone="warm")
    assert [o.cell for o in scene.objects] == [(1, 1), (2, 2)]  # kept in reading order
    assert Scene.from_json(scene.to_json()) == scene


def test_render_is_deterministic_and_sized():
    scene = random_scene(random.Random(0))
    a, b = np.asarray(render(scene)), np.asarray(render(scene))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert render(scene, 96).size == (96, 96)


def test_background_texture_is_seeded_and_muted():
    bg0 = render_background(Scene((), background=1, tone="neutral"))
    bg1 = render_background(Scene((), background=2, tone="neutral"))
    assert np.abs(bg0 - bg1).mean() > 0.02  # different seeds, different patterns
    for tone in TONE_NAMES:
        bg = render_background(Scene((), background=3, tone=tone))
        assert (bg.max(-1) - bg.min(-1)).max() <= 0.21  # muted: never a palette colour


def test_parser_never_sees_objects_in_a_bare_background():
    scenes = [Scene((), background=s, tone=t) for s in range(20) for t in TONE_NAMES]
    parsed = parse_batch([render(s) for s in scenes])
    assert all(p.objects == () for p in parsed)
    assert [p.tone for p in parsed] == [s.tone for s in scenes]


@pytest.mark.slow
def test_parser_accuracy_clean(scenes_and_images):
    scenes, images = scenes_and_images
    parsed = parse_batch(images)
    assert _object_accuracy(parsed, scenes) >= 0.995
    assert np.mean([p.tone == s.tone for p, s in zip(parsed, scenes)]) >= 0.995


@pytest.mark.slow
def test_parser_accuracy_noise_and_blur(scenes_and_images):
    scenes, images = scenes_and_images
    rng = np.random.default_rng(0)
    noisy = []
    for image in images:  # mild blur, then Gaussian pixel noise sigma 0.05
        x = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) / 255.0
        noisy.append(np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0).astype(np.float32))
    parsed = parse_batch(np.stack(noisy))
    assert _object_accuracy(parsed, scenes) >= 0.97


def test_parser_other_size_and_single_image():
    scene = Scene((Obj("cross", "orange", "small", (0, 2)), Obj("triangle", "purple", "large", (2, 0))), 5, "dark")
    assert parse(render(scene, 96)).objects == scene.objects
    result = analyze(render(scene))
    assert result.scene.tone == "dark" and result.scene.background == -1
    assert result.mask.shape == (64, 64) and result.background.shape == (64, 64, 3)
    assert np.array_equal(result.mask, object_mask(scene, 64))  # the matched templates, grown by one pixel
    # the background estimate is close to the true background under the objects too
    assert np.abs(result.background - render_background(scene)).mean() < 0.03


def test_parser_accepts_a_known_background():
    scene = Scene((Obj("diamond", "green", "small", (1, 1)),), background=9, tone="light")
    background = render(Scene((), background=9, tone="light"))
    assert parse(render(scene), background_image=background) == Scene(scene.objects, -1, "light")

"""Batched torch rendering of MICE-Shapes scenes: the PIL renderer's pixels, read back exactly by the oracle parser."""

import random

import numpy as np
import pytest
import torch

from editr2.bench.shapes import Obj, Scene, parse_batch, random_scene, render
from editr2.bench.shapes.torch_render import render_batch, to_uint8


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(77)
    return [random_scene(rng) for _ in range(500)]


def _pil(scenes, size=64):
    return np.stack([np.asarray(render(s, size)) for s in scenes])


@pytest.mark.slow
def test_torch_render_matches_pil_and_parses_back(scenes):
    pixels = render_batch(scenes, 64)
    assert pixels.shape == (500, 3, 64, 64) and pixels.dtype == torch.float32
    ours, ref = to_uint8(pixels), _pil(scenes)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 1e-3  # float rounding at a .5 level at most
    parsed = parse_batch(list(ours.astype(np.float32) / 255.0))
    assert all(p.objects == s.objects and p.tone == s.tone for p, s in zip(parsed, scenes))


@pytest.mark.parametrize("size", [32, 96])
def test_torch_render_other_sizes_and_unquantized(size):
    scenes = [random_scene(random.Random(i)) for i in range(8)]
    raw = render_batch(scenes, size, quantize=False)
    assert raw.shape == (8, 3, size, size)
    diff = np.abs(to_uint8(raw).astype(np.int16) - _pil(scenes, size).astype(np.int16))
    assert diff.max() <= 1


def test_torch_render_empty_scene_and_bad_input():
    scene = Scene((), background=5, tone="dark")
    assert np.array_equal(to_uint8(render_batch([scene]))[0], np.asarray(render(scene)))
    with pytest.raises(TypeError, match="sequence of"):
        render_batch(scene)
    with pytest.raises(ValueError, match="at least one"):
        render_batch([])
    with pytest.raises(ValueError, match="size >= 24"):
        render_batch([scene], 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_render_on_cuda_matches_cpu():
    scenes = [random_scene(random.Random(i)) for i in range(64)] + [Scene((Obj("cross", "red", "large", (1, 1)),))]
    gpu = render_batch(scenes, 64, device="cuda")
    assert gpu.device.type == "cuda"
    diff = np.abs(to_uint8(gpu).astype(np.int16) - _pil(scenes).astype(np.int16))
    assert diff.max() <= 1
    parsed = parse_batch(list(to_uint8(gpu).astype(np.float32) / 255.0))
    assert all(p.objects == s.objects and p.tone == s.tone for p, s in zip(parsed, scenes))

"""Deterministic, anti-aliased rendering of MICE-Shapes scenes (numpy only).

Geometry at image size S: the image is split into a 3x3 grid of cells of S/3 pixels; an object is centred in its
cell with radius 0.22 (small) or 0.40 (large) of a cell, so it never leaves its cell. Each object's per-pixel
coverage (4x4 supersampling) is precomputed once per (size, cell, shape, object size) as a *template* on a fixed
square window around the cell; the oracle parser matches against the same templates.

The background is `c0 + a * (c1 - c0)` where `(c0, c1)` are the two muted colours of the scene's tone and `a` is a
smooth noise field in [0, 1]: a seeded 4x4 Gaussian grid interpolated by normalised Gaussian radial weights (the same
pattern at every resolution) and min-max normalised.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .world import CELLS, COLORS, GRID, SHAPES, SIZES, TONES, Scene

RADIUS = {"small": 0.22, "large": 0.40}  # fraction of a cell
SUPERSAMPLE = 4
NOISE_GRID = 4
DEFAULT_SIZE = 64


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in object units (`u` right, `v` down, radius 1)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":  # pointing up
        return (v <= 0.75) & (v >= -1.0) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.75)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    raise ValueError(f"Unknown shape {shape!r}: pass one of {SHAPES}.")


def window_size(size: int) -> int:
    """Side of the square window that holds one cell's object (one cell, rounded up)."""
    return int(np.ceil(size / GRID))


@lru_cache(maxsize=16)
def cell_windows(size: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Top-left pixel `(y0, x0)` of each cell's window, clamped inside the image."""
    w = window_size(size)
    out = {}
    for r, c in CELLS:
        cy, cx = (r + 0.5) * size / GRID, (c + 0.5) * size / GRID
        y0 = int(np.clip(round(cy - w / 2), 0, size - w))
        x0 = int(np.clip(round(cx - w / 2), 0, size - w))
        out[(r, c)] = (y0, x0)
    return out


@lru_cache(maxsize=16)
def templates(size: int) -> np.ndarray:
    """Coverage templates, shape `(9, len(SHAPES), len(SIZES), W, W)` in [0, 1], cells in reading order."""
    w = window_size(size)
    cell_px = size / GRID
    sub = (np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres within the window
    out = np.zeros((len(CELLS), len(SHAPES), len(SIZES), w, w), dtype=np.float32)
    for k, (r, c) in enumerate(CELLS):
        y0, x0 = cell_windows(size)[(r, c)]
        cy, cx = (r + 0.5) * cell_px - y0, (c + 0.5) * cell_px - x0
        for j, obj_size in enumerate(SIZES):
            radius = RADIUS[obj_size] * cell_px
            v, u = np.meshgrid((sub - cy) / radius, (sub - cx) / radius, indexing="ij")
            for i, shape in enumerate(SHAPES):
                hits = _inside(shape, u, v).astype(np.float32)  # (W*s, W*s)
                out[k, i, j] = hits.reshape(w, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    out.setflags(write=False)
    return out


def coverage(obj, size: int) -> tuple[tuple[int, int], np.ndarray]:
    """`((y0, x0), (W, W) coverage)` of one object."""
    k = CELLS.index(obj.cell)
    return cell_windows(size)[obj.cell], templates(size)[k, SHAPES.index(obj.shape), SIZES.index(obj.size)]


def object_mask(scene: Scene, size: int, dilate: int = 1) -> np.ndarray:
    """Boolean `(S, S)` mask of every pixel any object of `scene` touches, grown by `dilate` pixels."""
    mask = np.zeros((size, size), dtype=bool)
    w = window_size(size)
    for obj in scene.objects:
        (y0, x0), cov = coverage(obj, size)
        mask[y0:y0 + w, x0:x0 + w] |= cov > 0
    return grow_mask(mask, dilate)


def grow_mask(mask: np.ndarray, steps: int) -> np.ndarray:
    """Boolean `(H, W)` mask grown by `steps` pixels (4-neighbourhood: up, down, left, right)."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Background
# ---------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _interp_matrix(size: int) -> np.ndarray:
    """(S, NOISE_GRID) normalised Gaussian radial weights from grid nodes to pixel centres."""
    x = (np.arange(size) + 0.5) / size
    nodes = (np.arange(NOISE_GRID) + 0.5) / NOISE_GRID
    w = np.exp(-((x[:, None] - nodes[None, :]) ** 2) / (2 * (0.6 / NOISE_GRID) ** 2))
    return w / w.sum(axis=1, keepdims=True)


def texture(seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The background pattern: a smooth `(S, S)` field in [0, 1] determined by `seed` alone."""
    grid = np.random.default_rng(int(seed) & 0xFFFFFFFF).standard_normal((NOISE_GRID, NOISE_GRID))
    m = _interp_matrix(size)
    field = m @ grid @ m.T  # (S, S)
    lo, hi = field.min(), field.max()
    return ((field - lo) / max(hi - lo, 1e-8)).astype(np.float32)


def tint(alpha: np.ndarray, tone: str) -> np.ndarray:
    """Colour a texture field with a tone: `(H, W)` in [0, 1] -> `(H, W, 3)` RGB in [0, 1]."""
    if tone not in TONES:
        raise ValueError(f"Unknown tone {tone!r}: pass one of {tuple(TONES)}.")
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in TONES[tone])
    return c0 + alpha[..., None] * (c1 - c0)


def render_background(scene: Scene, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The scene's background alone, `(S, S, 3)` float32 in [0, 1]."""
    return tint(texture(scene.background, size), scene.tone)


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------


def compose(background: np.ndarray, objects, size: int | None = None) -> np.ndarray:
    """Paint `objects` over a `(S, S, 3)` float background (not modified); returns a new float array."""
    size = background.shape[0] if size is None else size
    out = np.array(background, dtype=np.float32, copy=True)
    w = window_size(size)
    for obj in objects:
        (y0, x0), cov = coverage(obj, size)
        patch = out[y0:y0 + w, x0:x0 + w]
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        patch[:] = patch * (1.0 - cov[..., None]) + color * cov[..., None]
    return out


def to_image(array: np.ndarray) -> Image.Image:
    """Float `(H, W, 3)` in [0, 1] -> RGB PIL image (rounded to uint8)."""
    return Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8), "RGB")


def to_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 `(H, W, 3)` in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def render_array(scene: Scene, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render to float `(S, S, 3)` in [0, 1] (before uint8 rounding)."""
    if size < 24:
        raise ValueError(f"size={size} is too small to draw shapes: pass size >= 24 (default {DEFAULT_SIZE}).")
    return compose(render_background(scene, size), scene.objects, size)


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """Render a scene as a `size` x `size` RGB image. Deterministic: the same scene gives the same pixels."""
    return to_image(render_array(scene, size))

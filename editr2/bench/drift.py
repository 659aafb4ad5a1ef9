"""Drift measures per turn on MICE-Shapes: what an editor changes that nobody asked it to change.

Repeated edits degrade images in known ways (colours and brightness drift, the picture shifts or zooms, untouched
regions blur). The session's ground truth says exactly which parts of each image should still equal the source, so
the drift is measured there, per turn t, from the pixels (no parser involved):

- **bg_mean**: mean absolute error (per channel, colours in [0, 1]) of the untouched background against its
  reference: the pixels outside every object of G_0 and G_t (the CC mask, `metrics.background_score`); the reference
  is the source image while the background should be unchanged, otherwise the source's texture in the new tone.
- **bg_worst**: the same error in the worst of the 3x3 grid cells (cells with at least `MIN_CELL_FRACTION` of their
  pixels in the mask), so a local smear is not averaged away.
- **color_shift**: for each source object no edit touched up to turn t, the RGB distance between the median colour
  of its interior pixels (full coverage, at its source position) in image t and in the source; mean over objects.
- **position_shift**: the distance in pixels (at the session's image size) between the centroid of such an object's
  colour coverage in image t and in the source, looked for in its cell grown by `SEARCH_MARGIN` of a cell on every
  side (pixels of the other objects of G_0 and G_t left out; an object pushed out of its cell reads as missing);
  **size_change**: `|sqrt(area_t / area_0) - 1|` of that coverage (0.82 for a small object drawn large). An object
  whose coverage fell below `FOUND_FRACTION` of its source area counts as **missing** instead (CC already scores it
  as lost).

Object measures are `None` on turns without untouched objects. `session_drift` scores one session; `drift_results`
aggregates sessions per turn, with a decay summary of these measures and of IF / CC / GA / reward: the slope per
turn of the per-turn means (least squares), the half-life (the first turn, linearly interpolated, where a score
falls to half its turn-1 value; `None` in the results when it never does) and 95% bootstrap intervals over sessions
(`stats.bootstrap_ci`). The VAE-only drift of a model editor (carried latent vs a decode/encode round trip each turn)
needs the model, so it lives in the diffusers integration (`diffusers_editr2.drift.vae_drift`); it is measured with
`background_drift` and the same masks (`background_reference`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .shapes.render import coverage, object_mask, render_background, to_array, window_size
from .shapes.sessions import ShapesSession
from .shapes.world import COLORS, GRID, Obj, Scene
from .stats import bootstrap_ci

DRIFT_METRICS = ("bg_mean", "bg_worst", "color_shift", "position_shift", "size_change")
SCORE_METRICS = ("IF", "CC", "GA", "reward")
HALF_LIFE_METRICS = SCORE_METRICS  # scores that decay; the drift measures grow, so only their slope is summarised
MIN_CELL_FRACTION = 0.125  # a grid cell enters bg_worst when at least this share of its pixels is untouched background
COVERAGE_FLOOR = 0.25      # coverage below this is treated as 0 (texture noise projected on the object's colour)
FOUND_FRACTION = 0.25      # an object whose coverage area fell below this share of its source area is missing
SEARCH_MARGIN = 0.08       # an untouched object is looked for in its cell grown by this fraction of a cell


@dataclass
class DriftScore:
    """Drift of one turn (see the module docstring); object measures are `None` without untouched objects."""

    turn: int
    bg_mean: float
    bg_worst: float
    color_shift: float | None = None
    position_shift: float | None = None
    size_change: float | None = None
    objects: int = 0
    missing: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Background
# ---------------------------------------------------------------------------------------------------------------------


def _check_array(array, name: str) -> np.ndarray:
    array = to_array(array) if isinstance(array, Image.Image) else np.asarray(array, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"`{name}` has shape {array.shape}: pass an RGB image or a float (H, W, 3) array in [0, 1].")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` holds non-finite values: pass a finite image.")
    return array


def background_drift(image, reference, mask: np.ndarray, grid: int = GRID) -> tuple[float, float]:
    """`(mean, worst cell)` absolute error of `image` against `reference` over `mask`.

    Args:
        image, reference: PIL RGB images or float `(H, W, 3)` arrays in [0, 1], the same size.
        mask (`np.ndarray`): `(H, W)` bool, True where the image should equal the reference.
        grid (`int`, defaults to 3): the worst cell is taken over a `grid` x `grid` split of the image (cells with at
            least `MIN_CELL_FRACTION` of their pixels in `mask`).

    Returns:
        `(0.0, 0.0)` when `mask` is empty.
    """
    image, reference = _check_array(image, "image"), _check_array(reference, "reference")
    mask = np.asarray(mask, dtype=bool)
    if image.shape != reference.shape or mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape}, reference {reference.shape} and mask {mask.shape} must agree: pass "
                         "the same size for all three.")
    if not mask.any():
        return 0.0, 0.0
    error = np.abs(image - reference).mean(-1)  # (H, W)
    mean = float(error[mask].mean())
    h, w = mask.shape
    worst = None
    for r in range(grid):
        for c in range(grid):
            ys = slice(r * h // grid, (r + 1) * h // grid)
            xs = slice(c * w // grid, (c + 1) * w // grid)
            cell = mask[ys, xs]
            if cell.mean() >= MIN_CELL_FRACTION:
                value = float(error[ys, xs][cell].mean())
                worst = value if worst is None else max(worst, value)
    return mean, mean if worst is None else worst


def background_reference(session: ShapesSession, turn: int, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(reference image, mask)` of turn `turn`'s untouched background (the CC reference and mask)."""
    size = session.size
    reference = source if session.bg_consistency[turn - 1] else render_background(session.scenes[turn], size)
    mask = ~(object_mask(session.scenes[0], size) | object_mask(session.scenes[turn], size))
    return reference, mask


# ---------------------------------------------------------------------------------------------------------------------
# Untouched objects
# ---------------------------------------------------------------------------------------------------------------------


def _objects_mask(objects: Sequence[Obj], size: int) -> np.ndarray:
    """`(S, S)` bool mask of the pixels any of `objects` touches, grown by one pixel (as `render.object_mask`)."""
    mask = np.zeros((size, size), dtype=bool)
    for obj in objects:  # one at a time: objects of different scenes may share a cell
        mask |= object_mask(Scene((obj,), 0, "neutral"), size)
    return mask


def _interior(obj: Obj, size: int) -> tuple[slice, slice, np.ndarray]:
    (y0, x0), cov = coverage(obj, size)
    w = window_size(size)
    inside = cov >= 0.999
    if not inside.any():
        inside = cov >= 0.5
    return slice(y0, y0 + w), slice(x0, x0 + w), inside


def _search_window(obj: Obj, size: int) -> tuple[slice, slice]:
    """The object's cell grown by `SEARCH_MARGIN` of a cell on every side, clipped to the image (a neighbour's
    object, at most 0.9 of a half-cell from its centre, stays out of it)."""
    cell = size / GRID
    r, c = obj.cell
    m = SEARCH_MARGIN
    y0, y1 = int(max(0, np.floor((r - m) * cell))), int(min(size, np.ceil((r + 1 + m) * cell)))
    x0, x1 = int(max(0, np.floor((c - m) * cell))), int(min(size, np.ceil((c + 1 + m) * cell)))
    return slice(y0, y1), slice(x0, x1)


def _coverage_moments(image: np.ndarray, background: np.ndarray, obj: Obj, keep: np.ndarray, ys: slice,
                      xs: slice) -> tuple[float, np.ndarray | None]:
    """Area and centroid `(y, x)` of the coverage of `obj`'s colour over `background` inside the window."""
    color = np.asarray(COLORS[obj.color], dtype=np.float32)
    px, bg = image[ys, xs], background[ys, xs]
    diff = color - bg
    cov = ((px - bg) * diff).sum(-1) / np.maximum((diff * diff).sum(-1), 1e-4)
    cov = np.where(keep[ys, xs] & (cov >= COVERAGE_FLOOR), np.clip(cov, 0.0, 1.0), 0.0)
    area = float(cov.sum())
    if area <= 0:
        return 0.0, None
    yy, xx = np.mgrid[ys, xs]
    return area, np.array([(cov * yy).sum() / area, (cov * xx).sum() / area])


def object_drift(session: ShapesSession, turn: int, image: np.ndarray, source: np.ndarray) -> dict:
    """Colour, position and size drift of the source objects no edit touched up to `turn` (module docstring)."""
    size = session.size
    untouched = session.unchanged_scene_objects(turn)
    if not untouched:
        return {"color_shift": None, "position_shift": None, "size_change": None, "objects": 0, "missing": 0}
    background_0 = render_background(session.scenes[0], size)
    background_t = background_0 if session.bg_consistency[turn - 1] else render_background(session.scenes[turn], size)
    colors, shifts, scales, missing = [], [], [], 0
    for obj in untouched:
        ys, xs, inside = _interior(obj, size)
        colors.append(float(np.linalg.norm(np.median(image[ys, xs][inside], axis=0)
                                           - np.median(source[ys, xs][inside], axis=0))))
        others = [o for o in session.scenes[0].objects + session.scenes[turn].objects if o != obj]
        keep = ~_objects_mask(others, size)
        wy, wx = _search_window(obj, size)
        area_0, centre_0 = _coverage_moments(source, background_0, obj, keep, wy, wx)
        area_t, centre_t = _coverage_moments(image, background_t, obj, keep, wy, wx)
        if centre_0 is None or centre_t is None or area_t < FOUND_FRACTION * area_0:
            missing += 1
            continue
        shifts.append(float(np.linalg.norm(centre_t - centre_0)))
        scales.append(abs(float(np.sqrt(area_t / area_0)) - 1.0))
    return {"color_shift": float(np.mean(colors)),
            "position_shift": float(np.mean(shifts)) if shifts else None,
            "size_change": float(np.mean(scales)) if scales else None,
            "objects": len(untouched), "missing": missing}


# ---------------------------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------------------------


def session_drift(session: ShapesSession, images: Sequence[Image.Image]) -> list[DriftScore]:
    """Drift of every edited turn of one session.

    Args:
        session (`ShapesSession`): the ground truth.
        images (`Sequence[PIL.Image.Image]`): `[source, image after turn 1, ...]` (at most `num_turns` edited
            images), all `session.size` square.
    """
    if len(images) < 2 or len(images) > session.num_turns + 1:
        raise ValueError(f"Pass the source image plus 1..{session.num_turns} edited images, got {len(images)} images.")
    arrays = [_check_array(im, f"images[{k}]") for k, im in enumerate(images)]
    for k, a in enumerate(arrays):
        if a.shape[:2] != (session.size, session.size):
            raise ValueError(f"Image {k} is {a.shape[1]}x{a.shape[0]}; this session's images are "
                             f"{session.size}x{session.size}: resize the editor's output first.")
    out = []
    for t in range(1, len(arrays)):
        reference, mask = background_reference(session, t, arrays[0])
        mean, worst = background_drift(arrays[t], reference, mask)
        out.append(DriftScore(t, mean, worst, **object_drift(session, t, arrays[t], arrays[0])))
    return out


def _matrix(rows: Sequence[Sequence[dict]], key: str, num_turns: int) -> np.ndarray:
    """`(sessions, turns)` values of `key` (NaN where missing or None)."""
    out = np.full((len(rows), num_turns), np.nan)
    for i, session_rows in enumerate(rows):
        for row in session_rows:
            value = row.get(key)
            if value is not None and 1 <= row["turn"] <= num_turns:
                out[i, row["turn"] - 1] = value
    return out


def _turn_means(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN turn (no untouched object anywhere) is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def decay_slope(values: np.ndarray) -> float:
    """Least-squares slope per turn of the per-turn means of `(sessions, turns)` values (NaN-aware)."""
    means = _turn_means(values)
    turns = np.arange(1, len(means) + 1, dtype=np.float64)
    ok = np.isfinite(means)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(turns[ok], means[ok], 1)[0])


def half_life(values: np.ndarray) -> float:
    """First turn (linearly interpolated) where the per-turn mean falls to half its turn-1 value; `inf` if never."""
    means = _turn_means(values)
    if len(means) == 0 or not np.isfinite(means[0]):
        return float("nan")
    half = means[0] / 2
    for t in range(1, len(means)):
        if np.isfinite(means[t]) and means[t] <= half:
            before = means[t - 1]
            step = before - means[t]
            frac = (before - half) / step if step > 0 else 1.0
            return float(t + frac)  # turns are 1-based: index t - 1 is turn t
    return float("inf")


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _summary(values: np.ndarray, with_half_life: bool, num_resamples: int, seed: int) -> dict:
    out = {"slope": _finite_or_none(decay_slope(values)),
           "slope_ci": [_finite_or_none(v) for v in bootstrap_ci(values, decay_slope, num_resamples, seed=seed)]}
    if with_half_life:
        out["half_life"] = _finite_or_none(half_life(values))
        out["half_life_ci"] = [_finite_or_none(v) for v in bootstrap_ci(values, half_life, num_resamples, seed=seed)]
    return out


def drift_results(scores: Sequence[Sequence], drift: Sequence[Sequence], num_turns: int, num_resamples: int = 1000,
                  seed: int = 0) -> dict:
    """Per-turn means of the drift measures and the decay summary, over sessions.

    Args:
        scores: per session, its `metrics.TurnScore`s (or their dicts).
        drift: per session, its `DriftScore`s (or their dicts); sessions recorded without drift may be left out.
        num_turns (`int`): turns per session.
        num_resamples (`int`, defaults to 1000), seed (`int`, defaults to 0): the bootstrap's.

    Returns:
        `{"per_turn": [{"turn", "bg_mean", ..., "objects", "missing"}, ...], "summary": {metric: {"slope",
        "slope_ci", ["half_life", "half_life_ci"]}}, "sessions": number of sessions with drift}`. Values that cannot
        be measured (no untouched object on a turn) are `None`, and so is a half-life (or interval bound) not
        reached within the session's turns: the data stay plain JSON.
    """
    as_dicts = [[r if isinstance(r, dict) else r.to_dict() for r in rows] for rows in drift]
    score_dicts = [[r if isinstance(r, dict) else r.to_dict() for r in rows] for rows in scores]
    per_turn = []
    for t in range(1, num_turns + 1):
        row = {"turn": t}
        for key in DRIFT_METRICS:
            column = _matrix(as_dicts, key, num_turns)[:, t - 1] if as_dicts else np.array([])
            column = column[np.isfinite(column)]
            row[key] = float(column.mean()) if len(column) else None
        for key in ("objects", "missing"):
            row[key] = int(sum(r[key] for rows in as_dicts for r in rows if r["turn"] == t))
        per_turn.append(row)
    summary = {}
    for key in SCORE_METRICS:
        if score_dicts:
            summary[key] = _summary(_matrix(score_dicts, key, num_turns), key in HALF_LIFE_METRICS, num_resamples,
                                    seed)
    for key in DRIFT_METRICS:
        if as_dicts:
            summary[key] = _summary(_matrix(as_dicts, key, num_turns), False, num_resamples, seed)
    return {"per_turn": per_turn, "summary": summary, "sessions": len(as_dicts)}

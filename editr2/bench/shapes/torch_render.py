"""Batched MICE-Shapes rendering with plain torch ops, on any device (CPU or CUDA).

`render_batch(scenes, size, device)` draws a whole batch of scenes at once and gives the pixels of `render.render`
(the numpy/PIL renderer) up to float rounding: the same coverage templates (`render.templates`, 4x4 supersampled) on
each cell's window, the same smooth-noise background (`render.texture`: the seeded 4x4 Gaussian grid,
drawn on the CPU with numpy since the seed defines it, interpolated and min-max normalised on the device in float64)
and the same painting order (objects in reading order, `out * (1 - coverage) + colour * coverage` on each cell's window). With
`quantize=True` (default) the result is rounded to the 256 levels of the uint8 image `render` returns, so the oracle
parser reads every scene back exactly (tested on random scenes).

The per-scene work left on the host is turning scenes into index tensors and drawing 16 Gaussian numbers per
background seed; everything per pixel runs batched on `device`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .render import NOISE_GRID, _interp_matrix, cell_windows, templates, window_size
from .world import CELLS, COLORS, GRID, SHAPES, SIZES, TONES, Scene

_TONE_NAMES = tuple(TONES)
_COLOR_NAMES = tuple(COLORS)
_EMPTY = len(SHAPES) * len(SIZES)  # template index of an empty cell (all-zero coverage)

_BANKS: dict = {}


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def template_bank(size: int, device=None) -> torch.Tensor:
    """Coverage windows of every (shape, size) in every cell, `(9, len(SHAPES) * len(SIZES) + 1, W, W)` float32
    (`render.templates` with the last entry all zeros: an empty cell); index `shape * len(SIZES) + size`."""
    device = _device(device)
    key = ("templates", size, str(device))
    if key not in _BANKS:
        w = window_size(size)
        local = templates(size).reshape(len(CELLS), _EMPTY, w, w)
        bank = np.concatenate([local, np.zeros((len(CELLS), 1, w, w), dtype=np.float32)], axis=1)
        _BANKS[key] = torch.from_numpy(bank).to(device)
    return _BANKS[key]


def _constants(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(interp (S, G) float64, palette (colours + 1, 3) float32, tones (tones, 2, 3) float32)` on `device`."""
    key = ("constants", size, str(device))
    if key not in _BANKS:
        interp = torch.from_numpy(_interp_matrix(size)).to(device)
        palette = torch.tensor([*COLORS.values(), (0.0, 0.0, 0.0)], dtype=torch.float32, device=device)
        tones = torch.tensor([TONES[t] for t in _TONE_NAMES], dtype=torch.float32, device=device)
        _BANKS[key] = (interp, palette, tones)
    return _BANKS[key]


def noise_grids(seeds: Sequence[int]) -> torch.Tensor:
    """The background seeds' Gaussian grids, `(B, 4, 4)` float64 on the CPU (exactly `render.texture`'s draws)."""
    return torch.from_numpy(np.stack([np.random.default_rng(int(s) & 0xFFFFFFFF).standard_normal(
        (NOISE_GRID, NOISE_GRID)) for s in seeds]))


def scene_indices(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Scenes as CPU index tensors: per cell (reading order) the `templates` and `colors` `(B, 9)` (an empty cell:
    the zero template and colour padding), the `tones` `(B,)` and the background `grids` `(B, 4, 4)`."""
    if isinstance(scenes, Scene) or not all(isinstance(s, Scene) for s in scenes):
        raise TypeError("Pass a sequence of `editr2.bench.shapes.Scene` objects (a list, even for one scene).")
    if len(scenes) == 0:
        raise ValueError("Pass at least one scene.")
    tpl = np.full((len(scenes), len(CELLS)), _EMPTY, dtype=np.int64)
    col = np.full((len(scenes), len(CELLS)), len(_COLOR_NAMES), dtype=np.int64)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            cell = o.cell[0] * GRID + o.cell[1]
            tpl[b, cell] = SHAPES.index(o.shape) * len(SIZES) + SIZES.index(o.size)
            col[b, cell] = _COLOR_NAMES.index(o.color)
    return {"templates": torch.from_numpy(tpl), "colors": torch.from_numpy(col),
            "tones": torch.tensor([_TONE_NAMES.index(s.tone) for s in scenes], dtype=torch.int64),
            "grids": noise_grids([s.background for s in scenes])}


def render_indices(indices: dict[str, torch.Tensor], size: int = 64, device=None,
                   quantize: bool = True) -> torch.Tensor:
    """`render_batch` from `scene_indices` output (which data workers can build): `(B, 3, S, S)` float32."""
    device = _device(device)
    if size < 24:
        raise ValueError(f"size={size} is too small to draw shapes: pass size >= 24 (default 64).")
    interp, palette, tones = _constants(size, device)
    bank, w = template_bank(size, device), window_size(size)
    grids = indices["grids"].to(device=device, dtype=torch.float64)
    field = interp @ grids @ interp.T  # (B, S, S) float64, as render.texture
    lo = field.amin(dim=(1, 2), keepdim=True)
    hi = field.amax(dim=(1, 2), keepdim=True)
    alpha = ((field - lo) / (hi - lo).clamp_min(1e-8)).to(torch.float32)[:, None]  # (B, 1, S, S)
    c0, c1 = tones[indices["tones"].to(device)].unbind(1)  # (B, 3) each
    out = c0[:, :, None, None] + alpha * (c1 - c0)[:, :, None, None]  # (B, 3, S, S), as render.tint
    tpl, col = indices["templates"].to(device), indices["colors"].to(device)
    for k, cell in enumerate(CELLS):  # reading order, each cell's window only, as render.compose
        y0, x0 = cell_windows(size)[cell]
        patch = out[:, :, y0:y0 + w, x0:x0 + w]
        cov = bank[k][tpl[:, k]][:, None]  # (B, 1, W, W)
        color = palette[col[:, k]][:, :, None, None]  # (B, 3, 1, 1)
        out[:, :, y0:y0 + w, x0:x0 + w] = patch * (1.0 - cov) + color * cov
    if quantize:
        out = torch.round(out * 255.0) / 255.0  # in [0, 1] already: convex mixes of [0, 1] colours
    return out


def render_batch(scenes: Sequence[Scene], size: int = 64, device=None, quantize: bool = True) -> torch.Tensor:
    """Render a batch of scenes on `device`: `(B, 3, S, S)` float32 in [0, 1].

    Args:
        scenes (`Sequence[Scene]`): the scenes (a list, even for one).
        size (`int`, defaults to 64): pixels per side (>= 24).
        device (*optional*): where to render (default CPU).
        quantize (`bool`, defaults to `True`): round to uint8 levels, as the PIL image of `render.render`.
    """
    return render_indices(scene_indices(scenes), size, device, quantize)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """`render_batch` output -> `(B, S, S, 3)` uint8 numpy (what `np.asarray(render(scene))` gives per scene)."""
    return torch.round(pixels.clamp(0, 1) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

"""The oracle parser: a MICE-Shapes image back to its scene (vectorised numpy, batched).

Steps, for a batch of images `(B, S, S, 3)`:

1. **Tone.** Pixels that are muted (channel spread < 0.3) and far from every palette colour are background
   candidates; the tone whose colour segment `[c0, c1]` lies closest to them (capped mean squared distance) wins.
2. **Background estimate.** Pixels within 0.15 of that segment are background; a normalised Gaussian convolution of
   them fills the whole image (a smooth estimate of the background under the objects).
3. **Colour per cell.** Pixels within 0.3 of a palette colour vote for it; a cell whose best colour has too few
   votes is empty. The background's muted tones are >= 0.5 from every palette colour, so they never vote.
4. **Shape and size per cell.** Each pixel's coverage by the cell's colour is its projection on the line from the
   local background estimate to the colour (exact for anti-aliased and blurred edges, which are linear blends); the
   coverage map is matched (least squares) against the renderer's templates of every shape x size, sharp and
   blurred, and against "empty".

`analyze` also returns the background estimate and object mask, for editors that repaint the image and for CC.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from .render import cell_windows, grow_mask, templates, to_array, window_size
from .world import CELLS, COLOR_NAMES, COLORS, SHAPES, SIZES, TONE_NAMES, TONES, Obj, Scene

PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (6, 3)
VOTE_DISTANCE = 0.3      # a pixel this close to a palette colour votes for it
BACKGROUND_DISTANCE = 0.15  # a pixel this close to the tone's segment is background
MIN_VOTES_AT_64 = 6      # fewer votes than this (scaled by area) means an empty cell
TONE_COST_CAP = 0.12     # distances above this (edges, stray pixels) count as this when choosing the tone
TEMPLATE_BLURS_AT_64 = (0.0, 0.7, 1.2)  # Gaussian sigmas (pixels at 64x64) of the template variants


@dataclass
class ParseResult:
    """Everything the parser recovers from one image.

    Args:
        scene (`Scene`): the objects and the tone (`background=-1`: the texture seed is not recoverable).
        background (`np.ndarray`): `(S, S, 3)` float background estimate: the image where no object is, a smooth
            fill from the surrounding background under objects.
        mask (`np.ndarray`): `(S, S)` bool, pixels covered by a parsed object (dilated by one pixel).
        alpha (`np.ndarray`): `(S, S)` texture field in [0, 1] under the parsed tone (meaningful where `mask` is
            False).
    """

    scene: Scene
    background: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray


def _gauss_matrix(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64)
    g = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma**2))
    return g.astype(np.float32)


def _blur2d(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable blur of `(B, H, W, C)` with an `(H, H)` matrix along both axes."""
    b, h, w, c = x.shape
    y = np.matmul(g, x.reshape(b, h, w * c)).reshape(b, h, w, c)  # rows
    y = np.matmul(g, y.transpose(0, 2, 1, 3).reshape(b, w, h * c)).reshape(b, w, h, c)  # cols
    return y.transpose(0, 2, 1, 3)


@lru_cache(maxsize=16)
def _matching_bank(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Templates for matching: `(9, K, W, W)` bank, its squared norms `(9, K)`, and `(K, 2)` (shape, size) index."""
    base = templates(size)  # (9, n_shapes, n_sizes, W, W)
    w = window_size(size)
    variants, index = [], []
    for sigma in TEMPLATE_BLURS_AT_64:
        sigma = sigma * size / 64
        if sigma > 0:
            g = _gauss_matrix(w, sigma)
            g /= g.sum(axis=1, keepdims=True)
            bank = np.einsum("ij,nabjk,lk->nabil", g, base, g)
        else:
            bank = base
        variants.append(bank.reshape(len(CELLS), -1, w, w))
        index += [(i, j) for i in range(len(SHAPES)) for j in range(len(SIZES))]
    bank = np.concatenate(variants, axis=1).astype(np.float32)  # (9, K, W, W)
    return bank, (bank**2).sum(axis=(2, 3)), np.array(index)


def _segment_distance(x: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Squared distance of colours `(..., 3)` to the segment `[c0, c1]`."""
    d = c1 - c0
    t = np.clip(((x - c0) @ d) / float(d @ d), 0.0, 1.0)
    r = x - c0 - t[..., None] * d
    return (r * r).sum(-1)


def _as_batch(images) -> np.ndarray:
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [to_array(im) if isinstance(im, Image.Image) else np.asarray(im, dtype=np.float32) for im in images]
    batch = np.stack(arrays)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"Expected square RGB images, got an array of shape {batch.shape}.")
    return batch


def analyze_batch(images: Sequence[Image.Image] | np.ndarray, backgrounds=None) -> list[ParseResult]:
    """Parse many images at once (same size). See the module docstring for the method.

    Args:
        images: PIL RGB images, or a float array `(B, S, S, 3)` in [0, 1].
        backgrounds (*optional*): the known backgrounds of the images (same forms), used instead of the estimate.
    """
    x = _as_batch(images)  # (B, S, S, 3)
    b, size = x.shape[0], x.shape[1]
    w = window_size(size)
    flat = x.reshape(b, -1, 3)  # (B, N, 3)

    # 1. Tone: capped mean distance of muted, non-palette pixels (every 4th pixel) to each tone's segment.
    pal_d2 = (flat**2).sum(-1, keepdims=True) - 2 * flat @ PALETTE.T + (PALETTE**2).sum(-1)  # (B, N, 6) squared
    sample = flat[:, ::4]
    spread = sample.max(-1) - sample.min(-1)
    candidate = (spread < 0.3) & (pal_d2[:, ::4].min(-1) > VOTE_DISTANCE**2)  # (B, n)
    candidate |= ~candidate.any(axis=1, keepdims=True)  # no muted pixel at all: use every pixel
    weight = candidate / candidate.sum(1, keepdims=True)
    tone_cost = np.stack([(np.minimum(_segment_distance(sample, *(np.asarray(c, np.float32) for c in TONES[name])),
                                      TONE_COST_CAP**2) * weight).sum(1) for name in TONE_NAMES], axis=1)  # (B, 5)
    tone_idx = tone_cost.argmin(1)  # (B,)

    # 2. Background estimate by normalised convolution of background pixels.
    c0 = np.array([TONES[TONE_NAMES[i]][0] for i in tone_idx], np.float32)[:, None]  # (B, 1, 3)
    c1 = np.array([TONES[TONE_NAMES[i]][1] for i in tone_idx], np.float32)[:, None]
    seg = c1 - c0
    t = np.clip(np.einsum("bnc,bmc->bn", flat - c0, seg) / (seg**2).sum(-1), 0, 1)  # (B, N)
    resid = flat - (c0 + t[..., None] * seg)
    is_bg = ((resid * resid).sum(-1) < BACKGROUND_DISTANCE**2).reshape(b, size, size, 1).astype(np.float32)
    if backgrounds is None:
        g = _gauss_matrix(size, 3.0 * size / 64)
        smooth = _blur2d(x * is_bg, g) / np.maximum(_blur2d(is_bg, g), 1e-6)  # (B, S, S, 3)
    else:
        smooth = _as_batch(backgrounds)
        if smooth.shape != x.shape:
            raise ValueError(f"`backgrounds` has shape {smooth.shape}; pass one background per image, {x.shape}.")

    # 3. Colour votes per cell window.
    votes_px = (pal_d2 < VOTE_DISTANCE**2) & (pal_d2.argmin(-1)[..., None] == np.arange(len(PALETTE)))  # (B, N, 6)
    votes_px = votes_px.reshape(b, size, size, len(PALETTE))
    windows = cell_windows(size)
    ys = np.array([windows[c][0] for c in CELLS])
    xs = np.array([windows[c][1] for c in CELLS])
    iy = ys[:, None, None] + np.arange(w)[None, :, None]  # (9, W, 1)
    ix = xs[:, None, None] + np.arange(w)[None, None, :]  # (9, 1, W)
    win_votes = votes_px[:, iy, ix].sum(axis=(2, 3))  # (B, 9, 6)
    color_idx = win_votes.argmax(-1)  # (B, 9)
    min_votes = MIN_VOTES_AT_64 * (size / 64) ** 2
    has_votes = win_votes.max(-1) >= min_votes

    # 4. Coverage of the chosen colour, matched against the templates.
    px = x[:, iy, ix]  # (B, 9, W, W, 3)
    bgw = smooth[:, iy, ix]
    col = PALETTE[color_idx][:, :, None, None, :]  # (B, 9, 1, 1, 3)
    diff = col - bgw
    cov = ((px - bgw) * diff).sum(-1) / np.maximum((diff**2).sum(-1), 1e-4)  # (B, 9, W, W)
    cov = np.clip(cov, -0.5, 1.5)
    bank, bank_sq, bank_index = _matching_bank(size)
    cross = np.einsum("bnij,nkij->bnk", cov, bank)  # (B, 9, K)
    cov_sq = (cov**2).sum(axis=(2, 3))  # (B, 9)
    sse = cov_sq[..., None] - 2 * cross + bank_sq[None]
    best = sse.argmin(-1)  # (B, 9)
    present = has_votes & (np.take_along_axis(sse, best[..., None], -1)[..., 0] < cov_sq)

    results = []
    for i in range(b):
        objects = []
        mask = np.zeros((size, size), dtype=bool)
        for k, cell in enumerate(CELLS):
            if not present[i, k]:
                continue
            shape_i, size_i = bank_index[best[i, k]]
            objects.append(Obj(SHAPES[shape_i], COLOR_NAMES[color_idx[i, k]], SIZES[size_i], cell))
            y0, x0 = windows[cell]
            mask[y0:y0 + w, x0:x0 + w] |= templates(size)[k, shape_i, size_i] > 0
        mask = grow_mask(mask, 1)
        background = np.where(mask[..., None], smooth[i], x[i])
        scene = Scene(tuple(objects), -1, TONE_NAMES[tone_idx[i]])
        results.append(ParseResult(scene, background, mask, t[i].reshape(size, size)))
    return results


def fill_holes(values: np.ndarray, known: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Fill the pixels where `known` is False by a normalised Gaussian convolution of the known ones.

    Args:
        values (`np.ndarray`): `(H, W, C)` float values.
        known (`np.ndarray`): `(H, W)` bool, True where `values` is valid.
        sigma (`float`): Gaussian sigma in pixels at 64x64 (scaled with the image size).
    """
    g = _gauss_matrix(values.shape[0], sigma * values.shape[0] / 64)
    k = known[None, ..., None].astype(np.float32)
    num = _blur2d(values[None].astype(np.float32) * k, g)[0]
    den = _blur2d(k, g)[0]
    return np.where(known[..., None], values, num / np.maximum(den, 1e-6))


def analyze(image: Image.Image | np.ndarray) -> ParseResult:
    """Parse one image into scene, background estimate and object mask."""
    return analyze_batch([image])[0]


def parse(image: Image.Image | np.ndarray, background_image=None) -> Scene:
    """The oracle parser: image -> `Scene` (objects and tone; the texture seed is reported as `-1`).

    Args:
        image: a MICE-Shapes image (PIL RGB, or float `(S, S, 3)` in [0, 1]).
        background_image (*optional*): the image's background without objects, if known (else it is estimated).
    """
    backgrounds = None if background_image is None else [background_image]
    return analyze_batch([image], backgrounds)[0].scene


def parse_batch(images, chunk: int = 256) -> list[Scene]:
    """Parse a list of images (in chunks, to bound memory)."""
    images = list(images) if not isinstance(images, np.ndarray) else images
    out: list[Scene] = []
    for start in range(0, len(images), chunk):
        out += [r.scene for r in analyze_batch(images[start:start + chunk])]
    return out

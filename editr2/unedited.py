"""Keep what an edit did not touch: copy the current image's latent wherever the new latent barely differs from it.

Re-sampling the whole latent every turn redraws untouched regions slightly differently each time, and over many turns
the small differences add up (background drift, colour shifts: docs/results.md, "16 turns"). `keep_unedited` compares
the sampled latent with the reference it edited, latent pixel by latent pixel, and puts the reference back wherever the
change is at most `threshold` (RMS over channels, in the normalised latent units the transformer works in); the
changed region, grown by `dilate` latent pixels so that an edit keeps its soft edges, stays as sampled. Carried over
the turns of a session, untouched regions are then the source's latent exactly, however many turns follow.

Latents are packed as diffusers' Qwen-Image pipelines pack them: `(B, (h/2) * (w/2), C * 4)` for a `(B, C, h, w)`
latent, each token holding a 2 x 2 patch with features ordered (channel, row, column).

    latents, mask = keep_unedited(latents, reference, height=16, width=16, threshold=0.3)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _patch_view(packed: Tensor, height: int, width: int) -> Tensor:
    """`(B, N, C * 4)` packed latents as `(B, N, C, 4)` (the last axis: the 2 x 2 latent pixels of a token)."""
    if packed.ndim != 3 or height % 2 or width % 2 or packed.shape[1] != (height // 2) * (width // 2) \
            or packed.shape[2] % 4:
        raise ValueError(f"latents of shape {tuple(packed.shape)} are not packed {height} x {width} latents: expected "
                         f"(B, {(height // 2) * (width // 2)}, C * 4) with an even height and width.")
    return packed.reshape(packed.shape[0], packed.shape[1], packed.shape[2] // 4, 4)


def _to_pixels(per_patch: Tensor, height: int, width: int) -> Tensor:
    """`(B, N, 4)` values per token and patch pixel as a `(B, h, w)` map."""
    b = per_patch.shape[0]
    return per_patch.reshape(b, height // 2, width // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(b, height, width)


def _to_patches(pixels: Tensor) -> Tensor:
    """`(B, h, w)` map as `(B, N, 4)` values per token and patch pixel (the inverse of `_to_pixels`)."""
    b, h, w = pixels.shape
    return pixels.reshape(b, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, (h // 2) * (w // 2), 4)


def change_map(latents: Tensor, reference: Tensor, height: int, width: int) -> Tensor:
    """RMS over channels of `latents - reference` per latent pixel: `(B, h, w)` float32 (packed inputs `(B, N, C*4)`,
    `reference` with batch 1 or B)."""
    diff = _patch_view(latents.float(), height, width) - _patch_view(reference.float(), height, width)  # (B, N, C, 4)
    return _to_pixels(diff.pow(2).mean(dim=2).sqrt(), height, width)  # (B, h, w)


def keep_unedited(latents: Tensor, reference: Tensor, height: int, width: int, threshold: float,
                  dilate: int = 1) -> tuple[Tensor, Tensor]:
    """Copy `reference` into `latents` wherever the edit changed less than `threshold`.

    Args:
        latents (`torch.Tensor`): `(B, N, C * 4)` sampled packed latents.
        reference (`torch.Tensor`): `(1 or B, N, C * 4)` the packed latents the edit started from.
        height, width (`int`): the latent's size in latent pixels (the image's size over the VAE's scale factor).
        threshold (`float`): RMS change per latent pixel (normalised latent units) at or under which the reference
            is kept; 0 keeps only pixels that did not change at all.
        dilate (`int`, defaults to 1): latent pixels the changed region grows by on every side before the copy.

    Returns:
        `(latents, edited)`: the latents with the reference copied outside the edited region, in `latents`' dtype,
        and the edited region `(B, h, w)` (bool; True where the sample is kept).
    """
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold={threshold}: pass a finite change >= 0 (normalised latent units).")
    if dilate < 0:
        raise ValueError(f"dilate={dilate}: pass 0 or more latent pixels.")
    if reference.shape[1:] != latents.shape[1:] or reference.shape[0] not in (1, latents.shape[0]):
        raise ValueError(f"reference of shape {tuple(reference.shape)} does not match latents of shape "
                         f"{tuple(latents.shape)}: the reference must be the same size as the output.")
    edited = change_map(latents, reference, height, width) > threshold  # (B, h, w)
    if dilate:
        edited = F.max_pool2d(edited[:, None].float(), 2 * dilate + 1, stride=1, padding=dilate)[:, 0] > 0
    keep = _to_patches(edited)[:, :, None, :]  # (B, N, 1, 4), broadcast over channels
    out = torch.where(keep, _patch_view(latents, height, width), _patch_view(reference.to(latents.dtype), height,
                                                                            width))
    return out.reshape(latents.shape), edited

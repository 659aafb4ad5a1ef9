"""Batching of per-example text conditioning: prompt embeddings of different lengths padded into one batch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_prompt_embeds(embeds: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad prompt embeddings of different lengths with zeros into one batch, as diffusers pads a batch.

    Args:
        embeds: B tensors `(L_i, D)` or `(1, L_i, D)` (one prompt each).
        masks: optional B masks `(L_i,)` or `(1, L_i)` (None, or a None entry: every token is valid).

    Returns:
        `(embeds (B, L, D), mask (B, L) long)` with `L = max L_i`, in the first tensor's dtype and device.
    """
    if not embeds:
        raise ValueError("pad_prompt_embeds needs at least one prompt embedding.")
    rows = [e[0] if e.ndim == 3 else e for e in embeds]  # (L_i, D)
    if any(r.ndim != 2 or (e.ndim == 3 and e.shape[0] != 1) for r, e in zip(rows, embeds)):
        raise ValueError(f"pass (L, D) or (1, L, D) embeddings, got {[tuple(e.shape) for e in embeds]}.")
    masks = list(masks) if masks is not None else [None] * len(rows)
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])  # (B, L, D)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)  # (B, L)
    for i, (r, m) in enumerate(zip(rows, masks)):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1 if m is None else m.reshape(-1).long()
    return out, mask

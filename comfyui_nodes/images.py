"""Conversions between ComfyUI IMAGE tensors (`(B, H, W, C)` float in 0..1) and PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(image: torch.Tensor, *, node: str) -> Image.Image:
    """Converts a ComfyUI IMAGE holding exactly one image into an RGB PIL image.

    Args:
        image: `(1, H, W, C)` float tensor in 0..1 with C in {1, 3, 4}; alpha is dropped.
        node: the node's display name, used in error messages.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: expected an IMAGE of shape [batch, height, width, channels], got {shape}")
    batch, height, width, channels = image.shape
    if batch != 1:
        raise ValueError(
            f"{node} takes one image but got a batch of {batch}; pick one with the 'Image From Batch' node "
            "(batch_index, length 1), or run one session per image"
        )
    if channels not in (1, 3, 4):
        raise ValueError(f"{node}: expected 1, 3 or 4 channels, got {channels}")
    array = (image[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (H, W, C)
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")


def pil_to_tensor(images: Image.Image | list[Image.Image]) -> torch.Tensor:
    """Converts one PIL image or a list of same-size PIL images into a ComfyUI IMAGE `(B, H, W, 3)`."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"cannot stack images of different sizes {sorted(sizes)} into one IMAGE batch")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]  # each (H, W, 3)
    return torch.from_numpy(np.stack(arrays))  # (B, H, W, 3)

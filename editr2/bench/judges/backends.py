"""What the judges need from models: a detector, a feature extractor and a VLM, as three small protocols.

Implementations: `local.py` (transformers models from a path), `http.py` (an OpenAI-compatible chat-completions
server, e.g. vLLM), `testing.py` (scripted stand-ins for tests). Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected box. `box` is normalised ``(x0, y0, x1, y1)``; `label` is the phrase it was found for."""

    label: str
    score: float
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@runtime_checkable
class Detector(Protocol):
    """Open-vocabulary detection: boxes for one phrase, best first."""

    def detect(self, image: Image.Image, phrase: str, *, threshold: float | None = None) -> list[Detection]: ...


@runtime_checkable
class FeatureExtractor(Protocol):
    """DINO-style token features.

    ``features(images)`` returns ``(tokens, num_prefix, grid)``: tokens ``(B, num_prefix + Hp * Wp, D)`` with the CLS
    token first (then any register tokens), and the patch grid ``(Hp, Wp)``. Images are resized to one size.
    """

    def features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, int, tuple[int, int]]: ...


@runtime_checkable
class VLM(Protocol):
    """A vision-language model answering one prompt about an ordered list of images."""

    max_concurrency: int

    def ask(self, images: Sequence[Image.Image], prompt: str, *, temperature: float = 0.0,
            max_tokens: int | None = None) -> str: ...


# ---------------------------------------------------------------------------------------------------------------------
# Box geometry
# ---------------------------------------------------------------------------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def count_distinct(detections: Sequence[Detection], iou_threshold: float = 0.8) -> int:
    """Number of boxes left after dropping any box that overlaps a better-scored kept one by more than the threshold."""
    kept: list[Box] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if all(iou(det.box, other) <= iou_threshold for other in kept):
            kept.append(det.box)
    return len(kept)


def to_pixels(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Normalised box -> integer pixel box inside an image of ``size = (width, height)``, at least 1 pixel wide."""
    width, height = size
    x0 = min(max(int(box[0] * width), 0), width - 1)
    y0 = min(max(int(box[1] * height), 0), height - 1)
    x1 = min(max(int(round(box[2] * width)), x0 + 1), width)
    y1 = min(max(int(round(box[3] * height)), y0 + 1), height)
    return x0, y0, x1, y1


def normalise_box(box: Sequence[float], size: tuple[int, int]) -> Box:
    """Pixel ``(x0, y0, x1, y1)`` -> normalised and clipped to [0, 1]."""
    width, height = size
    x0, y0, x1, y1 = (float(v) for v in box)
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return clip(x0 / width), clip(y0 / height), clip(x1 / width), clip(y1 / height)

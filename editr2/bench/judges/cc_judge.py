"""CC (content consistency): do the unchanged objects and the background still match the ORIGINAL image?

As in the paper's EdiVal-CC: the unchanged objects of turn t are located in the original image by the detector; the
same boxes are cropped from the original and from turn t's output and compared with DINO-style features as
``alpha * cos(CLS) + (1 - alpha) * cos(mean patch)`` (alpha = 0.5), averaged over boxes. When the turn requires a
consistent background, the boxes of every object (found in either image) are masked out and the remaining patch
tokens are compared (cosine of the masked mean of L2-normalised patch tokens). CC is the mean of the two terms, or
the object term alone when the background may change. CC is deterministic: no votes.

Without a detector the object term is skipped and the background term compares the whole images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backends import Detection, Detector, FeatureExtractor, to_pixels
from .protocol import JudgeBase, Judgement, RetryPolicy, TurnRequest, call_with_retries, judge_with_retries


@dataclass
class CCConfig:
    """CC judge settings.

    Attributes:
        alpha: weight of the CLS cosine; the mean-patch cosine gets ``1 - alpha``.
        detection_threshold: detector threshold for locating objects (the paper uses 0.35).
        crop_size: object crops are resized to this square size before feature extraction.
        background_keep: a patch counts as background when at least this fraction of its pixels is unmasked.
        batch_pairs: object crop pairs per feature-model call.
    """

    alpha: float = 0.5
    detection_threshold: float | None = 0.35
    crop_size: int = 224
    background_keep: float = 0.5
    batch_pairs: int = 16

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 < self.background_keep <= 1.0:
            raise ValueError("need 0 <= alpha <= 1 and 0 < background_keep <= 1")
        if self.crop_size < 1 or self.batch_pairs < 1:
            raise ValueError("crop_size and batch_pairs must be >= 1")


def pair_similarity(tokens: torch.Tensor, num_prefix: int, alpha: float = 0.5) -> float:
    """``alpha * cos(CLS_0, CLS_1) + (1 - alpha) * cos(mean patch_0, mean patch_1)`` for tokens ``(2, P + N, D)``."""
    cls = F.cosine_similarity(tokens[0, 0], tokens[1, 0], dim=0)
    patches = tokens[:, num_prefix:].mean(dim=1)  # (2, D)
    mean_patch = F.cosine_similarity(patches[0], patches[1], dim=0)
    return float(alpha * cls + (1 - alpha) * mean_patch)


def masked_patch_similarity(tokens: torch.Tensor, num_prefix: int, keep: torch.Tensor) -> float | None:
    """Cosine between the masked means of L2-normalised patch tokens of two images.

    Args:
        tokens: ``(2, P + Hp * Wp, D)``.
        num_prefix: CLS (+ register) tokens before the patches.
        keep: ``(Hp * Wp,)`` bool, True for background patches.

    Returns:
        The cosine, or None when no patch is kept.
    """
    if not bool(keep.any()):
        return None
    patches = F.normalize(tokens[:, num_prefix:], dim=-1)[:, keep]  # (2, K, D)
    pooled = patches.mean(dim=1)  # (2, D)
    return float(F.cosine_similarity(pooled[0], pooled[1], dim=0))


def background_mask(size: tuple[int, int], boxes: list[Detection]) -> np.ndarray:
    """``(H, W)`` float mask: 1 on background, 0 inside any box."""
    width, height = size
    mask = np.ones((height, width), dtype=np.float32)
    for det in boxes:
        x0, y0, x1, y1 = to_pixels(det.box, size)
        mask[y0:y1, x0:x1] = 0.0
    return mask


def patch_keep(mask: np.ndarray, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """Fraction of background pixels per patch (area pooling onto the patch grid) >= threshold -> ``(Hp * Wp,)``."""
    pooled = F.interpolate(torch.from_numpy(mask)[None, None], size=grid, mode="area")  # (1, 1, Hp, Wp)
    return (pooled.flatten() >= threshold - 1e-6)


class CCJudge(JudgeBase):
    """Content consistency against the original image.

    Args:
        features: DINO-style feature extractor (required).
        detector: open-vocabulary detector, or None (then the object term is skipped).
        config: `CCConfig`.
        retry: retry policy for back-end calls.
    """

    name = "CC"

    def __init__(self, features: FeatureExtractor, detector: Detector | None = None, config: CCConfig | None = None,
                 retry: RetryPolicy | None = None):
        self.features, self.detector = features, detector
        self.config = config or CCConfig()
        self.retry = retry or RetryPolicy()

    def judge(self, request: TurnRequest) -> Judgement:
        return judge_with_retries(lambda: self._judge(request), RetryPolicy(1))

    def _detect(self, image: Image.Image, phrase: str) -> list[Detection]:
        threshold = self.config.detection_threshold
        return call_with_retries(lambda: self.detector.detect(image, phrase, threshold=threshold), self.retry)

    def _features(self, images: list[Image.Image]):
        return call_with_retries(lambda: self.features.features(images), self.retry)

    def _judge(self, r: TurnRequest) -> Judgement:
        source = r.source_image.convert("RGB")
        output = r.output_image.convert("RGB")
        if output.size != source.size:
            output = output.resize(source.size, Image.BICUBIC)

        terms, notes = [], []
        object_term, note = self._object_term(source, output, r.unchanged_objects)
        notes.append(note)
        if object_term is not None:
            terms.append(object_term)
        if r.bg_consistency:
            bg_term, note = self._background_term(source, output, r.all_objects)
            notes.append(note)
            if bg_term is not None:
                terms.append(bg_term)
        reason = "; ".join(notes)
        if not terms:
            return Judgement.skipped(f"nothing to compare: {reason}")
        return Judgement(sum(terms) / len(terms), "ok", reason)

    def _object_term(self, source, output, objects) -> tuple[float | None, str]:
        if not objects:
            return None, "no unchanged objects at this turn"
        if self.detector is None:
            return None, "object term skipped (no detector configured)"
        size = (self.config.crop_size, self.config.crop_size)
        boxes = [to_pixels(det.box, source.size) for obj in objects for det in self._detect(source, obj)]
        sims = []
        for start in range(0, len(boxes), self.config.batch_pairs):  # crops share one size: batch them
            chunk = boxes[start:start + self.config.batch_pairs]
            crops = [image.crop(box).resize(size, Image.BICUBIC) for box in chunk for image in (source, output)]
            tokens, num_prefix, _ = self._features(crops)  # (2 * pairs, P + N, D): source, output, source, ...
            for pair in tokens.view(len(chunk), 2, *tokens.shape[1:]):
                sims.append(pair_similarity(pair, num_prefix, self.config.alpha))
        if not sims:
            return None, f"none of {len(objects)} unchanged object(s) located in the original"
        return sum(sims) / len(sims), f"objects {sum(sims) / len(sims):.3f} over {len(sims)} box(es)"

    def _background_term(self, source, output, objects) -> tuple[float | None, str]:
        boxes: list[Detection] = []
        if self.detector is not None:
            for obj in objects:
                boxes += self._detect(source, obj) + self._detect(output, obj)
        tokens, num_prefix, grid = self._features([source, output])
        keep = patch_keep(background_mask(source.size, boxes), grid, self.config.background_keep)
        sim = masked_patch_similarity(tokens, num_prefix, keep)
        if sim is None:
            return None, f"background fully covered by {len(boxes)} object box(es)"
        return sim, f"background {sim:.3f} over {int(keep.sum())}/{keep.numel()} patches"

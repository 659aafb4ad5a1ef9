"""A Qwen2-VL processor for batches of image *tensors*, in torch on any device.

Training the editor with batched text encoding builds, per example, the text encoder's inputs of
`encode_prompt(text, [condition image])`: the reference downsized to the condition view (`VaeImageProcessor.resize`,
PIL Lanczos), then the Qwen2-VL processor (rescale, normalise, patchify; `<|image_pad|>` expanded to one token per
merged patch; tokenize; pad). Done per example with PIL and numpy in data workers, that is ~0.65 ms per example on one
core (`benchmarks/data_rate.py`). [`TensorPromptProcessor`] does the same for a whole batch of `(B, 3, H, W)` uint8
images in a few torch ops on the images' device:

- `pil_resize`: PIL's two-pass resampling (horizontal, then vertical) with PIL's own filter coefficients in its 22-bit
  fixed point, as float64 matrix products of integers (exact below 2**53): the uint8 pixels `PIL.Image.resize` gives, exactly.
- `patchify`: `Qwen2VLImageProcessorPil`'s rescale, normalise and `(grid_h * grid_w, C * T * p * p)` patch layout,
  in float32 (equal to the processor's up to float rounding).
- the token ids: the prompt template's ids around each image are tokenized once and cached; only the texts are
  tokenized per batch (one fast-tokenizer call). Every text sits between two special tokens, where BPE cannot merge
  across, so the ids equal those of tokenizing the whole prompt.

Used by `recipes/shapes_tiny/train_editor.py` (`render: torch` with `batch_text_encoding`); tested against the PIL
processor in `tests/test_tensor_processor.py`. Duck-typed: it reads the processor's `image_processor` fields and
`tokenizer`, and imports nothing from transformers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # PIL's fixed point for 8-bit resampling (libImaging/Resample.c)

_FILTERS = {  # PIL resample id -> (support, filter)
    1: (3.0, lambda x: _lanczos(x)),  # LANCZOS (defined below)
    2: (1.0, lambda x: max(0.0, 1.0 - abs(x))),  # BILINEAR
    3: (2.0, lambda x: _bicubic(x)),  # BICUBIC (defined below)
}


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def pil_coefficients(in_size: int, out_size: int, resample: int) -> torch.Tensor:
    """PIL's resampling of one axis (`precompute_coeffs` + `normalize_coeffs_8bpc`) as a `(in_size, out_size)`
    float64 matrix of integer weights in PIL's fixed point (`2**PRECISION_BITS` = 1): column j holds output j's taps."""
    if resample not in _FILTERS:
        raise ValueError(f"resample={resample}: supported are {sorted(_FILTERS)} (PIL LANCZOS, BILINEAR, BICUBIC).")
    support, kernel = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    matrix = torch.zeros(in_size, out_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [kernel((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
        total = sum(w)
        for x, value in enumerate(w):
            value = value / total if total != 0.0 else value
            matrix[xmin + x, xx] = int(value * (1 << PRECISION_BITS) + (0.5 if value >= 0 else -0.5))
    return matrix


def _resample_last_axis(pixels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """One PIL pass along the last axis: `(..., N)` float64 integers in [0, 255] -> `(..., M)`, rounded and clipped
    to [0, 255] as PIL's `clip8`. Exact: every sum is an integer below 2**53."""
    acc = pixels @ matrix.to(pixels.device) + (1 << (PRECISION_BITS - 1))
    return torch.clamp(torch.floor(acc / (1 << PRECISION_BITS)), 0, 255)


def pil_resize(images: torch.Tensor, height: int, width: int, resample: int = 1) -> torch.Tensor:
    """`PIL.Image.resize((width, height), resample)` of a batch of RGB images, exactly (horizontal pass first, each
    pass rounded to uint8 as PIL does): `(B, C, H, W)` uint8 -> `(B, C, height, width)` uint8, on the images' device.
    `resample`: 1 LANCZOS (`VaeImageProcessor`'s default), 2 BILINEAR, 3 BICUBIC."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"pil_resize takes (B, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}.")
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (height, width):
        return images.clone()  # PIL returns a copy
    out = images.to(torch.float64)
    if in_w != width:
        out = _resample_last_axis(out, pil_coefficients(in_w, width, resample))
    if in_h != height:
        out = _resample_last_axis(out.transpose(-1, -2), pil_coefficients(in_h, height, resample)).transpose(-1, -2)
    return out.to(torch.uint8)


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """`Qwen2VLImageProcessorPil.patchify` of a batch: normalised `(B, C, H, W)` float32 -> `(B * gh * gw,
    C * T * p * p)`, each image's rows in the processor's merge order, its one frame repeated T times."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    patches = pixels.reshape(b, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
    patches = patches.unsqueeze(6).expand(*patches.shape[:6], temporal_patch_size, patch_size, patch_size)
    return patches.reshape(b * gh * gw, c * temporal_patch_size * patch_size * patch_size)


class TensorPromptProcessor:
    """`processor(text=[template.format(image_prompt + text)], images=[condition_image(image)], padding=True)` for
    a batch of one-image prompts, from uint8 image tensors, in torch.

    Args:
        processor: a Qwen2-VL processor (`image_processor` with `patch_size`, `merge_size`, `temporal_patch_size`,
            `image_mean`, `image_std`, `rescale_factor`, `size` in pixels; `tokenizer` with right padding).
        template (`str`): the prompt template with one `{}` (the pipeline's `prompt_template_encode`).
        image_prompt (`str`): what precedes the text inside the template, with one `<|image_pad|>` (diffusers'
            `"Picture 1: <|vision_start|><|image_pad|><|vision_end|>"`).
        condition_size (`tuple[int, int]`): the condition view's `(height, width)`.
        resample (`int`): the condition view's PIL filter (`VaeImageProcessor`'s default, 1 = LANCZOS).
    """

    def __init__(self, processor, template: str, image_prompt: str, condition_size: tuple[int, int],
                 resample: int = 1):
        ip, tok = processor.image_processor, processor.tokenizer
        self.patch_size, self.merge_size = ip.patch_size, ip.merge_size
        self.temporal_patch_size = ip.temporal_patch_size
        self.height, self.width = condition_size
        factor = self.patch_size * self.merge_size
        if self.height % factor or self.width % factor:
            raise ValueError(f"condition size {condition_size} is not a multiple of patch_size * merge_size = "
                             f"{factor}: the processor would resize it again; use the PIL processor.")
        area = self.height * self.width
        lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]  # min / max pixels (Qwen2-VL's naming)
        if not lo <= area <= hi:
            raise ValueError(f"condition area {area} is outside the processor's [{lo}, {hi}] pixels.")
        if getattr(tok, "padding_side", "right") != "right":
            raise ValueError("TensorPromptProcessor pads on the right, as the editor's text encoding expects.")
        self.resample = resample
        self.rescale = float(ip.rescale_factor)
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.tokenizer = tok
        self.pad_id = tok.pad_token_id
        self.image_token_id = getattr(processor, "image_token_id", None) or tok.convert_tokens_to_ids("<|image_pad|>")
        self.num_image_tokens = (self.height // self.patch_size) * (self.width // self.patch_size) // self.merge_size**2
        prefix, suffix = template.split("{}")
        before, after = (prefix + image_prompt).split(processor.image_token if hasattr(processor, "image_token")
                                                      else "<|image_pad|>")
        self.before = tok(before, add_special_tokens=False)["input_ids"]
        self.after = tok(after, add_special_tokens=False)["input_ids"]
        self.suffix = tok(suffix, add_special_tokens=False)["input_ids"]
        for name, ids, end in (("image prompt", self.after, -1), ("template's end", self.suffix, 0)):
            if not ids or ids[end] not in tok.all_special_ids:
                raise ValueError(f"the {name} does not meet the text at a special token: tokenizing the text alone "
                                 "would not give the whole prompt's ids; use the PIL processor.")

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` uint8 -> the processor's `pixel_values` `(B * gh * gw, 3 * T * p * p)` float32."""
        if images.ndim != 4 or images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"pixel_values takes (B, {self.mean.shape[1]}, H, W) RGB images, got "
                             f"{tuple(images.shape)}.")
        view = pil_resize(images, self.height, self.width, self.resample).float()
        view = (view * self.rescale - self.mean.to(view.device)) / self.std.to(view.device)
        return patchify(view, self.patch_size, self.merge_size, self.temporal_patch_size)

    def input_ids(self, texts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` `(B, L)` int64 of the texts' prompts, right-padded to the longest."""
        texts_ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        head = self.before + [self.image_token_id] * self.num_image_tokens + self.after
        rows = [head + ids + self.suffix for ids in texts_ids]
        lengths = np.array([len(r) for r in rows])
        valid = np.arange(lengths.max()) < lengths[:, None]  # (B, L)
        ids = np.full(valid.shape, self.pad_id, dtype=np.int64)
        ids[valid] = np.concatenate(rows)  # row-major: each row's tokens in order
        return torch.from_numpy(ids).to(device), torch.from_numpy(valid.astype(np.int64)).to(device)

    def __call__(self, texts: Sequence[str], images: torch.Tensor) -> dict:
        """The processor's batch for `texts` and one image each: `input_ids`, `attention_mask`, `mm_token_type_ids`
        (1 on image tokens), `pixel_values`, `image_grid_thw`, on the images' device."""
        if images.ndim != 4 or images.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts need (B={len(texts)}, 3, H, W) images, got {tuple(images.shape)}.")
        return self.batch(*self.input_ids(texts, images.device), images)

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor) -> dict:
        """`__call__` from already tokenized prompts (`input_ids`, e.g. made in data workers) and their images."""
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int64),
                "pixel_values": self.pixel_values(images),
                "image_grid_thw": self.image_grid_thw(len(input_ids), images.device)}

    def image_grid_thw(self, batch_size: int, device=None) -> torch.Tensor:
        """`(B, 3)` int64: one frame of `(H / p) x (W / p)` patches per image."""
        grid = torch.tensor([1, self.height // self.patch_size, self.width // self.patch_size], dtype=torch.int64)
        return grid.expand(batch_size, 3).clone().to(device)

"""Local judge back-ends: transformers models loaded from a folder (any size; tests use tiny random ones).

- `TransformersDetector`: an open-vocabulary detector (GroundingDINO: ``AutoModelForZeroShotObjectDetection``).
- `TransformersFeatures`: DINO-style features (DINOv2 / DINOv3 through ``AutoModel``).
- `TransformersVLM`: a VLM answering questions about images (Qwen2.5-VL through ``AutoModelForImageTextToText``).

transformers is imported inside the constructors, so the core package stays free of it. Every call holds a lock: one
model runs one request at a time (``max_concurrency = 1``), which is right for a single GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from ...image_only_processor import ImageOnlyProcessorMixin
from .backends import Detection, normalise_box
from .protocol import JudgeError


def _torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def _load_model(model_class, config: LocalModelConfig):
    """`model_class.from_pretrained(config.path)` in the configured dtype, on the configured device, in eval mode."""
    model = model_class.from_pretrained(config.path, dtype=_torch_dtype(config.dtype))
    return model.to(config.device).eval()


@dataclass
class LocalModelConfig:
    """A transformers model folder.

    Attributes:
        path: local folder with config.json, weights (safetensors) and processor files.
        device: "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "float16" or "bfloat16".
    """

    path: str = ""
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        if not self.path:
            raise ValueError("a local model needs `path`: the folder holding its config.json and weights")
        _torch_dtype(self.dtype)


@dataclass
class LocalDetectorConfig(LocalModelConfig):
    """GroundingDINO-style detector.

    Attributes:
        box_threshold: minimum box confidence (the paper uses 0.25-0.4 depending on the check).
        text_threshold: minimum phrase-token confidence.
    """

    box_threshold: float = 0.35
    text_threshold: float = 0.25


@dataclass
class LocalVLMConfig(LocalModelConfig):
    """A transformers VLM.

    Attributes:
        max_new_tokens: default answer length.
        generate_kwargs: extra keyword arguments for ``model.generate``.
    """

    max_new_tokens: int = 256
    generate_kwargs: dict = field(default_factory=dict)


class TransformersDetector:
    """Open-vocabulary detection with ``AutoModelForZeroShotObjectDetection`` (GroundingDINO)."""

    def __init__(self, config: LocalDetectorConfig):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.config = config
        self.processor = AutoProcessor.from_pretrained(config.path)
        self.model = _load_model(AutoModelForZeroShotObjectDetection, config)
        self._lock = threading.Lock()

    @torch.no_grad()
    def detect(self, image: Image.Image, phrase: str, *, threshold: float | None = None) -> list[Detection]:
        """Boxes for `phrase` in `image`, best first (normalised coordinates)."""
        phrase = phrase.strip().lower()
        if not phrase:
            return []
        threshold = self.config.box_threshold if threshold is None else threshold
        image = image.convert("RGB")
        with self._lock:
            inputs = self.processor(images=image, text=f"{phrase} .", return_tensors="pt").to(self.config.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            outputs = self.model(**inputs)
            result = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=threshold,
                text_threshold=self.config.text_threshold,
                target_sizes=[(image.height, image.width)],
            )[0]
        detections = [
            Detection(phrase, float(score), normalise_box(box.tolist(), image.size))
            for score, box in zip(result["scores"], result["boxes"])
        ]
        return sorted(detections, key=lambda d: -d.score)


class TransformersFeatures:
    """DINO-style features with ``AutoModel`` + ``AutoImageProcessor`` (DINOv2, DINOv2-with-registers, DINOv3)."""

    def __init__(self, config: LocalModelConfig):
        from transformers import AutoImageProcessor, AutoModel

        self.config = config
        self.processor = AutoImageProcessor.from_pretrained(config.path)
        self.model = _load_model(AutoModel, config)
        model_config = self.model.config
        self.patch_size = int(getattr(model_config, "patch_size", 14))
        self.num_prefix = 1 + int(getattr(model_config, "num_register_tokens", 0) or 0)
        # See the whole image: with no centre crop the patch grid maps onto the image by a plain resize, so a
        # pixel mask pools exactly onto patches.
        self._processor_kwargs = {"do_center_crop": False} if getattr(self.processor, "do_center_crop", None) else {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, int, tuple[int, int]]:
        with self._lock:
            rgb = [im.convert("RGB") for im in images]
            inputs = self.processor(images=rgb, return_tensors="pt", **self._processor_kwargs)
            pixel_values = inputs["pixel_values"].to(self.config.device, self.model.dtype)  # (B, 3, H, W)
            tokens = self.model(pixel_values=pixel_values).last_hidden_state.float()  # (B, prefix + Hp*Wp, D)
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        if tokens.shape[1] != self.num_prefix + grid[0] * grid[1]:
            raise JudgeError(
                f"feature model returned {tokens.shape[1]} tokens; expected {self.num_prefix} prefix + "
                f"{grid[0]}x{grid[1]} patches for a {tuple(pixel_values.shape[-2:])} input"
            )
        return tokens.cpu(), self.num_prefix, grid


class TransformersVLM:
    """A VLM (Qwen2.5-VL and other ``AutoModelForImageTextToText`` models) answering one prompt about images."""

    max_concurrency = 1

    def __init__(self, config: LocalVLMConfig):
        from transformers import AutoModelForImageTextToText

        self.config = config
        self.model = _load_model(AutoModelForImageTextToText, config)
        self.processor = load_vlm_processor(config.path, self.model.config.model_type)
        self._lock = threading.Lock()

    @torch.no_grad()
    def ask(self, images: Sequence[Image.Image], prompt: str, *, temperature: float = 0.0,
            max_tokens: int | None = None) -> str:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rgb = [im.convert("RGB") for im in images]
        kwargs = dict(self.config.generate_kwargs)
        kwargs["max_new_tokens"] = max_tokens or self.config.max_new_tokens
        kwargs["do_sample"] = temperature > 0
        if temperature > 0:
            kwargs["temperature"] = temperature
        with self._lock:
            inputs = self.processor(text=[text], images=rgb or None, return_tensors="pt").to(self.config.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            output = self.model.generate(**inputs, **kwargs)  # (1, prompt + new)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


# ---------------------------------------------------------------------------------------------------------------------
# Processor loading (with an image-only fallback for Qwen-VL folders where the video processor cannot load)
# ---------------------------------------------------------------------------------------------------------------------

_QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_image_only_class = None


def image_only_qwen_vl_processor_class():
    """A Qwen2.5-VL processor with no video processor (which needs torchvision); images and text work as usual."""
    global _image_only_class
    if _image_only_class is None:
        from transformers import Qwen2_5_VLProcessor

        class ImageOnlyQwenVLProcessor(ImageOnlyProcessorMixin, Qwen2_5_VLProcessor):
            pass

        _image_only_class = ImageOnlyQwenVLProcessor
    return _image_only_class


def load_vlm_processor(path: str, model_type: str):
    """``AutoProcessor.from_pretrained(path)``; for Qwen-VL folders whose processor cannot load (no torchvision for
    the video processor), an image-only processor built from the same tokenizer and image-processor files."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - fall back below, or re-raise with the reason
        if model_type not in _QWEN_VL_TYPES:
            raise ValueError(f"cannot load the processor of {path}: {err}") from err
    processor = image_only_qwen_vl_processor_class().from_pretrained(path)
    if processor.chat_template is None:
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    if processor.chat_template is None:
        raise ValueError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")
    return processor

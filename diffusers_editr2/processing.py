"""An image-only Qwen2-VL processor.

diffusers' Qwen-Image-Edit pipelines only ever pass *images* and text to their `processor`. transformers'
`Qwen2VLProcessor` / `Qwen2_5_VLProcessor` also own a video processor, and every video processor imports
`torchvision`, which is not always installable (it is not here). [`Qwen2VLImageOnlyProcessor`] is the same processor
without the video part: it tokenizes text, expands `<|image_pad|>` to one token per merged vision patch and returns
`pixel_values` + `image_grid_thw` exactly as `Qwen2VLProcessor` does for images, using the PIL/numpy image processor.
The video-free part is `editr2.image_only_processor.ImageOnlyProcessorMixin` (shared with the local VLM judge).

It saves and loads with `save_pretrained` / `from_pretrained` like any processor, and a pipeline that registers it
records `["diffusers_editr2.processing", "Qwen2VLImageOnlyProcessor"]` in its `model_index.json`.
"""

from __future__ import annotations

from transformers import ProcessorMixin  # noqa: F401  (diffusers finds the loading base class in this namespace)
from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from editr2.image_only_processor import ImageOnlyProcessorMixin

__all__ = ["Qwen2VLImageOnlyProcessor", "Qwen2VLImageProcessorPil"]


class Qwen2VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen2VLProcessor):
    r"""A [`~transformers.Qwen2VLProcessor`] for images and text only (no video processor, no torchvision).

    Args:
        image_processor ([`~transformers.Qwen2VLImageProcessorPil`]):
            The PIL/numpy image processor (resizes to a multiple of `patch_size * merge_size`, normalises, patchifies).
        tokenizer ([`~transformers.Qwen2Tokenizer`]):
            A tokenizer that knows `<|image_pad|>` (and `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`).
        chat_template (`str`, *optional*):
            A Jinja chat template for `apply_chat_template`.
    """

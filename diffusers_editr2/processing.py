"""An image-only Qwen2-VL processor.

diffusers' Qwen-Image-Edit pipelines only ever pass *images* and text to their `processor`. transformers'
`Qwen2VLProcessor` / `Qwen2_5_VLProcessor` also own a video processor, and every video processor imports
`torchvision`, which is not always installable (it is not here). [`Qwen2VLImageOnlyProcessor`] is the same processor
without the video part: it tokenizes text, expands `<|image_pad|>` to one token per merged vision patch and returns
`pixel_values` + `image_grid_thw` exactly as `Qwen2VLProcessor` does for images, using the PIL/numpy image processor.

It saves and loads with `save_pretrained` / `from_pretrained` like any processor, and a pipeline that registers it
records `["diffusers_editr2.processing", "Qwen2VLImageOnlyProcessor"]` in its `model_index.json`.
"""

from __future__ import annotations

from transformers import ProcessorMixin  # noqa: F401  (diffusers finds the loading base class in this namespace)
from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

__all__ = ["Qwen2VLImageOnlyProcessor", "Qwen2VLImageProcessorPil"]


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    r"""A [`~transformers.Qwen2VLProcessor`] for images and text only (no video processor, no torchvision).

    Args:
        image_processor ([`~transformers.Qwen2VLImageProcessorPil`]):
            The PIL/numpy image processor (resizes to a multiple of `patch_size * merge_size`, normalises, patchifies).
        tokenizer ([`~transformers.Qwen2Tokenizer`]):
            A tokenizer that knows `<|image_pad|>` (and `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`).
        chat_template (`str`, *optional*):
            A Jinja chat template for `apply_chat_template`.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(
                "Qwen2VLImageOnlyProcessor has no video processor: pass `images=` (a list of frames as images) "
                "instead of `videos=`, or use transformers' Qwen2VLProcessor where torchvision is installed."
            )
        return super().__call__(images=images, text=text, **kwargs)

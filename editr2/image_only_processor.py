"""Image-only Qwen-VL processors: transformers' Qwen2-VL / Qwen2.5-VL processor without its video processor.

transformers' `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` own a video processor, and every video processor imports
`torchvision`, which is not always installable. Callers that only pass images and text (the Edit-R2 pipeline's
VLM, the local VLM judge) mix [`ImageOnlyProcessorMixin`] in front of the transformers class:

    class Qwen2VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen2VLProcessor): ...

The result tokenizes text, expands `<|image_pad|>` to one token per merged vision patch and returns `pixel_values` +
`image_grid_thw` exactly as the transformers class does for images, and saves / loads like any processor. This module
imports nothing from transformers itself (the core package does not depend on it); the mixed class brings it.
Users: `diffusers_editr2.processing.Qwen2VLImageOnlyProcessor` and `editr2.bench.judges.local.load_vlm_processor`.
"""

from __future__ import annotations


class ImageOnlyProcessorMixin:
    """Drops the video processor of a Qwen2-VL-family transformers processor class; put it first among the bases.

    Args:
        image_processor: the image processor (e.g. `Qwen2VLImageProcessorPil`).
        tokenizer: a tokenizer that knows `<|image_pad|>` (and `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`).
        chat_template (`str`, *optional*): a Jinja chat template for `apply_chat_template`.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        from transformers import ProcessorMixin

        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        # The transformers class's own __init__ requires a video processor; skip to ProcessorMixin's.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            full = next(c for c in type(self).__mro__ if c.__module__.startswith("transformers.")).__name__
            raise ValueError(
                f"{type(self).__name__} has no video processor: pass `images=` (a list of frames as images) "
                f"instead of `videos=`, or use transformers' {full} where torchvision is installed."
            )
        return super().__call__(images=images, text=text, **kwargs)

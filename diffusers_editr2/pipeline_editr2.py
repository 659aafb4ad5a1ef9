# Copyright 2025 The editr2 authors. Built on diffusers' QwenImageEditPlusPipeline (Apache-2.0, the Qwen-Image Team
# and The HuggingFace Team), whose prompt encoding, VAE encoding, latent packing and sampling it reuses unchanged.
"""EditR2Pipeline: multi-turn, intent-first image editing over the Qwen-Image-Edit(-Plus) family.

One call is one editing turn of a [`~editr2.session.Session`]. Before editing, the pipeline decides how the session's
history reaches the editor (`reasoning=`):

- `"none"`: the current instruction only, as plain diffusers does;
- `"history"`: the instructions so far, concatenated, and earlier images as extra reference images (Edit-Plus takes
  several), up to `max_history_images`: the long-context baseline;
- `"intent"` (default): the text encoder, a generative VLM, first writes a short reasoning trace and one self-contained
  *operative intent* (IC-CoT, `editr2.intent`), and that intent conditions the edit.

The edited latent is kept in the new session's turn and is the next turn's reference latent, so the image is never
decoded and re-encoded between turns. An intent that names an earlier session state ("Undo the last edit.", "Restore
the image from before turn 3.", `editr2.intent.parse_restore`) is an exact undo: the turn copies that state's image and
latent ([`EditR2Pipeline.restore_turn`], `Turn.restored_from`) and no model runs.

Public pieces, for callers that run their own sampler (the RL trainer):

- [`EditR2Pipeline.reason`] / [`EditR2Pipeline.generate_reasoning`]: the intent (and its token ids) for a turn;
- [`EditR2Pipeline.prepare_conditioning`]: text embeddings, reference latents and `img_shapes` of a turn;
- [`EditR2Pipeline.prepare_latents`]: the initial noise, packed;
- [`EditR2Pipeline.prepare_timesteps`]: the scheduler's timesteps and sigma schedule (`sigmas[i]` -> `sigmas[i + 1]`);
- [`EditR2Pipeline.predict_velocity`]: the transformer's velocity for noisy latents, with true CFG
  ([`EditR2Pipeline.velocity_fn`]: the same as `velocity_fn(x, sigma)` for `editr2.flow.sample`);
- [`EditR2Pipeline.decode_latents`] and [`EditR2Pipeline.finish_turn`]: images, and the new session.
"""

import contextlib
import math
import string
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import QwenImageLoraLoaderMixin
from diffusers.models import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    QwenImageEditPlusPipeline,
    calculate_dimensions,
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging, replace_example_docstring
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

from editr2.intent import REASONING_MODES, Intent, build_messages, parse_answer
from editr2.session import Session, Turn
from editr2.unedited import keep_unedited as keep_unedited_latents

from .call_defaults import read_call_defaults, write_call_defaults
from .pipeline_output import EditR2PipelineOutput
from .processing import Qwen2VLImageOnlyProcessor  # noqa: F401  (folders we save name this module: it must be imported)

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_editr2 import EditR2Pipeline

        >>> pipe = EditR2Pipeline.from_pretrained("Qwen/Qwen-Image-Edit-2509", dtype=torch.bfloat16).to("cuda")
        >>> out = pipe(image=Image.open("street.png").convert("RGB"), prompt="make the sign yellow")
        >>> out = pipe(prompt="now make it black", session=out.session)  # turn 2 continues turn 1
        >>> out.intents[0], out.images[0].save("turn2.png")
        >>> out.session.save("my_session")
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_INPUT_PIXELS = 8192 * 8192  # larger inputs are refused rather than resized (they are resized to ~1 MP anyway)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_CONVERTIBLE_MODES = ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV")
# Qwen2-VL's image processor refuses images more elongated than this (its `smart_resize`); every turn's image is shown
# to the text encoder, so more elongated images are refused up front.
MAX_ASPECT_RATIO = 200
# The text side of the transformer's rotary position table (diffusers' QwenEmbedRope) holds this many positions,
# shared with the image grid: prompt tokens + condition-image tokens + the largest image side in latent patches.
ROPE_POSITIONS = 4096
_EXIF_ORIENTATION = 0x0112


class NonFiniteLatentsError(ValueError):
    """A turn's denoised latents hold NaN or inf (a diverged sample); nothing was decoded or added to the session."""

# The text-encoder prompt template of Qwen-Image-Edit(-2509), as diffusers' QwenImageEditPlusPipeline sets it.
PROMPT_TEMPLATE_ENCODE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass
class TurnConditioning:
    """Everything the denoiser needs for one turn, as built by [`EditR2Pipeline.prepare_conditioning`].

    Args:
        session: the session the turn continues (with the source resized to the working size and, after the first
            turn's VAE encoding, its `source_latents` filled in).
        text: the text that conditions the edit (the intent, the instruction, or the concatenated history).
        condition_images: the images shown to the text encoder, each resized to `condition_area`.
        prompt_embeds: `(1, L, D)` text-encoder hidden states; `prompt_embeds_mask` `(1, L)` or None (all valid).
        negative_prompt_embeds, negative_prompt_embeds_mask: the same for the negative prompt (None without CFG).
        image_latents: `(1, N_ref, C)` packed, normalised reference latents, concatenated along the sequence.
        img_shapes: `[[(1, h, w) of the target, (1, h_i, w_i) of each reference]]` in packed-latent units.
        height, width: the working size in pixels.
    """

    session: Session
    text: str
    condition_images: list[PIL.Image.Image]
    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds_mask: torch.Tensor | None
    image_latents: torch.Tensor
    img_shapes: list[list[tuple[int, int, int]]]
    height: int
    width: int


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run `model` without its PEFT adapters (a no-op for a model without adapters or with adapters already off).

    Works for transformers' built-in PEFT integration (`model.load_adapter` / `add_adapter`) and for a `PeftModel`.
    """
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") and hasattr(model, "base_model"):
        with model.disable_adapter():  # a peft.PeftModel
            yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or layers[0].disable_adapters:
        yield
        return
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def write_peft_adapter(save_directory: str, adapter_state_dict: dict[str, torch.Tensor], config) -> None:
    """Write a LoRA in peft's format: `adapter_model.safetensors` + `adapter_config.json` (what `load_adapter` reads).

    Args:
        save_directory (`str`): the folder (created if missing).
        adapter_state_dict (`dict[str, torch.Tensor]`): the adapter's tensors, named as peft's
            `get_peft_model_state_dict` names them (contiguous CPU tensors).
        config (`peft.LoraConfig`): the adapter's config.
    """
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    state_dict = {f"base_model.model.{k}": v for k, v in adapter_state_dict.items()}
    save_file(state_dict, os.path.join(save_directory, "adapter_model.safetensors"))
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    with open(os.path.join(save_directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

def _sync(device: torch.device) -> float:
    """`time.perf_counter()` after the device's queued work is done (so stage timings are real on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def history_prompt(instructions: Sequence[str], instruction: str) -> str:
    """The `reasoning="history"` conditioning text: the earlier instructions, numbered, then the current one."""
    if not instructions:
        return instruction
    earlier = " ".join(f"({k}) {text.strip()}" for k, text in enumerate(instructions, start=1))
    return f"Earlier instructions: {earlier} Current instruction: {instruction.strip()}"


def check_image(image: Any, name: str = "image") -> PIL.Image.Image:
    """Validate an input image; return it as 8-bit RGB.

    Fallback (documented): palette, greyscale, 1-bit, CMYK and other 8-bit colour modes are converted to RGB. Images
    with an alpha channel and 16/32-bit images are refused, since converting them silently drops transparency or
    clips values. An image with an EXIF orientation (a camera JPEG taken sideways) is turned upright first, as
    diffusers' `load_image` does.
    """
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"`{name}` must be a PIL.Image.Image, got {type(image).__name__}; convert arrays with "
            "PIL.Image.fromarray(array) (uint8, HxWx3)."
        )
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)  # a rotated camera JPEG, upright (as diffusers' `load_image`)
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"`{name}` is empty (size {image.size}); pass an image of at least 1x1 pixels.")
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(
            f"`{name}` is {width}x{height} ({width * height / 1e6:.0f} MP), above the {MAX_INPUT_PIXELS / 1e6:.0f} MP "
            "limit; downscale it first (e.g. image.thumbnail((4096, 4096))), the pipeline works at about 1 MP."
        )
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        raise ValueError(
            f"`{name}` has an alpha channel (mode {image.mode!r}); flatten it first, e.g. onto white: "
            "PIL.Image.alpha_composite(PIL.Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))"
            ".convert('RGB')."
        )
    if image.mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    raise ValueError(
        f"`{name}` has mode {image.mode!r} (16/32-bit or float); convert it to 8-bit RGB first, e.g. "
        "PIL.Image.fromarray((np.asarray(image) / 256).astype('uint8')).convert('RGB') for 16-bit."
    )


def check_finite_latents(latents: torch.Tensor, turn: int) -> None:
    """Refuse the denoised latents of turn `turn` (1-based) when they hold NaN or inf, before they are decoded into a
    black image and carried into later turns.

    Raises:
        [`NonFiniteLatentsError`] (a `ValueError`).
    """
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteLatentsError(
            f"Turn {turn} produced non-finite latents (NaN or inf); nothing was decoded or added to the session. "
            "Usual causes: float16 weights overflowing (load with torch_dtype=torch.bfloat16), custom `latents` or "
            "`sigmas`, or a callback that changed the latents."
        )


def _is_number(value: Any) -> bool:
    """An int or float (numpy scalars included), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _min_area(size: tuple[int, int]) -> int:
    """The smallest area (pixels) that `calculate_dimensions` turns into an image of at least 32 x 32 at `size`'s
    aspect ratio (it rounds each side to a multiple of 32)."""
    ratio = max(size) / min(size)
    return math.ceil(16**2 * ratio) + 1


def _check_template(template: Any) -> None:
    """A reasoning template must be a str with an `{instruction}` field and no fields besides `{history}`, `{rules}`."""
    allowed = {"history", "rules", "instruction"}
    what = "a str with an {instruction} field and optionally {history} and {rules} (literal braces doubled: {{ }})"
    if not isinstance(template, str):
        raise ValueError(f"`template` must be {what}, got {type(template).__name__}.")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"`template` must be {what}; it does not parse: {e}.") from None
    if "instruction" not in fields or not fields <= allowed:
        unknown = sorted(fields - allowed)
        reason = f"unknown fields {unknown}" if unknown else "no {instruction} field"
        raise ValueError(f"`template` must be {what}; it has {reason}. See editr2.intent.DEFAULT_TEMPLATE.")


class EditR2Pipeline(DiffusionPipeline, QwenImageLoraLoaderMixin):
    r"""Multi-turn, intent-first image editing with a Qwen-Image-Edit(-Plus) model.

    The components are those of diffusers' [`QwenImageEditPlusPipeline`], registered the same way, so
    `EditR2Pipeline.from_pretrained` loads a `Qwen/Qwen-Image-Edit-2509` or `Qwen/Qwen-Image-Edit-2511` folder
    unchanged (2511's transformer config sets `zero_cond_t`, which diffusers' transformer applies), and
    `QwenImageEditPlusPipeline.from_pipe(pipe)` is upstream's pipeline on the same objects; plus an optional separate
    reasoner (`reasoning_model`, `reasoning_processor`). Transformer LoRAs load through diffusers' loader
    (`load_lora_weights`); a *reasoning* LoRA on the [`reasoner`] through peft ([`load_reasoning_lora`]) is active while
    it writes the intent and disabled while the text encoder encodes the prompt.

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the flow-matching scheduler (Qwen-Image's config).
        vae ([`AutoencoderKLQwenImage`]): encodes reference images and decodes edited latents.
        text_encoder ([`~transformers.Qwen2_5_VLForConditionalGeneration`]): encodes prompts, and writes the intents
            unless a separate `reasoning_model` is given.
        tokenizer ([`~transformers.Qwen2Tokenizer`]): the text encoder's tokenizer.
        processor ([`~transformers.Qwen2VLProcessor`]): tokenizes text with images for the text encoder.
        transformer ([`QwenImageTransformer2DModel`]): the MMDiT that predicts the velocity.
        reasoning_model ([`~transformers.Qwen2_5_VLForConditionalGeneration`], *optional*): a separate VLM that writes
            the intents (with `reasoning_processor`); the text encoder then only encodes prompts. Without one (as in
            a Qwen-Image-Edit folder), the text encoder writes the intents. A separate reasoner can be retrained
            (its own tokenizer, its own view of the image: `reasoning_condition_area`) without moving the
            conditioning the transformer was trained on.
        reasoning_processor ([`~transformers.Qwen2VLProcessor`], *optional*): the reasoning model's processor.
    """

    model_cpu_offload_seq = "reasoning_model->text_encoder->transformer->vae"
    _optional_components = ["reasoning_model", "reasoning_processor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    # diffusers' own functions (not copies): identical prompt encoding, VAE encoding and latent packing are what make
    # `reasoning="none"` equal to QwenImageEditPlusPipeline.
    _extract_masked_hidden = QwenImageEditPlusPipeline._extract_masked_hidden
    _get_qwen_prompt_embeds = QwenImageEditPlusPipeline._get_qwen_prompt_embeds
    _encode_vae_image = QwenImageEditPlusPipeline._encode_vae_image
    _pack_latents = staticmethod(QwenImageEditPlusPipeline._pack_latents)
    _unpack_latents = staticmethod(QwenImageEditPlusPipeline._unpack_latents)

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLQwenImage,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        tokenizer: Qwen2Tokenizer,
        processor: Qwen2VLProcessor,
        transformer: QwenImageTransformer2DModel,
        reasoning_model: Qwen2_5_VLForConditionalGeneration | None = None,
        reasoning_processor: Qwen2VLProcessor | None = None,
    ):
        super().__init__()
        if (reasoning_model is None) != (reasoning_processor is None):
            raise ValueError(
                "Pass both `reasoning_model` and `reasoning_processor` (a separate reasoner and its processor), or "
                "neither (the text encoder writes the intents)."
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            processor=processor,
            transformer=transformer,
            scheduler=scheduler,
            reasoning_model=reasoning_model,
            reasoning_processor=reasoning_processor,
        )
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample) if getattr(self, "vae", None) else 8
        self.latent_channels = self.vae.config.z_dim if getattr(self, "vae", None) else 16
        # Packed latents are 2x2 patches of the VAE latent, so sizes are multiples of vae_scale_factor * 2.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.tokenizer_max_length = 1024
        self.prompt_template_encode = PROMPT_TEMPLATE_ENCODE
        self.prompt_template_encode_start_idx = 64
        self.default_sample_size = 128
        self.reasoning_prefix_cache = ReasoningPrefixCache()
        # The `__call__` arguments the model was trained for (see `from_pretrained`); `{}` for upstream's defaults.
        self.call_defaults: dict = {}

    # ------------------------------------------------------------------------------------------------------------------
    # Loading and saving
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""Load from a diffusers folder or Hub id, e.g. a `Qwen/Qwen-Image-Edit-2509` layout, unchanged.

        Like [`~DiffusionPipeline.from_pretrained`], with two differences and one addition:

        - Without `dtype` (or the older `torch_dtype`), every component loads in `torch.float32`. diffusers' own
          default would load the transformer and VAE in float32 but let transformers load the text encoder in the dtype
          its `config.json` names (float16 for `checkpoints/editr2-shapes-tiny`, bfloat16 for Qwen-Image-Edit-2509),
          and every call would then fail with a dtype mismatch. Pass `dtype=torch.bfloat16` (or float16) to load
          every component in that dtype instead, e.g. on a GPU.
        - transformers' `Qwen2VLProcessor` needs a video processor, which needs torchvision; where torchvision is not
          installed, the folder's `processor/` is loaded with the image-only
          [`~diffusers_editr2.processing.Qwen2VLImageOnlyProcessor`] instead (same files, same image and text
          processing).
        - The folder's `editr2_call_defaults.json` (the `__call__` arguments its model was trained for: size, steps,
          CFG, reasoning template, ...) is read into `pipe.call_defaults` (`{}` without one, e.g. for a Qwen folder or
          a Hub id). `__call__` does not apply them by itself, so that `pipe(...)` means the same with every folder
          (and `reasoning="none"` stays equal to `QwenImageEditPlusPipeline`): callers pass them,
          `pipe(..., **{**pipe.call_defaults, **overrides})`.
        """
        from transformers.utils import is_torchvision_available

        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
            kwargs["dtype"] = torch.float32  # one dtype for every component (see the docstring)

        names = [name for name in ("processor", "reasoning_processor") if name not in kwargs]
        if names and not is_torchvision_available():
            config = cls.load_config(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
            for name in names:
                library, class_name = config.get(name) or [None, None]
                if library == "transformers" and class_name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"):
                    kwargs[name] = Qwen2VLImageOnlyProcessor.from_pretrained(
                        pretrained_model_name_or_path, subfolder=name, **_hub_kwargs(kwargs)
                    )
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.call_defaults = read_call_defaults(pretrained_model_name_or_path)
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Like [`~DiffusionPipeline.save_pretrained`]; refuses while a reasoning LoRA is loaded (transformers would
        save the reasoner as adapter weights only). Save it with [`save_reasoning_lora`] and remove it first.
        A non-empty `pipe.call_defaults` is written as the folder's `editr2_call_defaults.json`."""
        for name in ("text_encoder", "reasoning_model"):
            if getattr(getattr(self, name, None), "_hf_peft_config_loaded", False):
                raise ValueError(
                    f"The {name} has a reasoning LoRA loaded; `save_pretrained` would save only its adapter weights. "
                    f"Save the LoRA with `pipe.save_reasoning_lora(dir)`, remove it with "
                    f"`pipe.{name}.delete_adapter(name)`, then save the pipeline."
                )
        super().save_pretrained(save_directory, **kwargs)
        write_call_defaults(save_directory, self.call_defaults)

    def save_transformer_lora(self, save_directory: str, adapter_name: str = "default") -> None:
        """Save the transformer's LoRA `adapter_name` with diffusers' `save_lora_weights`, its config (rank, alpha)
        included, so that `load_lora_weights(save_directory)` reproduces it exactly."""
        from peft.utils import get_peft_model_state_dict

        if adapter_name not in getattr(self.transformer, "peft_config", {}):
            raise ValueError(f"The transformer has no adapter named {adapter_name!r}; add or load one first.")
        self.save_lora_weights(
            save_directory,
            transformer_lora_layers=get_peft_model_state_dict(self.transformer, adapter_name=adapter_name),
            transformer_lora_adapter_metadata=self.transformer.peft_config[adapter_name].to_dict(),
        )

    @property
    def reasoner(self) -> Qwen2_5_VLForConditionalGeneration:
        """The VLM that writes the intents: `reasoning_model` when the pipeline has one, else the text encoder."""
        return self.reasoning_model if getattr(self, "reasoning_model", None) is not None else self.text_encoder

    @property
    def reasoner_processor(self) -> Qwen2VLProcessor:
        """The [`reasoner`]'s processor: `reasoning_processor` with a separate reasoning model, else `processor`."""
        return self.reasoning_processor if getattr(self, "reasoning_model", None) is not None else self.processor

    def load_reasoning_lora(self, pretrained_model_name_or_path: str, adapter_name: str = "reasoning", **kwargs):
        """Load a peft LoRA (`adapter_config.json` + `adapter_model.safetensors`) onto the [`reasoner`].

        It is active while the reasoner writes intents ([`reason`]). On a text encoder that also encodes the prompts
        it is disabled while it does so ([`encode_prompt`]), so the conditioning the transformer was trained on does
        not move.
        """
        model = self.reasoner
        missing = object()
        conversions = model.__dict__.get("_weight_conversions", missing)
        model.load_adapter(pretrained_model_name_or_path, adapter_name=adapter_name, **kwargs)
        # transformers keeps the adapter's key renaming as the model's own, which `save_pretrained` would reverse
        # into `base_model.model.*` keys once the adapter is fused: keep the base model's
        if conversions is missing:
            model.__dict__.pop("_weight_conversions", None)
        else:
            model._weight_conversions = conversions
        self.reasoning_prefix_cache.clear()

    def save_reasoning_lora(self, save_directory: str, adapter_name: str = "reasoning") -> None:
        """Save the [`reasoner`]'s LoRA `adapter_name` in peft's format (safetensors), for [`load_reasoning_lora`]."""
        model = self.reasoner
        if adapter_name not in getattr(model, "peft_config", {}):
            raise ValueError(f"The reasoner has no adapter named {adapter_name!r}; load or add one first.")
        state_dict = model.get_adapter_state_dict(adapter_name=adapter_name)
        state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        write_peft_adapter(save_directory, state_dict, model.peft_config[adapter_name])

    def fuse_reasoning_lora(self, adapter_name: str = "reasoning") -> None:
        """Merge the [`reasoner`]'s LoRA `adapter_name` into its weights and remove the adapter layers, as
        `fuse_lora()` then `unload_lora_weights()` do for the transformer: the reasoner then writes the same intents
        without the adapter's extra matmuls, and [`save_pretrained`] saves it as plain weights.

        Only a separate `reasoning_model` can be fused: a text encoder that also encodes the prompts would move the
        conditioning the transformer was trained on (its LoRA is disabled while it encodes). Give such a pipeline a
        separate reasoner first (`register_modules(reasoning_model=copy.deepcopy(pipe.text_encoder),
        reasoning_processor=pipe.processor)`), then load the LoRA onto it.

        Raises:
            ValueError: without a separate reasoning model, without the adapter, with other adapters loaded beside it
                (removing the adapter layers would drop them), or when the merged weights are not finite.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = getattr(self, "reasoning_model", None)
        if model is None:
            raise ValueError("The reasoner is the text encoder, which also encodes the prompts: fusing its LoRA would "
                             "change the transformer's conditioning. Add a separate reasoning_model and fuse there.")
        adapters = set(getattr(model, "peft_config", {}))
        if adapter_name not in adapters:
            raise ValueError(f"The reasoning_model has no adapter named {adapter_name!r}; load one with "
                             "`load_reasoning_lora` first.")
        if adapters != {adapter_name}:
            raise ValueError(f"The reasoning_model has other adapters ({sorted(adapters - {adapter_name})}); delete "
                             "them (`pipe.reasoning_model.delete_adapter(name)`) before fusing.")
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True, adapter_names=[adapter_name])  # safe_merge refuses non-finite weights
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.get_base_layer())
        del model.peft_config
        model._hf_peft_config_loaded = False
        if any(pattern.startswith("base_model.model.") for conversion in getattr(model, "_weight_conversions", None)
               or () for pattern in getattr(conversion, "source_patterns", ())):
            del model._weight_conversions  # an adapter's key renaming (loaded outside `load_reasoning_lora`)
        self.reasoning_prefix_cache.clear()

    # ------------------------------------------------------------------------------------------------------------------
    # Per-call state (as in diffusers' pipelines)
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        image,
        session,
        reasoning,
        height,
        width,
        negative_prompt=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        max_sequence_length=None,
        max_new_tokens=256,
        temperature=0.0,
        max_history_images=2,
        num_inference_steps=2,
        sigmas=None,
        true_cfg_scale=1.0,
        guidance_scale=None,
        generator=None,
        latents=None,
        template=None,
        reference_area=VAE_IMAGE_SIZE,
        condition_area=CONDITION_IMAGE_SIZE,
        keep_unedited=None,
        reasoning_condition_area=None,
    ):
        """Raise a `ValueError` that says what to pass instead for every invalid argument of [`__call__`].

        Everything is checked before any model runs: the prompt's token length included (tokenizer only).
        """
        if prompt is None:
            raise ValueError("Pass `prompt=`: this turn's editing instruction (a non-empty string).")
        if not isinstance(prompt, str):
            raise ValueError(
                f"`prompt` must be one string (one turn), got {type(prompt).__name__}; for several turns use "
                "`pipe.edit_session(image, [prompt_1, prompt_2, ...])`."
            )
        if not prompt.strip():
            raise ValueError("`prompt` is empty; pass this turn's editing instruction.")
        if image is None and session is None:
            raise ValueError("Pass `image=` to start a session, or `session=` (e.g. `out.session`) to continue one.")
        if image is not None and session is not None:
            raise ValueError(
                "Pass either `image=` (to start a new session) or `session=` (to continue one), not both; to restart "
                "from a session's image use `image=session.current_image`."
            )
        if session is not None and not isinstance(session, Session):
            raise ValueError(f"`session` must be an editr2.session.Session (e.g. `out.session`), got {type(session)}.")
        if session is not None:
            self._check_session_latents(session)
        if reasoning not in REASONING_MODES:
            raise ValueError(f"`reasoning` must be one of {REASONING_MODES}, got {reasoning!r}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"`negative_prompt` must be a string or None, got {type(negative_prompt).__name__}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        multiple_of = self.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value < multiple_of):
                raise ValueError(
                    f"`{name}` must be an int >= {multiple_of} (it is floored to a multiple of it), got {value!r}."
                )
        if session is not None and (height is not None or width is not None):
            session_width, session_height = session.size
            requested = (
                (width or session_width) // multiple_of * multiple_of,
                (height or session_height) // multiple_of * multiple_of,
            )
            if requested != session.size:
                raise ValueError(
                    f"This session works at {session_width}x{session_height} (width x height), but height={height}, "
                    f"width={width} was requested; omit height/width to continue it, or start a new session with "
                    f"`image=session.current_image.resize((width, height))`."
                )
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )
        if max_sequence_length is not None and (
            not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= self.tokenizer_max_length
        ):
            raise ValueError(
                f"`max_sequence_length` must be an int in [1, {self.tokenizer_max_length}] (the most prompt tokens the "
                f"text encoder conditions on), got {max_sequence_length!r}."
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {temperature}.")
        if not isinstance(max_history_images, int) or max_history_images < 0:
            raise ValueError(f"`max_history_images` must be an int >= 0, got {max_history_images!r}.")
        if sigmas is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        self._check_sigmas(sigmas)
        steps = len(sigmas) if sigmas is not None else num_inference_steps
        if steps == 1 and self.scheduler.config.get("shift_terminal"):
            # the scheduler stretches the schedule so it ends at shift_terminal, dividing by (1 - last sigma) = 0
            raise ValueError(
                "A one-step schedule gives NaN with this scheduler (its `shift_terminal` stretch needs at least two "
                "sigmas); pass num_inference_steps >= 2 (or at least two `sigmas`)."
            )
        for name, value in (("true_cfg_scale", true_cfg_scale), ("guidance_scale", guidance_scale)):
            if value is None and name == "guidance_scale":
                continue
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number (e.g. 4.0), got {value!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"`generator` must be a torch.Generator or None, got {type(generator).__name__}; pass e.g. "
                "torch.Generator().manual_seed(0) (`edit_session` takes a list, one generator per turn)."
            )
        if latents is not None and (
            not isinstance(latents, torch.Tensor) or latents.ndim != 3 or not bool(torch.isfinite(latents).all())
        ):
            raise ValueError(
                "`latents` must be finite packed noise of shape (1, N, C), e.g. from `pipe.prepare_latents`, got "
                + (f"shape {tuple(latents.shape)}" if isinstance(latents, torch.Tensor) and latents.ndim != 3
                   else "NaN or inf values" if isinstance(latents, torch.Tensor) else type(latents).__name__)
                + "."
            )
        if template is not None:
            _check_template(template)
        if keep_unedited is not None and (not _is_number(keep_unedited) or not math.isfinite(keep_unedited)
                                          or keep_unedited < 0):
            raise ValueError(
                f"`keep_unedited` must be a finite change >= 0 (e.g. 0.3, in normalised latent units) or None (off), "
                f"got {keep_unedited!r}."
            )
        self._check_areas(image, session, height, width, reference_area, condition_area, reasoning_condition_area)
        if max_sequence_length is not None:
            text = history_prompt(session.instructions if session else [], prompt) if reasoning == "history" else prompt
            self.check_prompt_length(text, max_sequence_length)

    def _check_reference_at_working_size(self, session: Session, reference_area) -> None:
        """`keep_unedited` copies from the current image's reference latent: it must have the output's size."""
        if session.state_origin() != 0 or reference_area is None:
            return  # a carried latent (always at the working size), or a source encoded at the working size
        size = tuple(calculate_dimensions(reference_area, session.size[0] / session.size[1]))
        if size != tuple(session.size):
            raise ValueError(
                f"`keep_unedited` copies from the current image's latent, but this turn encodes the source at "
                f"{size[0]}x{size[1]} (reference_area={reference_area}) while the output is {session.size[0]}x"
                f"{session.size[1]}; pass reference_area=None (the source at the working size) or omit keep_unedited."
            )

    @staticmethod
    def _check_sigmas(sigmas) -> None:
        if sigmas is None:
            return
        example = "e.g. numpy.linspace(1.0, 1 / n, n).tolist() for n steps, or omit `sigmas`"
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__") or len(sigmas) == 0:
            raise ValueError(f"`sigmas` must be a non-empty list of noise levels in (0, 1], {example}; got {sigmas!r}.")
        values = sigmas.tolist() if hasattr(sigmas, "tolist") else list(sigmas)  # numpy / torch: python numbers
        if not all(_is_number(v) and math.isfinite(v) and 0 < v <= 1 for v in values):
            raise ValueError(f"`sigmas` must hold finite noise levels in (0, 1], {example}; got {values!r}.")

    def working_size(
        self, image: PIL.Image.Image, height: int | None = None, width: int | None = None, reference_area=VAE_IMAGE_SIZE
    ) -> tuple[int, int]:
        """`(width, height)` a new session from `image` works at: `height` x `width` or, when not given, the image's
        aspect ratio at `reference_area` pixels; floored to multiples of `vae_scale_factor * 2` ([`start_session`])."""
        if height is None or width is None:
            area = reference_area or VAE_IMAGE_SIZE
            default_width, default_height = calculate_dimensions(area, image.width / image.height)
            height, width = height or default_height, width or default_width
        multiple_of = self.vae_scale_factor * 2
        return width // multiple_of * multiple_of, height // multiple_of * multiple_of

    def _check_areas(self, image, session, height, width, reference_area, condition_area,
                     reasoning_condition_area=None) -> None:
        """The aspect ratio, the working size, and the areas the references are resized to, must all give images."""
        areas = (("reference_area", reference_area), ("condition_area", condition_area),
                 ("reasoning_condition_area", reasoning_condition_area))
        for name, value in areas:
            if (value is not None or name == "condition_area") and (not _is_number(value) or not value > 0):
                hint = {"reference_area": "1024 * 1024, or None (the working size)",
                        "reasoning_condition_area": "384 * 384, or None (condition_area)"}.get(name, "384 * 384")
                raise ValueError(f"`{name}` must be a positive number of pixels, e.g. {hint}; got {value!r}.")
        if session is not None:
            size = session.size
        elif isinstance(image, PIL.Image.Image) and image.width > 0 and image.height > 0:
            ratio = max(image.width / image.height, image.height / image.width)
            if ratio > MAX_ASPECT_RATIO:
                raise ValueError(
                    f"`image` is {image.width}x{image.height}, an aspect ratio of {ratio:.0f}:1; the text encoder's "
                    f"image processor takes at most {MAX_ASPECT_RATIO}:1. Crop or pad the image first."
                )
            size = self.working_size(image, height, width, reference_area)
            if min(size) == 0:
                raise ValueError(
                    f"A {image.width}x{image.height} image at reference_area={reference_area} gives a working size of "
                    f"{size[0]}x{size[1]}; pass height= and width= (multiples of {self.vae_scale_factor * 2}), or pad "
                    "the image to a less elongated shape."
                )
        else:
            return  # not an image: `check_image` says what to pass
        for name, area in areas:
            if area is None:
                continue
            area_width, area_height = calculate_dimensions(area, size[0] / size[1])
            if min(area_width, area_height) <= 0:
                raise ValueError(
                    f"`{name}`={area} is too small for the session's {size[0]}x{size[1]} images: resized to it they "
                    f"would be {area_width}x{area_height} pixels. Pass at least {_min_area(size)} "
                    f"(upstream: {VAE_IMAGE_SIZE if name == 'reference_area' else CONDITION_IMAGE_SIZE})."
                )

    def check_prompt_length(self, text: str, max_sequence_length: int = 512, name: str = "prompt") -> int:
        """Refuse `text` longer than `max_sequence_length` tokens, before any model runs; returns its token count.

        The limit is on the text that conditions the edit (the instruction, the `"history"` text or the intent), not
        on the prompt template or the image tokens around it. Longer prompts are refused rather than truncated, so the
        edit never silently loses the end of its instruction.
        """
        num_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if num_tokens > max_sequence_length:
            raise ValueError(
                f"The {name} is {num_tokens} tokens long, above `max_sequence_length`={max_sequence_length} (at most "
                f"{self.tokenizer_max_length}); shorten it, or pass a larger max_sequence_length up to "
                f"{self.tokenizer_max_length}."
            )
        return num_tokens

    def _check_session_latents(self, session: Session) -> None:
        """Refuse carried latents that do not fit this model at the session's size (another model or resolution)."""
        scale, channels = self.vae_scale_factor * 2, self.latent_channels * 4
        width, height = session.size
        named = [(f"session.turns[{k}].latents", t.latents, (width, height)) for k, t in enumerate(session.turns)]
        named.append(("session.source_latents", session.source_latents, session.meta.get("source_latents_size")))
        for name, latents, size in named:
            if latents is None:
                continue
            if not isinstance(latents, torch.Tensor) or not latents.dtype.is_floating_point:
                raise ValueError(f"{name} must be a floating-point tensor, got {getattr(latents, 'dtype', latents)}.")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError(
                    f"{name} holds NaN or inf (that turn diverged); continue from an earlier turn with "
                    "`session.truncate(k)`."
                )
            tokens = (size[0] // scale) * (size[1] // scale) if size else latents.shape[1]
            if latents.ndim != 3 or latents.shape[0] != 1 or tuple(latents.shape[1:]) != (tokens, channels):
                raise ValueError(
                    f"{name} has shape {tuple(latents.shape)}, but this model expects (1, {tokens}, {channels}) for "
                    f"the session's {width}x{height} images: the session was made by another model or at another "
                    "resolution. Continue it with the model that made it, or rebuild it without latents (they are "
                    "then re-encoded from the images)."
                )

    def load_session(self, directory) -> Session:
        """[`~editr2.session.Session.load`], then check that the session's latents fit this model (shape for its VAE's
        latent layout at the session's size, dtype, finite), as [`__call__`] does before continuing a session."""
        session = Session.load(directory)
        self._check_session_latents(session)
        return session

    def start_session(
        self, image: PIL.Image.Image, height: int | None = None, width: int | None = None, reference_area=VAE_IMAGE_SIZE
    ) -> Session:
        """A new session whose source is `image` at the working size.

        The working size is `height` x `width` (floored to multiples of `vae_scale_factor * 2`); when not given, the
        image's aspect ratio at `reference_area` pixels (upstream's default: 1024x1024). A source of another size is
        resized once (its original size is kept in `session.meta["original_size"]`); every turn has the working size.
        """
        image = check_image(image)
        width, height = self.working_size(image, height, width, reference_area)
        if (width, height) == image.size:
            return Session(source_image=image)
        resized = self.image_processor.resize(image, height, width)
        return Session(source_image=resized, meta={"original_size": list(image.size)})

    # ------------------------------------------------------------------------------------------------------------------
    # Reasoning (IC-CoT)
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def reasoning_area(condition_area: int, reasoning_condition_area: int | None = None) -> int:
        """Pixels of the image the [`reasoner`] sees: `reasoning_condition_area`, or `condition_area` when it is None
        (the text encoder's view, which is also the reasoner's when the text encoder writes the intents)."""
        return condition_area if reasoning_condition_area is None else reasoning_condition_area

    def keep_unedited(self, latents: torch.Tensor, image_latents: torch.Tensor, height: int, width: int,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`__call__`'s `keep_unedited`: copy the current image's latent back wherever the sampled `latents` changed it
        by at most `threshold` (`editr2.unedited.keep_unedited`, one latent pixel of growth around the edit).

        Args:
            latents (`torch.Tensor`): `(B, N, C)` sampled packed latents at `height x width` pixels.
            image_latents (`torch.Tensor`): `(1 or B, N_ref, C)` the turn's reference latents; the current image comes
                first and must be at the output's size (`reference_area=None`).
            threshold (`float`): RMS change per latent pixel (normalised latent units); 0.2 is the shipped default's.

        Returns:
            `(latents, edited)`: the latents with the current image kept outside the edit, and the edited region
            `(B, h, w)` bool.
        """
        multiple_of = self.vae_scale_factor * 2
        current = image_latents[:, : latents.shape[1]]  # (1 or B, N, C)
        return keep_unedited_latents(latents, current, 2 * (height // multiple_of), 2 * (width // multiple_of),
                                     threshold)

    def condition_image(self, image: PIL.Image.Image, condition_area: int = CONDITION_IMAGE_SIZE) -> PIL.Image.Image:
        """`image` resized to `condition_area` pixels (aspect kept): what the VLM sees (upstream: 384^2)."""
        width, height = calculate_dimensions(condition_area, image.width / image.height)
        return self.image_processor.resize(image, height, width)

    def prepare_reasoning_inputs(
        self,
        session: Session,
        prompt: str,
        template: str | None = None,
        condition_area: int = CONDITION_IMAGE_SIZE,
        device: torch.device | None = None,
    ):
        """The [`reasoner`]'s inputs for writing the intent of `prompt` in `session`.

        The request is `editr2.intent.build_messages` (earlier instructions, persistent rules, this instruction) with
        the current image appended to the user message, rendered with the processor's chat template.

        Returns:
            [`~transformers.BatchFeature`]: `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, ...
        """
        messages = build_messages(session.instructions, prompt, session.rules, template=template)
        # The image goes last, so that consecutive turns share the longest possible text prefix (see the prefix cache).
        messages[-1] = {
            "role": messages[-1]["role"],
            "content": [{"type": "text", "text": messages[-1]["content"]}, {"type": "image"}],
        }
        processor = self.reasoner_processor
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = self.condition_image(session.current_image, condition_area)
        inputs = processor(text=[text], images=[image], padding=True, return_tensors="pt")
        return inputs.to(device or self._execution_device)

    def generate_reasoning(
        self,
        session: Session,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        template: str | None = None,
        condition_area: int = CONDITION_IMAGE_SIZE,
        generator: torch.Generator | None = None,
        use_prefix_cache: bool = True,
    ):
        """Let the [`reasoner`] write the reasoning answer for `prompt` (reasoning LoRA, if any, active).

        Args:
            temperature (`float`, defaults to 0): 0 decodes greedily; above 0 samples, seeded from `generator`.
            use_prefix_cache (`bool`, defaults to True): reuse the key/value cache of the text prefix shared with an
                earlier request (system prompt and history), see [`ReasoningPrefixCache`].

        Returns:
            `tuple[str, BatchFeature, torch.LongTensor]`: the decoded answer (special tokens removed), the prompt
            inputs and the new token ids `(1, T)` (what a policy-gradient step scores).
        """
        inputs = self.prepare_reasoning_inputs(session, prompt, template, condition_area)
        # plain temperature sampling: the checkpoint's own top-k / top-p defaults are overridden
        generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "top_k": None, "top_p": None}
        generate_kwargs["temperature"] = temperature if temperature > 0 else None
        seed = None
        if temperature > 0:  # transformers samples from the global RNG: seed it from `generator`, then restore it
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=getattr(generator, "device", "cpu")))
        reasoner = self.reasoner
        devices = [reasoner.device] if reasoner.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            past = self.reasoning_prefix_cache.lookup(reasoner, inputs) if use_prefix_cache else None
            output = reasoner.generate(**inputs, past_key_values=past, return_dict_in_generate=True, **generate_kwargs)
        if use_prefix_cache:
            self.reasoning_prefix_cache.store(reasoner, inputs, output.past_key_values)
        new_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
        answer = self.reasoner_processor.batch_decode(new_ids, skip_special_tokens=True)[0]
        return answer, inputs, new_ids

    def reason(
        self,
        session: Session,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        template: str | None = None,
        condition_area: int = CONDITION_IMAGE_SIZE,
        generator: torch.Generator | None = None,
    ) -> Intent:
        r"""Reconstruct the operative intent of `prompt` in `session` (IC-CoT; like FLUX.2's `upsample_prompt`).

        The [`reasoner`] writes `<think>reasoning</think>intent`; [`editr2.intent.parse_answer`] extracts the intent,
        or falls back to `prompt` and records why (`Intent.fallback_reason`, e.g. `"no_think_end_tag"`). An intent
        that names an earlier session state (`editr2.intent.parse_restore`) sets `Intent.restore`.

        Args:
            session ([`~editr2.session.Session`]): the session so far (its instructions, rules and current image).
            prompt (`str`): this turn's raw instruction.
            max_new_tokens (`int`, defaults to 256): the reasoning budget.
            temperature (`float`, defaults to 0): 0 = greedy.
            template (`str`, *optional*): the user-message template for `editr2.intent.build_messages`.
            condition_area (`int`, defaults to 384*384): pixels of the image shown to the reasoner.
            generator (`torch.Generator`, *optional*): seeds sampling when `temperature > 0`.

        Returns:
            [`~editr2.intent.Intent`]
        """
        answer, _, _ = self.generate_reasoning(
            session, prompt, max_new_tokens, temperature, template, condition_area, generator
        )
        return parse_answer(answer, prompt, num_turns=session.num_turns)

    # ------------------------------------------------------------------------------------------------------------------
    # Conditioning
    # ------------------------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str],
        image: list[PIL.Image.Image] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        max_sequence_length: int = 1024,
    ):
        r"""Encode `prompt` (with the condition `image`s) into the transformer's text conditioning.

        diffusers' `QwenImageEditPlusPipeline.encode_prompt`, run with the text encoder's adapters disabled (a
        reasoning LoRA changes what the VLM writes, never the conditioning). Not under `no_grad`: trainers may
        differentiate through it.

        Returns:
            `tuple[torch.Tensor, torch.Tensor | None]`: `prompt_embeds` `(B, L, D)` and `prompt_embeds_mask` `(B, L)`
            (None when every token is valid).
        """
        with adapters_disabled(self.text_encoder):
            return QwenImageEditPlusPipeline.encode_prompt(
                self,
                prompt,
                image,
                device,
                num_images_per_prompt,
                prompt_embeds,
                prompt_embeds_mask,
                max_sequence_length,
            )

    def encode_image(
        self,
        image: PIL.Image.Image,
        height: int,
        width: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """VAE-encode `image` resized to `height` x `width`: packed, normalised latents `(1, N, C)` (as upstream)."""
        device = device or self._execution_device
        pixels = self.image_processor.preprocess(image, height, width).unsqueeze(2)  # (1, 3, 1, H, W)
        pixels = pixels.to(device=device, dtype=dtype or self.vae.dtype)
        latents = self._encode_vae_image(image=pixels, generator=generator)  # (1, C, 1, h, w)
        latent_height, latent_width = latents.shape[3:]
        return self._pack_latents(latents, 1, self.latent_channels, latent_height, latent_width)  # (1, h/2 * w/2, 4C)

    def image_shapes(self, height: int, width: int, reference_sizes: Sequence[tuple[int, int]]):
        """`img_shapes` for the transformer: the target, then each `(width, height)` reference, in packed units."""
        scale = self.vae_scale_factor * 2
        return [[(1, height // scale, width // scale), *[(1, h // scale, w // scale) for w, h in reference_sizes]]]

    def prepare_conditioning(
        self,
        session: Session,
        text: str,
        reasoning: str = "intent",
        negative_prompt: str | None = None,
        reference_area: int | None = VAE_IMAGE_SIZE,
        condition_area: int = CONDITION_IMAGE_SIZE,
        max_history_images: int = 2,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
    ) -> TurnConditioning:
        r"""Build the text embeddings and reference latents of one turn.

        References: the current image (its carried latent, so no decode -> encode between turns; the source is encoded
        once, at `reference_area` pixels, or at the working size when `reference_area=None`), and for
        `reasoning="history"` up to `max_history_images` earlier images after it (oldest first).

        Args:
            session: the session the turn continues (see [`start_session`]).
            text: what conditions the edit (the intent, the instruction, or the history text).
            negative_prompt: encoded as well when given (true CFG).

        Returns:
            [`TurnConditioning`]
        """
        device = device or self._execution_device
        height, width = session.size[1], session.size[0]
        self.check_prompt_length(text, max_sequence_length, "conditioning text" if reasoning != "none" else "prompt")
        if negative_prompt is not None:
            self.check_prompt_length(negative_prompt, max_sequence_length, "negative prompt")
        session, references = self._reference_latents(session, reasoning, reference_area, max_history_images, device)
        condition_images = [self.condition_image(image, condition_area) for image, _, _ in references]
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            text, condition_images, device, max_sequence_length=max_sequence_length
        )
        negative_prompt_embeds = negative_prompt_embeds_mask = None
        if negative_prompt is not None:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
                negative_prompt, condition_images, device, max_sequence_length=max_sequence_length
            )
        img_shapes = self.image_shapes(height, width, [size for _, _, size in references])
        for embeds in (prompt_embeds, negative_prompt_embeds):
            if embeds is not None:
                self._check_rotary_positions(embeds.shape[1], img_shapes, len(condition_images), condition_area)
        image_latents = torch.cat([latents for _, latents, _ in references], dim=1).to(prompt_embeds.dtype)
        return TurnConditioning(
            session=session,
            text=text,
            condition_images=condition_images,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            image_latents=image_latents,
            img_shapes=img_shapes,
            height=height,
            width=width,
        )

    def _check_rotary_positions(self, num_text_tokens, img_shapes, num_images, condition_area) -> None:
        """Refuse a text sequence the transformer's rotary position table cannot hold (before the transformer runs).

        diffusers' QwenEmbedRope places the text after the largest image side (in latent patches, halved with
        `scale_rope`), within a table of `ROPE_POSITIONS` positions; beyond it the transformer fails with a tensor
        size mismatch.
        """
        pos_embed = getattr(self.transformer, "pos_embed", None)
        positions = getattr(getattr(pos_embed, "pos_freqs", None), "shape", (ROPE_POSITIONS,))[0]
        halve = getattr(pos_embed, "scale_rope", True)
        image_positions = max(max(h // 2, w // 2) if halve else max(h, w) for _, h, w in img_shapes[0])
        if image_positions + num_text_tokens > positions:
            raise ValueError(
                f"The text sequence ({num_text_tokens} tokens: the prompt template, the prompt and {num_images} "
                f"condition image(s) at condition_area={condition_area}) plus {image_positions} image positions "
                f"exceeds the transformer's {positions} rotary positions; pass a smaller condition_area, "
                "max_history_images or max_sequence_length, or a shorter prompt."
            )

    def _reference_latents(self, session, reasoning, reference_area, max_history_images, device):
        """`(session, [(image, latents (1, N, C), (width, height)), ...])`: the current image first, then history.

        Only the references used are looked at: a turn's carried latent, or the source's latent (VAE-encoded once and
        kept in the returned session). A turn without latents (a session built elsewhere) is encoded here.
        """
        # indices into [source, turn images...], oldest first; -1 is the current image
        images = [session.source_image] + [t.image for t in session.turns if t.image is not None]
        latents = [None] + [t.latents for t in session.turns if t.image is not None]
        chosen = [len(images) - 1]
        if reasoning == "history" and max_history_images > 0:
            chosen += list(range(len(images) - 1))[-max_history_images:]
        restored_source = session.state_origin() == 0  # the current image is the source, restored by an undo

        references = []
        for index in chosen:
            if index == 0 or (index == len(images) - 1 and restored_source):
                session, source_latents, size = self._source_latents(session, reference_area, device)
                references.append((session.source_image, source_latents, size))
                continue
            turn_latents = latents[index]
            if turn_latents is None:
                turn_latents = self.encode_image(images[index], session.size[1], session.size[0], device=device)
            references.append((images[index], turn_latents, session.size))
        return session, references

    def _source_latents(self, session, reference_area, device):
        """The source's reference latent at `reference_area` pixels (or the working size): reused when the session
        holds it at that size, else encoded and stored in the returned session (`meta["source_latents_size"]`)."""
        size = session.size
        if reference_area is not None:
            size = tuple(calculate_dimensions(reference_area, session.size[0] / session.size[1]))
        stored = session.meta.get("source_latents_size")
        if session.source_latents is not None and stored is not None and tuple(stored) == size:
            return session, session.source_latents, size
        source_latents = self.encode_image(session.source_image, size[1], size[0], device=device)
        meta = {**session.meta, "source_latents_size": list(size)}
        session = replace(session, source_latents=source_latents, meta=meta)
        return session, source_latents, size

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The initial noise, packed: `(B, (H/16) * (W/16), 4C)` for the real VAE (upstream's `prepare_latents`)."""
        latents, _ = QwenImageEditPlusPipeline.prepare_latents(
            self, None, batch_size, num_channels_latents, height, width, dtype, device, generator, latents
        )
        return latents

    def prepare_timesteps(
        self,
        num_inference_steps: int,
        image_seq_len: int,
        device: torch.device | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the scheduler's timesteps as [`__call__`] does (resolution-dependent shift `mu`).

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `timesteps` `(N,)` in the scheduler's units (`sigma * 1000`) and the
            sigma schedule `(N + 1,)` from 1 to 0, i.e. step `i` moves from `sigmas[i]` to `sigmas[i + 1]`.
        """
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps, self.scheduler.sigmas

    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: TurnConditioning,
        true_cfg_scale: float = 1.0,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        r"""The transformer's velocity for the noisy target `latents` `(B, N, C)` at `timestep` `(B,)`.

        `timestep` is in the scheduler's units (`sigma * 1000`). With `true_cfg_scale > 1` and negative embeddings in
        `conditioning`, applies Qwen-Image's true CFG with norm rescaling: `v = v_neg + s (v_cond - v_neg)`, rescaled
        to `|v_cond|` per token. The references ride along in the sequence and are sliced off the output.

        Returns:
            `torch.Tensor` `(B, N, C)`, in the transformer's dtype.
        """
        noise_pred = self._transformer_velocity(latents, timestep, conditioning, guidance, attention_kwargs)
        if true_cfg_scale <= 1 or conditioning.negative_prompt_embeds is None:
            return noise_pred

        neg_noise_pred = self._transformer_velocity(
            latents, timestep, conditioning, guidance, attention_kwargs, negative=True
        )
        comb_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
        cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)  # (B, N, 1)
        noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
        return comb_pred * (cond_norm / noise_norm)

    def _transformer_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: TurnConditioning,
        guidance: torch.Tensor | None,
        attention_kwargs: dict[str, Any] | None,
        negative: bool = False,
    ) -> torch.Tensor:
        """One transformer pass of [`predict_velocity`]: conditioned on the prompt (`negative=False`, cache "cond") or
        on the negative prompt (cache "uncond"); the reference tokens are sliced off the output `(B, N, C)`."""
        prompt_embeds, prompt_embeds_mask = conditioning.prompt_embeds, conditioning.prompt_embeds_mask
        if negative:
            prompt_embeds = conditioning.negative_prompt_embeds
            prompt_embeds_mask = conditioning.negative_prompt_embeds_mask
        batch_size, num_latents = latents.shape[:2]
        references = conditioning.image_latents.expand(batch_size, -1, -1)  # (B, N_ref, C)
        # the transformer's compute dtype (a no-op unless components were loaded with different dtypes, e.g.
        # torch_dtype={"transformer": torch.bfloat16, "default": torch.float32}, or with layerwise casting)
        dtype = self.transformer.dtype
        latent_model_input = torch.cat([latents, references], dim=1).to(dtype)  # (B, N + N_ref, C)
        with self.transformer.cache_context("uncond" if negative else "cond"):
            noise_pred = self.transformer(
                hidden_states=latent_model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=prompt_embeds_mask,
                encoder_hidden_states=prompt_embeds.to(dtype),
                img_shapes=conditioning.img_shapes * batch_size,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
        return noise_pred[:, :num_latents]

    def velocity_fn(
        self,
        conditioning: TurnConditioning,
        true_cfg_scale: float = 1.0,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """[`predict_velocity`] as `velocity_fn(x, sigma) -> v`, the contract of `editr2.flow.sample`.

        `sigma` is a float or a 0-dim / `(B,)` tensor from [`prepare_timesteps`]'s sigmas; it is converted to the
        transformer's timestep exactly as the scheduler does (`sigma * num_train_timesteps`), so `editr2.flow.sample`
        with no SDE steps reproduces [`__call__`]'s latents.
        """
        num_train_timesteps = self.scheduler.config.num_train_timesteps

        def velocity(x: torch.Tensor, sigma) -> torch.Tensor:
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
            timestep = (sigma * num_train_timesteps).to(x.dtype)  # (B,)
            return self.predict_velocity(x, timestep, conditioning, true_cfg_scale, guidance, attention_kwargs)

        return velocity

    # ------------------------------------------------------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------------------------------------------------------

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed, normalised latents `(B, N, C)` -> images `(B, 3, H, W)` in [-1, 1]."""
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)  # (B, C, 1, h, w)
        latents = latents.to(self.vae.dtype)
        latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, self.vae.config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, self.vae.config.z_dim, 1, 1, 1)
        latents_mean = latents_mean.to(latents.device, latents.dtype)
        latents_std = latents_std.to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        return self.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def finish_turn(
        self,
        conditioning: TurnConditioning,
        latents: torch.Tensor,
        instruction: str,
        intent: Intent,
        decoded: torch.Tensor | None = None,
        seed: int | None = None,
        timings: dict[str, float] | None = None,
        meta: dict | None = None,
    ) -> Session:
        """The new session: `conditioning.session` plus a [`Turn`] holding the image and its latent `(1, N, C)`."""
        latents = latents.detach()
        with torch.no_grad():
            if decoded is None:
                decoded = self.decode_latents(latents, conditioning.height, conditioning.width)
            image = self.image_processor.postprocess(decoded.detach(), output_type="pil")[0]
        turn = Turn(
            instruction=instruction,
            image=image,
            intent=intent.text,
            reasoning=intent.reasoning,
            fallback_reason=intent.fallback_reason,
            seed=seed,
            timings=dict(timings or {}),
            latents=latents,
            meta=dict(meta or {}),
        )
        return conditioning.session.append(turn)

    def restore_turn(
        self,
        session: Session,
        instruction: str,
        intent: Intent,
        timings: dict[str, float] | None = None,
        meta: dict | None = None,
    ) -> Session:
        """The new session for an intent that names an earlier state (`intent.restore`): a turn holding that state's
        image and carried latent, the same objects ([`~editr2.session.Session.restore`]); no model runs."""
        if intent.restore is None:
            raise ValueError("`intent.restore` is None: this intent is an edit; pass it to `__call__` instead.")
        return session.restore(
            intent.restore,
            instruction,
            intent.text,
            reasoning=intent.reasoning,
            fallback_reason=intent.fallback_reason,
            timings=dict(timings or {}),
            meta=dict(meta or {}),
        )

    def _restored_output(self, session: Session, output_type: str, device):
        """The images `__call__` returns for a restore turn: the restored image (or its latent) as `output_type`."""
        turn = session.turns[-1]
        if output_type == "latent":
            if turn.latents is not None:
                return turn.latents
            return self.encode_image(turn.image, session.size[1], session.size[0], device=device)
        if output_type == "pil":
            return [turn.image]
        array = self.image_processor.pil_to_numpy([turn.image])
        return array if output_type == "np" else self.image_processor.numpy_to_pt(array)

    # ------------------------------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | None = None,
        prompt: str | None = None,
        session: Session | None = None,
        *,
        reasoning: str = "intent",
        negative_prompt: str | None = None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        template: str | None = None,
        max_history_images: int = 2,
        reference_area: int | None = VAE_IMAGE_SIZE,
        condition_area: int = CONDITION_IMAGE_SIZE,
        keep_unedited: float | None = None,
        reasoning_condition_area: int | None = None,
    ) -> EditR2PipelineOutput | tuple:
        r"""Run one editing turn: start a session from `image`, or continue `session`.

        Args:
            image (`PIL.Image.Image`, *optional*):
                The image to edit; starts a new session. RGB (greyscale/palette are converted; alpha and 16-bit are
                refused). Pass either `image` or `session`.
            prompt (`str`):
                This turn's editing instruction.
            session ([`~editr2.session.Session`], *optional*):
                The session to continue (e.g. `out.session`). It is never modified: the call returns a new session, so
                the same session can be continued in several ways (branching) or truncated (undo).
            reasoning (`str`, defaults to `"intent"`):
                How the history reaches the editor: `"intent"` (the VLM writes the operative intent first),
                `"history"` (all instructions + up to `max_history_images` earlier images) or `"none"` (the current
                instruction only, exactly diffusers' `QwenImageEditPlusPipeline`). With `"intent"`, an intent that
                names an earlier session state ("Restore the image from before turn 3.", "Undo the last edit.", see
                `editr2.intent.parse_restore`) is an exact undo: the new turn holds that state's image and carried
                latent unchanged (`Turn.restored_from`), and neither the transformer nor the VAE runs.
            negative_prompt (`str`, *optional*):
                Enables true classifier-free guidance together with `true_cfg_scale > 1` (`" "` is enough).
            true_cfg_scale (`float`, defaults to 4.0):
                True CFG scale (a finite number). Without a `negative_prompt` CFG is off and a warning says so: a known
                cause of drift over many turns.
            height (`int`, *optional*), width (`int`, *optional*):
                The working size of a new session (default: the image's aspect ratio at `reference_area` pixels).
                A continued session keeps its size; passing another one is an error.
            num_inference_steps (`int`, defaults to 50): denoising steps.
            sigmas (`list[float]`, *optional*): custom sigmas for the scheduler.
            guidance_scale (`float`, *optional*): for guidance-distilled transformers only.
            generator (`torch.Generator`, *optional*): seeds the noise (and reasoning samples when `temperature > 0`).
            latents (`torch.Tensor`, *optional*): pre-generated packed noise `(1, N, C)`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (packed latents; the
                session's turn still holds the decoded image).
            return_dict (`bool`, defaults to True): return an [`EditR2PipelineOutput`] rather than a tuple.
            attention_kwargs (`dict`, *optional*): passed to the transformer's attention processors.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, step, timestep, callback_kwargs) -> dict`,
                called after every denoising step with the tensors named in `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): from `_callback_tensor_inputs`.
            max_sequence_length (`int`, defaults to 512): the most tokens of the text that conditions the edit (the
                prompt, the `"history"` text or the intent; at most 1024). A longer one is refused with a `ValueError`
                before any model runs, never truncated. (diffusers' QwenImageEditPlusPipeline checks only the bound.)
            max_new_tokens (`int`, defaults to 256): reasoning budget (`reasoning="intent"`).
            temperature (`float`, defaults to 0): reasoning temperature; 0 decodes greedily.
            template (`str`, *optional*): the reasoning request template (see `editr2.intent.build_messages`).
            max_history_images (`int`, defaults to 2): earlier images given as references with `reasoning="history"`.
            reference_area (`int` or None, defaults to 1024*1024): pixels of the source's VAE reference (upstream's
                value); None encodes it at the working size. Later turns always use the carried latent.
            condition_area (`int`, defaults to 384*384): pixels of the images shown to the text encoder.
            keep_unedited (`float`, *optional*): copy the current image's latent back wherever the sampled latent
                differs from it by at most this RMS change per latent pixel (normalised latent units; the changed
                region grows by one latent pixel first), so what the edit did not touch stays exactly as it was
                however many turns follow (`editr2.unedited.keep_unedited`). Needs the current image's reference at
                the working size (continued turns always; a new session with `reference_area=None` or an image of
                `reference_area` pixels). The turn's `meta["edited_fraction"]` records the share of latent pixels
                kept as sampled. None (default) leaves the sample as it is, as upstream.
            reasoning_condition_area (`int`, *optional*): pixels of the current image shown to the [`reasoner`] when
                it writes the intent; None (default) uses `condition_area`. A separate `reasoning_model` may have been
                trained at another size than the text encoder (its folder's call defaults say which).

        Examples:

        Returns:
            [`EditR2PipelineOutput`] or `tuple`: `(images, intents, session)` when `return_dict` is False.
        """
        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            image,
            session,
            reasoning,
            height,
            width,
            negative_prompt=negative_prompt,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            max_history_images=max_history_images,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            true_cfg_scale=true_cfg_scale,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            template=template,
            reference_area=reference_area,
            condition_area=condition_area,
            keep_unedited=keep_unedited,
            reasoning_condition_area=reasoning_condition_area,
        )
        if true_cfg_scale > 1 and negative_prompt is None:
            logger.warning(
                f"true_cfg_scale is passed as {true_cfg_scale}, but classifier-free guidance is not enabled since no "
                "negative_prompt is provided (pass negative_prompt=' ' to enable it, or true_cfg_scale=1 to silence "
                "this). Without CFG, Qwen-Image-Edit is known to drift over many turns."
            )
        elif true_cfg_scale <= 1 and negative_prompt is not None:
            logger.warning("negative_prompt is passed but classifier-free guidance is off since true_cfg_scale <= 1")
        do_true_cfg = true_cfg_scale > 1 and negative_prompt is not None

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        timings = {}
        start = _sync(device)

        # 2. Define the session: a new one from `image` (at the working size), or the one to continue
        if session is None:
            session = self.start_session(image, height, width, reference_area)
        if keep_unedited is not None:
            self._check_reference_at_working_size(session, reference_area)

        # 3. Reconstruct the operative intent (or take the instruction / the history as it is)
        if reasoning == "intent":
            area = self.reasoning_area(condition_area, reasoning_condition_area)
            intent = self.reason(session, prompt, max_new_tokens, temperature, template, area, generator=generator)
            text = intent.text
        else:
            text = history_prompt(session.instructions, prompt) if reasoning == "history" else prompt
            intent = Intent(text)
        timings["reasoning"] = _sync(device) - start

        # 3b. An intent naming an earlier state restores it exactly: no transformer, no VAE, nothing to redraw
        if intent.restore is not None:
            timings["total"] = _sync(device) - start
            meta = {"reasoning": reasoning, "restored_from": intent.restore, "conditioning": intent.text}
            new_session = self.restore_turn(session, prompt, intent, timings, meta)
            images = self._restored_output(new_session, output_type, device)
            self.maybe_free_model_hooks()
            if not return_dict:
                return (images, [intent.text], new_session)
            return EditR2PipelineOutput(images=images, intents=[intent.text], session=new_session)

        # 4. Encode the prompt and prepare the reference latents (carried from the previous turn)
        conditioning = self.prepare_conditioning(
            session,
            text,
            reasoning,
            negative_prompt if do_true_cfg else None,
            reference_area,
            condition_area,
            max_history_images,
            max_sequence_length,
            device,
        )
        height, width = conditioning.height, conditioning.width
        timings["encode"] = _sync(device) - start - timings["reasoning"]

        # 5. Prepare latent variables
        num_channels_latents = self.transformer.config.in_channels // 4
        latents = self.prepare_latents(
            1, num_channels_latents, height, width, conditioning.prompt_embeds.dtype, device, generator, latents
        )

        # 6. Prepare timesteps
        timesteps, _ = self.prepare_timesteps(num_inference_steps, latents.shape[1], device, sigmas)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        if self.transformer.config.guidance_embeds and guidance_scale is None:
            raise ValueError("guidance_scale is required for a guidance-distilled transformer; pass guidance_scale=.")
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])
        elif guidance_scale is not None:
            logger.warning(
                f"guidance_scale is passed as {guidance_scale}, but ignored since the model is not guidance-distilled."
            )

        # 7. Denoising loop (diffusers' scheduler integrates the ODE)
        self.scheduler.set_begin_index(0)
        prompt_embeds = conditioning.prompt_embeds
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(latents.shape[0]).to(latents.dtype)  # (B,)
                noise_pred = self.predict_velocity(
                    latents,
                    timestep,
                    conditioning,
                    true_cfg_scale if do_true_cfg else 1.0,
                    guidance,
                    self.attention_kwargs,
                )
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    conditioning.prompt_embeds = prompt_embeds

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        meta = {"reasoning": reasoning, "num_inference_steps": num_inference_steps, "conditioning": text}
        if keep_unedited is not None:  # the current image is the first reference, at the working size (checked)
            latents, edited = self.keep_unedited(latents, conditioning.image_latents, height, width, keep_unedited)
            meta["edited_fraction"] = float(edited.float().mean())
        timings["denoise"] = _sync(device) - start - timings["reasoning"] - timings["encode"]
        check_finite_latents(latents, conditioning.session.num_turns + 1)

        # 8. Decode, and append the turn (image + latent) to a new session
        decoded = self.decode_latents(latents, height, width)
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        timings["decode"] = _sync(device) - start - sum(timings.values())
        timings["total"] = _sync(device) - start
        seed = generator.initial_seed() if isinstance(generator, torch.Generator) else None
        new_session = self.finish_turn(conditioning, latents, prompt, intent, decoded, seed, timings, meta)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images, [intent.text], new_session)
        return EditR2PipelineOutput(images=images, intents=[intent.text], session=new_session)

    def edit_session(
        self,
        image: PIL.Image.Image | None = None,
        prompts: Sequence[str] = (),
        session: Session | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ) -> EditR2PipelineOutput | tuple:
        r"""Run a scripted multi-turn session: one [`__call__`] per prompt, each continuing the previous turn.

        Gives the same results as chaining `__call__` by hand with the same arguments.

        Args:
            image (`PIL.Image.Image`, *optional*): the source image (or pass `session=` to continue one).
            prompts (`Sequence[str]`): the instructions, one per turn.
            session ([`~editr2.session.Session`], *optional*): a session to continue instead of starting from `image`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator shared by the turns in
                order, or one generator per turn (so that a turn does not depend on how many came before).
            kwargs: any other argument of [`__call__`], applied to every turn.

        Returns:
            [`EditR2PipelineOutput`]: every turn's image (a list, or stacked for `"np"`/`"pt"`/`"latent"`), every
            turn's intent, and the final session.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of instructions, one per turn, e.g. ['a', 'b'].")
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        if len(generators) != len(prompts):
            raise ValueError(f"Pass one generator per prompt ({len(prompts)}), got {len(generators)}.")
        images, intents = [], []
        for prompt, turn_generator in zip(prompts, generators):
            out = self(
                image=image if session is None else None,
                prompt=prompt,
                session=session,
                generator=turn_generator,
                output_type=output_type,
                **kwargs,
            )
            session = out.session
            images.append(out.images)
            intents += out.intents
        if output_type == "pil":
            images = [im for turn_images in images for im in turn_images]
        elif output_type == "np":
            images = np.concatenate(images)
        else:
            images = torch.cat(images)
        if not return_dict:
            return (images, intents, session)
        return EditR2PipelineOutput(images=images, intents=intents, session=session)


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")
    return {k: kwargs[k] for k in keys if k in kwargs}


# ----------------------------------------------------------------------------------------------------------------------
# Reasoning prefix cache
# ----------------------------------------------------------------------------------------------------------------------


class ReasoningPrefixCache:
    """Reuse of the reasoning prompt's key/value cache across turns.

    Consecutive reasoning requests of a session share a long text prefix: the system prompt and the earlier turns'
    instructions (`editr2.intent.build_messages`; the current image is placed after the text). After each request
    this cache keeps the text encoder's key/value cache of the request's text up to its first vision token, cropped
    from the cache `generate` returns (no extra forward pass). The next request reuses the longest common prefix and
    prefills only the rest: its new history line, the instruction and the image.

    It is exact where transformers allows it: Qwen2.5-VL's 3D (M-RoPE) positions of text *before* the first image are
    plain token indices, so the cached keys are the ones a full prefill computes; everything from the first vision
    token on is recomputed, and transformers' `generate` rebuilds the 3D positions of the uncached part from the full
    `input_ids`. The cache is dropped when the text encoder's weights change in place (tensor version counters: an
    optimizer step, `load_state_dict`), when its adapters are switched on or off, when it moves to another device or
    dtype, or when another model is used.

    Args:
        min_tokens (`int`, defaults to 8): shorter common prefixes are not worth reusing.
    """

    def __init__(self, min_tokens: int = 8):
        self.min_tokens = min_tokens
        self.clear()

    def clear(self) -> None:
        self._ids, self._cache, self._key = None, None, None
        self.last_reused = 0  # tokens the last lookup served from the cache (0: a full prefill)

    @staticmethod
    def _model_key(model: torch.nn.Module) -> tuple:
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapters = tuple(
            (m.disable_adapters, tuple(m.active_adapters)) for m in model.modules() if isinstance(m, BaseTunerLayer)
        )[:1]
        first = next(model.parameters())
        # inference tensors (weights moved by offload hooks under torch.inference_mode, as ComfyUI runs nodes) have
        # no version counter: their storage stands in for it (a move or a new tensor gives a new one)
        versions = tuple(p.data_ptr() if p.is_inference() else p._version for p in model.parameters())
        return id(model), first.device, first.dtype, adapters, versions

    @staticmethod
    def _text_prefix(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids[0]  # (L,)
        vision = (ids == model.config.vision_start_token_id).nonzero()
        return ids[: int(vision[0])] if len(vision) else ids[:-1]

    def lookup(self, model: torch.nn.Module, inputs) -> Any | None:
        """A cache holding the longest reusable prefix of `inputs` (to pass to `generate`), or None."""
        self.last_reused = 0
        if self._cache is None or inputs["input_ids"].shape[0] != 1 or self._key != self._model_key(model):
            self.clear()
            return None
        prefix = self._text_prefix(model, inputs["input_ids"])
        length = min(len(prefix), len(self._ids))
        mismatch = (prefix[:length] != self._ids[:length]).nonzero()
        common = int(mismatch[0]) if len(mismatch) else length
        if common < self.min_tokens:
            return None
        cache, self._cache, self._ids = self._cache, None, None  # handed over: generate extends it in place
        cache.crop(common - cache.get_seq_length())
        self.last_reused = common
        return cache

    def store(self, model: torch.nn.Module, inputs, past_key_values) -> None:
        """Keep the text-prefix part of the cache `generate` returned for `inputs`."""
        if past_key_values is None or inputs["input_ids"].shape[0] != 1:
            self.clear()
            return
        prefix = self._text_prefix(model, inputs["input_ids"])
        past_key_values.crop(len(prefix) - past_key_values.get_seq_length())
        self._ids, self._cache, self._key = prefix.clone(), past_key_values, self._model_key(model)

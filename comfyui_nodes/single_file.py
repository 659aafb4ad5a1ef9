"""Loading Qwen-Image-Edit from the split single files ComfyUI users keep, instead of a diffusers folder.

ComfyUI keeps the model as three files, each in its own models folder (`folder_paths`):

- `models/diffusion_models/` (or `unet/`): the transformer, e.g. `qwen_image_edit_2509_fp8_e4m3fn.safetensors` or
  `qwen_image_edit_2511_bf16.safetensors`. Keys are diffusers' `QwenImageTransformer2DModel` names, sometimes with
  a `model.diffusion_model.` prefix; loaded with diffusers' `QwenImageTransformer2DModel.from_single_file`.
- `models/text_encoders/` (or `clip/`): Qwen2.5-VL-7B, e.g. `qwen_2.5_vl_7b_fp8_scaled.safetensors`, in the original
  Qwen2.5-VL checkpoint layout. transformers has no single-file loader, so the keys are mapped
  (`TEXT_ENCODER_KEY_MAP`: `model.*` -> `model.language_model.*`, `visual.*` -> `model.visual.*`, `lm_head.*` kept).
- `models/vae/`: `qwen_image_vae.safetensors`, in the original Wan 2.1 VAE layout (`encoder.downsamples.*`,
  `decoder.upsamples.*`, `conv1`/`conv2`, ...). diffusers' `AutoencoderKLQwenImage` has no `from_single_file`; it
  is the same network as `AutoencoderKLWan`, so the file goes through diffusers' Wan-VAE key conversion
  (`convert_wan_vae_to_diffusers`).

The configs (no weights, a few KB of JSON) ship in `comfyui_nodes/configs/<release>/`: `qwen-image-edit-2509` and
`qwen-image-edit-2511` (its transformer sets `zero_cond_t`). More config folders (the same layout) can be put in
`models/editr2/configs/`. With `config="auto"`, a transformer file that holds ComfyUI's `__index_timestep_zero__`
marker, or whose name contains `2511`, picks 2511, anything else 2509; the marker also switches `zero_cond_t` on for
an explicitly chosen config. The tokenizer comes from the config folder's `tokenizer/` when it has one, else from
ComfyUI's own copy of the Qwen2.5 tokenizer (`comfy/text_encoders/qwen25_tokenizer`).

Weights stored as fp8 are cast to the chosen dtype on load. ComfyUI's "scaled" fp8 files (a `scaled_fp8` key and a
`<layer>.scale_weight`, or `<layer>.weight_scale`, per quantised weight) are dequantised: `weight * scale`. Any prefix
a file puts before the model's keys (e.g. `model.diffusion_model.`) is removed.

ComfyUI's Qwen2.5-VL files may leave out the language-model head (`lm_head.weight`): ComfyUI only encodes prompts
with it. Such a text encoder still encodes prompts, but cannot write the reasoning (`reasoning="intent"`); the model
then reports `can_reason=False` and Edit Turn asks for `history` / `none` or a text-encoder file with the head.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import folder_paths
import torch

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / "configs"
RELEASES = ("qwen-image-edit-2509", "qwen-image-edit-2511")
AUTO = "auto"
USER_CONFIGS = "configs"  # models/editr2/configs/<name>/: more config folders
# which ComfyUI model folder (folder_paths key) each file is picked from
FOLDERS = {"diffusion_model": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
ZERO_COND_T_MARKER = "__index_timestep_zero__"  # ComfyUI's marker key in Qwen-Image-Edit-2511 transformer files
# keys that end a file's prefix (e.g. `model.diffusion_model.`), so any prefix in front of them can be removed
TRANSFORMER_ANCHOR = "img_in.weight"
TEXT_ENCODER_ANCHOR = "model.embed_tokens.weight"
# the original Qwen2.5-VL checkpoint layout (ComfyUI's files) -> transformers' Qwen2_5_VLForConditionalGeneration
TEXT_ENCODER_KEY_MAP = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)


# ----------------------------------------------------------------------------------------------------------------------
# What the user can pick


def list_files(kind: str) -> list[str]:
    """The `.safetensors` files in ComfyUI's folder for `kind` (`diffusion_model`, `text_encoder` or `vae`)."""
    folder = FOLDERS[kind]
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [name for name in names if name.endswith(".safetensors")]


def _user_config_dirs() -> list[pathlib.Path]:
    from .model import MODEL_FOLDER

    found = []
    for base in folder_paths.get_folder_paths(MODEL_FOLDER):
        configs = pathlib.Path(base) / USER_CONFIGS
        if configs.is_dir():
            found += [p for p in sorted(configs.iterdir()) if (p / "transformer" / "config.json").is_file()]
    return found


def list_configs() -> list[str]:
    """`auto`, the shipped releases, then the config folders in models/editr2/configs/."""
    names = [AUTO, *RELEASES]
    return names + [p.name for p in _user_config_dirs() if p.name not in names]


def resolve_file(kind: str, name: str) -> pathlib.Path:
    """The full path of the file `name` picked for `kind`; a `FileNotFoundError` says where it was looked for."""
    if kind not in FOLDERS:
        raise ValueError(f"kind must be one of {list(FOLDERS)}, got {kind!r}")
    if not name or not name.endswith(".safetensors"):
        raise ValueError(f"pick a .safetensors file for the {kind.replace('_', ' ')}, got {name!r}")
    path = folder_paths.get_full_path(FOLDERS[kind], name)
    if path is None:
        places = ", ".join(folder_paths.get_folder_paths(FOLDERS[kind]))
        raise FileNotFoundError(f"'{name}' was not found in ComfyUI's {FOLDERS[kind]} folders ({places}).")
    return pathlib.Path(path)


def is_2511(diffusion_model: str, keys) -> bool:
    """Whether a transformer file is Qwen-Image-Edit-2511 (ComfyUI's marker key, or `2511` in its name)."""
    return any(key.endswith(ZERO_COND_T_MARKER) for key in keys) or "2511" in pathlib.PurePath(diffusion_model).name


def resolve_config(config: str, diffusion_model: str = "", keys=()) -> pathlib.Path:
    """The config folder for `config` (`auto`: the release the transformer file is, see [`is_2511`])."""
    if config == AUTO:
        config = RELEASES[1] if is_2511(diffusion_model, keys) else RELEASES[0]
    if config in RELEASES:
        return CONFIGS_DIR / config
    for path in _user_config_dirs():
        if path.name == config:
            return path
    raise ValueError(f"config must be one of {list_configs()}, got {config!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Key mappings


def read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def strip_prefix(state_dict: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Removes the prefix a file puts before every key (found from the key ending in `anchor`), if any."""
    found = [key[: -len(anchor)] for key in state_dict if key == anchor or key.endswith("." + anchor)]
    prefix = min(found, key=len) if found else ""
    if not prefix:
        return state_dict
    return {key[len(prefix):] if key.startswith(prefix) else key: tensor for key, tensor in state_dict.items()}


QUANT_KEYS = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")


def dequantize(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 (`<layer>.scale_weight` or `<layer>.weight_scale`, `scaled_fp8`) dequantised, and every
    float cast to `dtype`."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "scaled_fp8" or key.endswith(QUANT_KEYS):
            continue
        scale = None
        if key.endswith(".weight"):
            scale = state_dict.get(key[: -len("weight")] + "scale_weight", state_dict.get(key + "_scale"))
        if scale is not None:
            tensor = tensor.to(torch.float32) * scale.to(torch.float32)
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def transformer_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A ComfyUI transformer file's tensors under diffusers' names (prefix and 2511 marker removed)."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(ZERO_COND_T_MARKER)}
    return dequantize(strip_prefix(state_dict, TRANSFORMER_ANCHOR), dtype)


def text_encoder_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Qwen2.5-VL file in the original checkpoint layout under transformers' names (`TEXT_ENCODER_KEY_MAP`)."""
    out = {}
    for key, tensor in dequantize(strip_prefix(state_dict, TEXT_ENCODER_ANCHOR), dtype).items():
        for pattern, replacement in TEXT_ENCODER_KEY_MAP:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out


def vae_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Wan 2.1 layout VAE file under `AutoencoderKLQwenImage`'s names (diffusers' Wan-VAE conversion)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state_dict):
        return dequantize(state_dict, dtype)  # already in diffusers' layout
    return dequantize(convert_wan_vae_to_diffusers(state_dict), dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Components


def _load_strict(model: torch.nn.Module, state_dict: dict, what: str, allow_missing: tuple[str, ...] = ()) -> set:
    """`load_state_dict(assign=True)` that names the unexpected and missing keys; returns the allowed missing ones."""
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = set(result.missing_keys) - set(allow_missing)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The {what} file does not fit the config: {len(missing)} missing keys (e.g. {sorted(missing)[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {sorted(result.unexpected_keys)[:3]}). Pick the "
            "matching file, or the config of the release it belongs to."
        )
    return set(result.missing_keys) & set(allow_missing)


def load_transformer(path: pathlib.Path, config_dir: pathlib.Path, dtype: torch.dtype, state_dict=None):
    from diffusers import QwenImageTransformer2DModel

    state_dict = read_safetensors(path) if state_dict is None else state_dict
    overrides = {"zero_cond_t": True} if is_2511("", state_dict) else {}
    converted = transformer_state_dict(state_dict, dtype)
    return QwenImageTransformer2DModel.from_single_file(
        converted, config=str(config_dir), subfolder="transformer", torch_dtype=dtype, **overrides
    ).eval()


def load_vae(path: pathlib.Path, config_dir: pathlib.Path, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage

    config = AutoencoderKLQwenImage.load_config(config_dir / "vae")
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLQwenImage.from_config(config)
    _load_strict(vae, vae_state_dict(read_safetensors(path), dtype), "VAE")
    return vae.eval()


def load_text_encoder(path: pathlib.Path, config_dir: pathlib.Path, dtype: torch.dtype):
    """`(text_encoder, has_lm_head)`. Without `lm_head.weight` in the file the head is tied to the input embeddings
    (no memory) only so the model is complete; it then must not generate (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(config_dir / "text_encoder")
    with init_empty_weights(include_buffers=False):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    state_dict = text_encoder_state_dict(read_safetensors(path), dtype)
    missing = _load_strict(model, state_dict, "text encoder", allow_missing=("lm_head.weight",))
    if missing:
        model.lm_head.weight = model.get_input_embeddings().weight
    if (config_dir / "text_encoder" / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(config_dir / "text_encoder")
    return model.eval(), not missing


def _tokenizer_dir(config_dir: pathlib.Path) -> pathlib.Path:
    if (config_dir / "tokenizer").is_dir():
        return config_dir / "tokenizer"
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.submodule_search_locations:
        comfy_copy = pathlib.Path(list(spec.submodule_search_locations)[0]) / "text_encoders" / "qwen25_tokenizer"
        if comfy_copy.is_dir():
            return comfy_copy
    raise FileNotFoundError(
        f"No Qwen2.5 tokenizer: {config_dir / 'tokenizer'} does not exist and this ComfyUI has no "
        "comfy/text_encoders/qwen25_tokenizer; copy the tokenizer files (vocab.json, merges.txt, "
        "tokenizer_config.json) of Qwen/Qwen-Image-Edit-2509 into the config folder's tokenizer/."
    )


def load_processor(config_dir: pathlib.Path):
    """`(tokenizer, processor)`: the Qwen2.5 tokenizer and the image-only Qwen2-VL processor of the config."""
    from transformers import Qwen2Tokenizer

    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor, Qwen2VLImageProcessorPil

    tokenizer = Qwen2Tokenizer.from_pretrained(_tokenizer_dir(config_dir))
    settings = json.loads((config_dir / "processor" / "preprocessor_config.json").read_text())
    keys = ("patch_size", "temporal_patch_size", "merge_size", "size", "image_mean", "image_std")
    image_processor = Qwen2VLImageProcessorPil(**{k: settings[k] for k in keys if k in settings})
    processor = Qwen2VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return tokenizer, processor


def load_pipeline(diffusion_model: str, text_encoder: str, vae: str, config: str = AUTO,
                  dtype: torch.dtype = torch.bfloat16):
    """`(EditR2Pipeline, has_lm_head, config_dir)` from ComfyUI's three files (names as the dropdowns list them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_editr2 import EditR2Pipeline

    paths = {kind: resolve_file(kind, name) for kind, name in
             (("diffusion_model", diffusion_model), ("text_encoder", text_encoder), ("vae", vae))}
    transformer_tensors = read_safetensors(paths["diffusion_model"])
    config_dir = resolve_config(config, diffusion_model, transformer_tensors.keys())
    transformer = load_transformer(paths["diffusion_model"], config_dir, dtype, transformer_tensors)
    del transformer_tensors
    text_encoder_model, has_lm_head = load_text_encoder(paths["text_encoder"], config_dir, dtype)
    tokenizer, processor = load_processor(config_dir)
    pipeline = EditR2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler"),
        vae=load_vae(paths["vae"], config_dir, dtype),
        text_encoder=text_encoder_model,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    return pipeline, has_lm_head, config_dir

"""Tiny random Qwen-Image-Edit components: the builders every test, benchmark and example uses.

Everything here is built locally from configs, with no download:

- [`tiny_tokenizer`]: a byte-level BPE trained with the `tokenizers` library on a small built-in corpus of
  instruction-like English, with Qwen2.5-VL's special tokens, `<think>`/`</think>` and a Qwen-style chat template.
  Training is deterministic, so the saved files are byte-identical from run to run.
- [`tiny_processor`]: the image-only Qwen2-VL processor ([`Qwen2VLImageOnlyProcessor`]) with a small patch size.
- [`tiny_components`]: the six components exactly as `QwenImageEditPlusPipeline` registers them, at tiny sizes.
- [`tiny_pipeline`]: an [`EditR2Pipeline`] of those components.
- [`save_qwen_image_edit_plus_layout`]: a folder laid out like the real `Qwen/Qwen-Image-Edit-2509` or `-2511`
  repository (`model_index.json` naming `QwenImageEditPlusPipeline`, the same subfolders and file names), at tiny size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

# Qwen2.5-VL's special tokens, in the order of the real tokenizer; `<|endoftext|>` is id 0 here.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Reasoning tags: added tokens that are *not* special, so `decode(..., skip_special_tokens=True)` keeps them.
THINK_TOKENS = ("<think>", "</think>")
TINY_VOCAB_SIZE = 1024
TINY_REASONER_VOCAB_SIZE = 400  # a separate tiny reasoner's own tokenizer (the corpus saturates at ~550)

# A Qwen2-VL style chat template: string or list content, `{"type": "image"}` items become a vision placeholder.
CHAT_TEMPLATE = r"""{%- for message in messages %}
{%- if loop.first and message['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['content'] is string %}{{- message['content'] }}
{%- else %}{%- for item in message['content'] %}
{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}
{%- endfor %}{%- endif %}
{{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

# Tiny sizes. The VAE compresses 4x (two down-sampling stages); the transformer packs 2x2 latent patches.
TINY_TEXT_HIDDEN = 32
TINY_PATCH_SIZE = 4  # vision patch size: a 32x32 condition image becomes 8x8 patches -> 16 merged image tokens
TINY_MIN_PIXELS = 8 * 8
TINY_MAX_PIXELS = 64 * 64


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

_COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "gray", "brown", "cyan")
_OBJECTS = (
    "sign", "ball", "square", "circle", "triangle", "star", "tree", "car", "cat", "dog", "cup", "house", "hat",
    "lamp", "flower", "chair", "book", "bird", "boat", "cloud",
)  # fmt: skip
_PLACES = ("left", "right", "top", "bottom", "center", "corner")
_SIZES = ("small", "large", "medium", "tiny", "huge")
_CLAUSES = (
    "keep everything else unchanged",
    "do not change the background",
    "only the edited object may change",
    "from now on keep the background white",
    "undo that",
    "make it a bit larger",
    "now make them the same colour",
    "the one you added first",
)


def tiny_corpus() -> list[str]:
    """The built-in training corpus of the tiny tokenizer: instruction-like English plus the prompt templates."""
    from editr2 import intent

    lines = []
    for k, (color, obj, place) in enumerate(itertools.product(_COLORS, _OBJECTS, _PLACES)):
        size = _SIZES[k % len(_SIZES)]
        clause = _CLAUSES[k % len(_CLAUSES)]
        lines.append(f"Add a {size} {color} {obj} on the {place}, {clause}.")
        if k % 3 == 0:
            lines.append(f"Change the colour of the {obj} to {color} and move it to the {place}.")
        if k % 5 == 0:
            lines.append(f"Replace the {obj} with a {color} one; remove the {size} {obj} at the {place}.")
    lines += [f"Turn {k}: make the {c} {o} {s}" for k, (c, o, s) in enumerate(zip(_COLORS, _OBJECTS, _SIZES * 4))]
    lines += [intent.SYSTEM_PROMPT, intent.DEFAULT_TEMPLATE, "Picture 1: Picture 2: Picture 3:", "<think> </think>"]
    return lines


def _train_bpe(corpus: tuple[str, ...], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a Qwen2-compatible byte-level BPE; returns `(vocab, merges)`."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    # The same normaliser and pre-tokeniser as transformers' Qwen2Tokenizer, so vocab + merges reload identically.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(QWEN_SPECIAL_TOKENS + THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


@lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _train_bpe(tuple(tiny_corpus()), vocab_size)


def _tokenizer_key(vocab_size: int) -> str:
    payload = json.dumps([tiny_corpus(), QWEN_SPECIAL_TOKENS, THINK_TOKENS, CHAT_TEMPLATE, vocab_size])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = TINY_VOCAB_SIZE):
    """A small Qwen2 tokenizer trained locally (deterministic).

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where to keep the trained files (`<cache_dir>/tiny-qwen2-tokenizer-<hash of corpus and settings>`); they
            are written once, atomically, and loaded afterwards. Without it the tokenizer is trained in memory
            (about 10 ms).
        vocab_size (`int`, defaults to 1024): total vocabulary size, special tokens included.

    Returns:
        [`~transformers.Qwen2Tokenizer`] with Qwen2.5-VL's special tokens, `<think>` / `</think>` (added, not
        special) and a chat template.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    if cache_dir is not None:
        path = Path(cache_dir) / f"tiny-qwen2-tokenizer-{_tokenizer_key(vocab_size)}"
        if not path.is_dir():
            tokenizer = tiny_tokenizer(None, vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".staging-"))
            tokenizer.save_pretrained(staging)
            try:
                staging.rename(path)
            except OSError:  # another process finished first; its files are identical
                shutil.rmtree(staging, ignore_errors=True)
        return Qwen2Tokenizer.from_pretrained(path)

    vocab, merges = _trained_bpe(vocab_size)
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Processor and models
# ---------------------------------------------------------------------------------------------------------------------


def tiny_processor(tokenizer):
    """The image-only Qwen2-VL processor with a 4-pixel patch (images of 8x8 to 64x64 pixels)."""
    from .processing import Qwen2VLImageOnlyProcessor, Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=TINY_PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )
    return Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def qwen_image_scheduler_config() -> dict:
    """The `FlowMatchEulerDiscreteScheduler` config of Qwen-Image / Qwen-Image-Edit(-2509)."""
    return {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 8192,
        "max_shift": 0.9,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": 0.02,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": True,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }


def _tiny_text_encoder(tokenizer):
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_HIDDEN,
            "patch_size": TINY_PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 4 * TINY_PATCH_SIZE,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
        do_sample=False,
    )
    return model


def _tiny_vae():
    from diffusers import AutoencoderKLQwenImage

    z_dim = 4
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        # Non-trivial statistics, so that (de)normalisation is exercised by every test.
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()


# What the transformer config of each Qwen-Image-Edit(-Plus) release sets beyond 2509's (diffusers'
# QwenImageTransformer2DModel): 2511 gives the reference-image tokens their own modulation, computed at timestep 0.
QWEN_IMAGE_EDIT_VARIANTS = {"2509": {}, "2511": {"zero_cond_t": True}}


def _check_variant(variant: str) -> None:
    if variant not in QWEN_IMAGE_EDIT_VARIANTS:
        raise ValueError(f"`variant` must be one of {list(QWEN_IMAGE_EDIT_VARIANTS)}, got {variant!r}.")


def _tiny_transformer(variant: str = "2509"):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        **QWEN_IMAGE_EDIT_VARIANTS[variant],
        patch_size=2,
        in_channels=16,  # z_dim * 2 * 2 (packed latents)
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def tiny_components(
    seed: int = 0, tokenizer_cache_dir: str | os.PathLike | None = None, variant: str = "2509"
) -> dict:
    """The six components of `QwenImageEditPlusPipeline`, tiny and random (seeded; the global RNG is untouched).

    Args:
        variant (`str`, defaults to `"2509"`): the release whose transformer config to follow, `"2509"` or `"2511"`
            (`zero_cond_t=True`, see `QWEN_IMAGE_EDIT_VARIANTS`). The weights are the same for the same seed.

    Returns:
        `dict` with `scheduler`, `vae`, `text_encoder`, `tokenizer`, `processor`, `transformer`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    _check_variant(variant)
    tokenizer = tiny_tokenizer(tokenizer_cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae()
        torch.manual_seed(seed)
        transformer = _tiny_transformer(variant)
        torch.manual_seed(seed)
        text_encoder = _tiny_text_encoder(tokenizer)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(qwen_image_scheduler_config()),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": tiny_processor(tokenizer),
        "transformer": transformer,
    }


def tiny_reasoning_components(seed: int = 1, tokenizer_cache_dir: str | os.PathLike | None = None,
                              vocab_size: int = TINY_REASONER_VOCAB_SIZE) -> dict:
    """A separate tiny reasoner: `reasoning_model` (random, seeded; the global RNG is untouched) and its
    `reasoning_processor`, with its own tokenizer (`vocab_size` tokens, unlike the text encoder's), for
    `EditR2Pipeline(**tiny_components(), **tiny_reasoning_components())`."""
    tokenizer = tiny_tokenizer(tokenizer_cache_dir, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _tiny_text_encoder(tokenizer)
    return {"reasoning_model": model, "reasoning_processor": tiny_processor(tokenizer)}


def tiny_pipeline(
    seed: int = 0,
    pipeline_class=None,
    tokenizer_cache_dir: str | os.PathLike | None = None,
    variant: str = "2509",
    reasoning_model: bool = False,
):
    """An [`EditR2Pipeline`] (or `pipeline_class`) of tiny random components; runs a 4-turn session in seconds on CPU.

    Args:
        seed (`int`, defaults to 0): seeds the random weights (same seed, same weights and saved files).
        pipeline_class (`type`, *optional*): another class taking the same six components, e.g. diffusers'
            `QwenImageEditPlusPipeline` for parity checks.
        tokenizer_cache_dir (`str`, *optional*): see [`tiny_tokenizer`].
        variant (`str`, defaults to `"2509"`): `"2509"` or `"2511"`, see [`tiny_components`].
        reasoning_model (`bool`, defaults to False): add a separate reasoner ([`tiny_reasoning_components`], seeded
            with `seed + 1`) that writes the intents.
    """
    if pipeline_class is None:
        from .pipeline_editr2 import EditR2Pipeline

        pipeline_class = EditR2Pipeline
    components = tiny_components(seed, tokenizer_cache_dir, variant)
    if reasoning_model:
        components.update(tiny_reasoning_components(seed + 1, tokenizer_cache_dir))
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# A folder laid out like the real Qwen/Qwen-Image-Edit-2509 repository
# ---------------------------------------------------------------------------------------------------------------------

QWEN_IMAGE_EDIT_PLUS_MODEL_INDEX = {
    "_class_name": "QwenImageEditPlusPipeline",
    "_diffusers_version": "0.36.0.dev0",
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def _write_tokenizer_files(tokenizer, directory: Path, with_tokenizer_json: bool) -> None:
    """Write a tokenizer the way the Qwen repositories ship it (vocab.json + merges.txt + configs)."""
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (directory / "merges.txt").write_text("\n".join(merges) + "\n")
    added = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS + THINK_TOKENS}
    (directory / "added_tokens.json").write_text(json.dumps(added, indent=2))
    specials = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    specials["additional_special_tokens"] = list(QWEN_SPECIAL_TOKENS[1:])
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    if not with_tokenizer_json:
        (directory / "tokenizer.json").unlink()


def save_qwen_image_edit_plus_layout(directory: str | os.PathLike, seed: int = 0, variant: str = "2509") -> Path:
    """Write tiny components in the layout of the real `Qwen/Qwen-Image-Edit-2509` (or `-2511`) repository.

    Both releases share the layout and `model_index.json`; 2511's transformer config adds `"zero_cond_t": true`
    (`variant="2511"`).

    The folder has the upstream `model_index.json` (`"_class_name": "QwenImageEditPlusPipeline"`, transformers'
    `Qwen2VLProcessor` and `Qwen2Tokenizer`), and the upstream file names: sharded `model-0000k-of-0000n.safetensors`
    + index for the text encoder, sharded `diffusion_pytorch_model-*.safetensors` + index for the transformer,
    `vocab.json` / `merges.txt` tokenizer files, and a `processor/` with `preprocessor_config.json`,
    `video_preprocessor_config.json` and its own tokenizer files.

    Returns:
        `Path` of the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components = tiny_components(seed, variant=variant)
    tokenizer, processor = components["tokenizer"], components["processor"]

    components["scheduler"].save_pretrained(directory / "scheduler")
    components["vae"].save_pretrained(directory / "vae")
    # Shard like upstream: 5 transformer shards, 4 text-encoder shards (shards split between tensors).
    for name, num_shards in (("transformer", 5), ("text_encoder", 4)):
        num_bytes = sum(p.numel() * p.element_size() for p in components[name].parameters())
        components[name].save_pretrained(directory / name, max_shard_size=int(num_bytes / (num_shards - 0.9)))
    _write_tokenizer_files(tokenizer, directory / "tokenizer", with_tokenizer_json=False)

    processor_dir = directory / "processor"
    _write_tokenizer_files(tokenizer, processor_dir, with_tokenizer_json=True)
    image_config = processor.image_processor.to_dict()
    image_config.update({"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"})
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, sort_keys=True))
    video_config = {k: image_config[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "size")}
    video_config.update({"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor"})
    (processor_dir / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2, sort_keys=True))
    (processor_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    for stray in ("processor_config.json",):
        (processor_dir / stray).unlink(missing_ok=True)

    (directory / "model_index.json").write_text(json.dumps(QWEN_IMAGE_EDIT_PLUS_MODEL_INDEX, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------------------------------
# Settings and inputs for tiny runs
# ---------------------------------------------------------------------------------------------------------------------

# Call arguments that keep a tiny turn at a few milliseconds: 32x32 working size, references at the working size.
TINY_CALL_KWARGS = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 3,
    "true_cfg_scale": 1.0,
    "reference_area": None,
    "condition_area": 32 * 32,
    "max_new_tokens": 8,
}


def tiny_image(seed: int = 0, size: tuple[int, int] = (32, 32)):
    """A random RGB `PIL.Image.Image` (smooth blobs, so resizing behaves like on a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)

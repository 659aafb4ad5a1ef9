"""Stage 3: editor SFT, flow matching of the tiny QwenImageTransformer2DModel through the pipeline's own code path.

Each example is one turn of a generated cm/cu session: the reference is the turn's input image, the target its
ground-truth output, the text its gold operative intent (sometimes the raw instruction when that is self-contained,
sometimes empty for classifier-free guidance). The frozen stage-1 VAE and stage-2 text encoder build the conditioning
with `EditR2Pipeline`'s methods (`encode_prompt`, `condition_image`, `_encode_vae_image`, `_pack_latents`,
`image_shapes`), and the velocity comes from `EditR2Pipeline.predict_velocity`: reference tokens ride after the noisy
target tokens, at the same (h, w) RoPE positions in the next frame, exactly as at sampling time.

Designed for copying (the reference is the answer except where the edit acts):
- the transformer's inner width is above the packed token width (`4 * z_dim`);
- DiT-style zero initialisation (adaLN gates and the output projection), so every block starts as the identity;
- an edit-region-weighted loss (tokens whose target latent differs from the reference weigh `1 + edit_weight`);
- a curriculum on the number of objects in the reference scene.

    python -m recipes.shapes_tiny.train_editor --config recipes/shapes_tiny/configs/gpu/editor.yaml \
        --run_dir runs/editor --vae_path runs/vae/vae --reasoner_path runs/reasoner
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from editr2 import flow
from editr2.batching import pad_prompt_embeds
from recipes.shapes_tiny import common
from recipes.shapes_tiny.carried import CarriedPool, carried_fraction_at


@dataclass
class EditorConfig(common.TrainConfig):
    """Stage-3 settings (optimisation, checkpoints, device, mixed precision, `max_minutes` and `data_workers`:
    `common.TrainConfig`; under bf16 only the trained transformer runs in autocast, the frozen encoders in fp32).

    Args:
        vae_path: the stage-1 VAE folder (`RUN_DIR/vae` of train_vae.py).
        reasoner_path: the stage-2 run folder (its `text_encoder`, `tokenizer`, `processor`).
        num_layers, num_heads, head_dim, axes_dims_rope: the QwenImageTransformer2DModel (inner width
            `num_heads * head_dim` must be >= `4 * z_dim`; `sum(axes_dims_rope) == head_dim`).
        zero_init: DiT-style zero initialisation of the modulation and output layers.
        copy_head_temperature: > 0 initialises attention head 0 of block 0 as a *copy head*: constant query and key
            vectors on the highest RoPE frequencies, so each target token attends to the reference token at the same
            (h, w) in the next frame (sharpness set by this RMS-norm weight), and opens that block's attention gate.
            0 disables it.
        init_from: start from these transformer weights (a `transformer/` folder, or a `checkpoints/step_X` folder
            of an earlier run) instead of a fresh init.
        image_size, condition_size: working size and the VLM's view of the reference (pixels per side).
        max_turns: sessions of 1..max_turns turns are drawn (one turn of each is an example).
        curriculum: `[[fraction_of_max_steps, max_objects_in_reference], ...]`, in order; after the last, any scene.
        ops: train only on turns of these task types (`editr2.bench.shapes.grammar.TASK_TYPES`); empty = all.
        prompt_mode: what conditions each example, as the pipeline's `reasoning=` mode the editor is trained for
            (`PROMPT_MODES`). `"intent"` (default): the turn's gold operative intent (sometimes the raw instruction,
            `raw_instruction_prob`); sampled with `reasoning="intent"` (or `"none"` with the intent as the prompt).
            `"none"`: the raw instruction `session.instruction[turn]`, one reference (the current image), as upstream
            Qwen-Image-Edit. `"history"`: `history_prompt(earlier instructions, instruction)` and, after the current
            image, up to `max_history_images` earlier images of the session (oldest first), as
            `EditR2Pipeline.prepare_conditioning(reasoning="history")` builds them (text-encoder condition images
            too). In "none" and "history" modes an undo turn is an ordinary edit (the instruction goes to the editor;
            the pipeline restores exactly only when an intent names a state).
        max_history_images: earlier images given as references in the "history" mode (the pipeline's default, 2).
            A batch's examples must have as many references each (the transformer has no mask over image tokens):
            the clean part of a batch is drawn with the number of earlier images of its first turn (later turns
            redrawn until they match), and carried examples with other numbers are run as separate groups of the
            same step (the loss is the example-weighted mean over the groups, the whole batch's mean).
        raw_instruction_prob: probability to condition on the raw instruction instead of the intent when the
            instruction is self-contained (explicit target, no rule colour, not an undo); "intent" mode only.
        drop_text_prob: probability of the empty prompt `" "` (enables true CFG at sampling); the references stay.
        edit_weight, edit_threshold: tokens whose mean squared latent change exceeds the threshold weigh
            `1 + edit_weight`.
        logit_mean, logit_std: sigma ~ sigmoid(N(mean, std)) (logit-normal).
        high_sigma_prob, high_sigma_min: with this probability sigma ~ U(high_sigma_min, 1) instead. Sampling starts
            at sigma = 1 and the shifted schedule spends about a third of its steps above 0.85, where the layout of
            the edit is decided from the reference; logit-normal(0, 1) puts under 2% of the training there.
        eval_sessions, eval_steps: single-turn evaluation through the pipeline's `__call__` (every `eval_every` steps).
        eval_carried_sessions, eval_carried_turns: with sessions > 0, each evaluation also runs that many held-out
            sessions per family of `eval_carried_turns` turns with the gold intent as every turn's prompt, the editor
            continuing from its own carried latent (exact restores for undo turns, as the pipeline does): one-turn IF
            and CC per turn (`evaluate_carried`). A flat IF curve means the editor is robust to its own state. In the
            "none" and "history" modes the prompts are the raw instructions, with that `reasoning=`.
        carried_schedule: `[[fraction_of_max_steps, fraction_of_batch], ...]` (in order): from each start on, that
            fraction of a batch is drawn from the carried pool (`recipes.shapes_tiny.carried`): references the
            current editor produced itself over earlier turns, targets the true next scene. Empty = clean sources
            only (plain SFT).
        carried_pool, carried_turns, carried_refresh, carried_steps: the pool's sessions and their turns; slots
            advanced by one turn per step (the least recently advanced), with this many sampling steps (the
            pipeline's `num_inference_steps`, so the pool's states are what inference carries). Each refreshed slot
            costs `carried_steps` transformer forwards without gradients.
        carried_target, carried_target_dilate: the target of a carried example (`carried_targets`): "edit" (default)
            the true next scene inside the turn's edit region (the tokens where the true scenes before and after the
            turn differ, grown by `carried_target_dilate` tokens) and the carried latent itself elsewhere; "scene" the
            true next scene everywhere. Measured on the shipped editor (docs/training.md): "scene" asks the editor to
            repair earlier mistakes no instruction mentions, and its one-turn IF and CC fell.
        carried_filter: keep only pool states that the oracle parser reads as the true scene (a slot whose new state
            it misreads starts a new session, `CarriedPool._filter`): the editor is never asked to draw what the text
            names over a state that does not hold it. The log's `carried_rejected` counts the states rejected so far.
        batch_text_encoding: encode a batch's prompts in one padded text-encoder pass (`encode_text_inputs`) instead
            of one `encode_prompt` call per example: the same embeddings up to float rounding (tested), many times
            faster on a GPU. False keeps the per-example path the CPU recipe was measured with.
        render: how a batch's scenes become pixels. `"pil"` (default, the path the shipped models were trained
            with): `editr2.bench.shapes.render` per scene in `example_batch` (so in the data workers). `"torch"`:
            the workers (or the training process) only draw the turns and turn them into index tensors; the
            reference and target images are rendered as one batch on the training device in `make_batch`
            (`editr2.bench.shapes.torch_render`, the same pixels as `"pil"`). With `batch_text_encoding` the workers
            tokenize the texts too, and the text encoder's condition view and image patches are made from the
            device render by `editr2.tensor_processor.TensorPromptProcessor` (PIL's Lanczos resize, exactly, and
            the processor's patches); without it, the per-example prompt encoding gets PIL images of the device
            render.
    """

    vae_path: str = "runs/vae/vae"
    reasoner_path: str = "runs/reasoner"
    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 64
    axes_dims_rope: common.Seq = (16, 24, 24)
    zero_init: bool = True
    copy_head_temperature: float = 0.0
    init_from: str = ""
    image_size: int = 64
    condition_size: int = 32
    max_turns: int = 4
    prompt_mode: str = "intent"
    max_history_images: int = 2
    curriculum: common.Seq = ((0.15, 1), (0.35, 2))
    ops: common.Seq = ()
    raw_instruction_prob: float = 0.15
    drop_text_prob: float = 0.1
    edit_weight: float = 4.0
    edit_threshold: float = 0.02
    logit_mean: float = 0.0
    logit_std: float = 1.0
    high_sigma_prob: float = 0.0
    high_sigma_min: float = 0.85
    batch_size: int = 16
    max_steps: int = 3000
    eval_sessions: int = 32
    eval_steps: int = 16
    batch_text_encoding: bool = False
    render: str = "pil"
    eval_carried_sessions: int = 0
    eval_carried_turns: int = 6
    carried_schedule: common.Seq = ()
    carried_pool: int = 32
    carried_turns: int = 6
    carried_refresh: int = 2
    carried_steps: int = 16
    carried_target: str = "edit"
    carried_target_dilate: int = 1
    carried_filter: bool = False

    RENDERERS = ("pil", "torch")
    PROMPT_MODES = ("intent", "none", "history")
    FROZEN_FIELDS = ("seed", "num_layers", "num_heads", "head_dim", "axes_dims_rope", "image_size", "condition_size",
                     "init_from", "copy_head_temperature", "prompt_mode", "max_history_images")

    def __post_init__(self):
        super().__post_init__()
        if self.render not in self.RENDERERS:
            raise ValueError(f"render={self.render!r}: pass one of {self.RENDERERS}.")
        if self.prompt_mode not in self.PROMPT_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}: pass one of {self.PROMPT_MODES}.")
        if self.max_history_images < 0:
            raise ValueError(f"max_history_images={self.max_history_images}: pass 0 or more (2, the pipeline's "
                             "default).")
        if self.prompt_mode == "history" and self.render != "pil":
            raise ValueError("prompt_mode='history' renders its earlier images with PIL: pass render='pil'.")
        for entry in self.carried_schedule:
            if len(entry) != 2 or not 0 <= entry[0] <= 1 or not 0 <= entry[1] <= 1:
                raise ValueError(f"carried_schedule entry {list(entry)}: pass [fraction_of_max_steps, "
                                 "fraction_of_batch] pairs with both in [0, 1], e.g. [[0.0, 0.25], [0.5, 0.5]].")
        if self.carried_target not in ("edit", "scene"):
            raise ValueError(f"carried_target={self.carried_target!r}: pass 'edit' or 'scene'.")
        if self.carried_target_dilate < 0:
            raise ValueError(f"carried_target_dilate={self.carried_target_dilate}: pass 0 or more tokens.")
        if self.carried_schedule and (self.carried_refresh < 1 or self.carried_steps < 1):
            raise ValueError(f"carried_refresh={self.carried_refresh}, carried_steps={self.carried_steps}: pass at "
                             "least 1 each with a carried_schedule.")


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def build_transformer(cfg: EditorConfig, z_dim: int, text_dim: int):
    from diffusers import QwenImageTransformer2DModel

    inner = cfg.num_heads * cfg.head_dim
    if inner < 4 * z_dim:
        raise ValueError(f"inner width {inner} < packed latent width {4 * z_dim}: part of the noise could never be "
                         "recovered; raise num_heads or head_dim.")
    if sum(cfg.axes_dims_rope) != cfg.head_dim:
        raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to head_dim={cfg.head_dim}.")
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=text_dim,
        guidance_embeds=False, axes_dims_rope=tuple(cfg.axes_dims_rope))
    if cfg.zero_init:
        for block in model.transformer_blocks:
            for mod in (block.img_mod, block.txt_mod):
                torch.nn.init.zeros_(mod[-1].weight)
                torch.nn.init.zeros_(mod[-1].bias)
        torch.nn.init.zeros_(model.proj_out.weight)
        torch.nn.init.zeros_(model.proj_out.bias)
    return model


@torch.no_grad()
def init_copy_head(model, temperature: float, num_freqs: int = 3) -> None:
    """Make head 0 of the first block attend from each target token to the reference token at the same (h, w).

    Query and key of that head are constant (bias only) and non-zero only on the `num_freqs` highest RoPE frequency
    pairs of the height and width axes (score `sum_p cos(theta_p dh) + cos(theta_p dw)`, maximal at dh = dw = 0)
    and on the frame axis' highest pair, where the query is turned by +1 rad so that the score peaks one frame later
    (the reference, not the token itself). Text keys of the head are zero. The block's attention gate is opened
    (bias 1) so the head's output reaches the residual stream from the first step.
    """
    block = model.transformer_blocks[0]
    attn = block.attn
    head_dim = attn.inner_dim // attn.heads
    frame, height, _ = model.config.axes_dims_rope
    q = torch.zeros(head_dim)
    k = torch.zeros(head_dim)
    q[0], q[1], k[0] = math.cos(1.0), math.sin(1.0), 1.0  # frame axis, frequency 1 rad: peak at d(frame) = -1
    for p in range(num_freqs):
        for start in (frame, frame + height):  # height axis, width axis
            q[start + 2 * p] = k[start + 2 * p] = 1.0
    for proj, vector in ((attn.to_q, q), (attn.to_k, k), (attn.add_k_proj, torch.zeros(head_dim))):
        proj.weight[:head_dim] = 0.0
        proj.bias[:head_dim] = vector
    used = (q != 0) | (k != 0)
    attn.norm_q.weight[used] = temperature
    attn.norm_k.weight[used] = temperature
    dim = attn.inner_dim
    block.img_mod[-1].bias[2 * dim:3 * dim] = 1.0  # gate of the attention output (shift, scale, gate, ...)


def load_frozen_parts(cfg: EditorConfig) -> dict:
    """The stage-1 VAE and the stage-2 text encoder, tokenizer and processor (frozen), plus the scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor
    from diffusers_editr2.testing import qwen_image_scheduler_config

    reasoner = Path(cfg.reasoner_path)
    parts = {
        # float32 whatever the files store (the shipped checkpoint stores float16; transformers would keep it)
        "vae": AutoencoderKLQwenImage.from_pretrained(cfg.vae_path, torch_dtype=torch.float32).eval()
        .requires_grad_(False),
        "text_encoder": Qwen2_5_VLForConditionalGeneration.from_pretrained(reasoner / "text_encoder",
                                                                          dtype=torch.float32).eval()
        .requires_grad_(False),
        "tokenizer": Qwen2Tokenizer.from_pretrained(reasoner / "tokenizer"),
        "processor": Qwen2VLImageOnlyProcessor.from_pretrained(reasoner / "processor"),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(qwen_image_scheduler_config()),
    }
    return parts


def build_pipeline(cfg: EditorConfig, transformer=None, parts: dict | None = None):
    from diffusers_editr2 import EditR2Pipeline

    parts = parts or load_frozen_parts(cfg)
    if transformer is None:
        common.seed_everything(cfg.seed)
        transformer = build_transformer(cfg, parts["vae"].config.z_dim, parts["text_encoder"].config.text_config
                                        .hidden_size)
        if cfg.copy_head_temperature > 0:
            init_copy_head(transformer, cfg.copy_head_temperature)
        if cfg.init_from:  # a `transformer/` folder, or a checkpoint folder of this script
            path = Path(cfg.init_from)
            if (path / "model.safetensors").exists():
                common.load_weights(transformer, path)
            else:
                from diffusers import QwenImageTransformer2DModel

                transformer.load_state_dict(QwenImageTransformer2DModel.from_pretrained(path).state_dict())
    pipe = EditR2Pipeline(transformer=transformer, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning through the pipeline's methods (batched)
# ---------------------------------------------------------------------------------------------------------------------


# diffusers' QwenImageEditPlus prompt prefix for one condition image (what `encode_prompt(text, [image])` writes)
IMAGE_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"


def image_prompt(count: int) -> str:
    """diffusers' QwenImageEditPlus prompt prefix for `count` condition images ("Picture 1: ...Picture 2: ...")."""
    return "".join(IMAGE_PROMPT.replace("1", str(k), 1) for k in range(1, count + 1))


def _image_list(references) -> list:
    """An example's references as a list (a single PIL image is one reference)."""
    return list(references) if isinstance(references, (list, tuple)) else [references]


def preprocess_images(pipe, images, size: int) -> torch.Tensor:
    """PIL images -> the VAE's input pixels `(B, 3, 1, H, W)` on the CPU, as `EditR2Pipeline.encode_image` makes
    them."""
    return pipe.image_processor.preprocess(images, size, size).unsqueeze(2)


@torch.no_grad()
def encode_pixels(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """`preprocess_images` output -> packed, normalised latents `(B, N, 4z)` (on the VAE's device)."""
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    with common.single_frame_convs():
        latents = pipe._encode_vae_image(image=pixels, generator=None)  # (B, z, 1, h, w)
    h, w = latents.shape[3:]
    return pipe._pack_latents(latents, latents.shape[0], pipe.latent_channels, h, w)


def encode_images(pipe, images, size: int) -> torch.Tensor:
    """VAE-encode PIL images as `EditR2Pipeline.encode_image` does, batched: packed, normalised `(B, N, 4z)`."""
    return encode_pixels(pipe, preprocess_images(pipe, images, size))


@torch.no_grad()
def encode_texts(pipe, texts, references, condition_area: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pipe.encode_prompt(text, condition images)` per example, padded like diffusers pads a batch:
    `(B, L, D)` embeddings and a `(B, L)` mask. An example's references are a PIL image or a list of them (the
    current image first, then earlier ones)."""
    device = pipe.text_encoder.device
    embeds = []
    for text, images in zip(texts, references):
        condition = [pipe.condition_image(image, condition_area) for image in _image_list(images)]
        e, _ = pipe.encode_prompt(text, condition, device=device)
        embeds.append(e[0])  # (L_i, D)
    return pad_prompt_embeds(embeds)


def text_inputs(pipe, texts, references, condition_area: int) -> dict:
    """The text encoder's inputs of `encode_prompt(text, condition images)` for a whole batch, right-padded, on the
    CPU (the processor only: data workers can build them). References as in `encode_texts`."""
    lists = [_image_list(images) for images in references]
    prompts = [pipe.prompt_template_encode.format(image_prompt(len(images)) + text)
               for text, images in zip(texts, lists)]
    images = [pipe.condition_image(image, condition_area) for images in lists for image in images]
    return dict(pipe.processor(text=prompts, images=images, padding=True, return_tensors="pt"))


@torch.no_grad()
def encode_text_inputs(pipe, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded text-encoder pass over `text_inputs`: what `encode_texts` returns, up to float rounding.

    As diffusers' `_get_qwen_prompt_embeds`: the last hidden state of each prompt's valid tokens, without the
    template's first `prompt_template_encode_start_idx` tokens (adapters off, as in `EditR2Pipeline.encode_prompt`).
    """
    from accelerate.utils import send_to_device

    from diffusers_editr2.pipeline_editr2 import adapters_disabled

    inputs = send_to_device(inputs, pipe.text_encoder.device)
    with adapters_disabled(pipe.text_encoder):
        hidden = pipe.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                   output_hidden_states=True).hidden_states[-1]  # (B, L, D)
    drop = pipe.prompt_template_encode_start_idx
    return pad_prompt_embeds([e[drop:] for e in pipe._extract_masked_hidden(hidden, inputs["attention_mask"])])


def num_tokens(pipe, cfg: EditorConfig) -> int:
    """Packed tokens of one image at the working size."""
    return (cfg.image_size // (pipe.vae_scale_factor * 2)) ** 2


def num_references(pipe, cfg: EditorConfig, image_latents: torch.Tensor) -> int:
    """References in `(B, R * N, C)` reference latents (the current image, then earlier ones)."""
    n = num_tokens(pipe, cfg)
    if image_latents.shape[1] % n:
        raise ValueError(f"reference latents of {image_latents.shape[1]} tokens are no whole number of "
                         f"{n}-token images at image_size={cfg.image_size}.")
    return image_latents.shape[1] // n


def turn_conditioning(pipe, cfg: EditorConfig, prompt_embeds, mask, image_latents):
    """A batched `TurnConditioning` (what `pipe.prepare_conditioning` builds for one turn with `reference_area=None`):
    `image_latents` `(B, R * N, C)` are the R references' latents one after the other (R = 1 except with
    `reasoning="history"`), all at the working size."""
    from diffusers_editr2.pipeline_editr2 import TurnConditioning

    size = cfg.image_size
    references = [(size, size)] * num_references(pipe, cfg, image_latents)
    return TurnConditioning(
        session=None, text="", condition_images=[], prompt_embeds=prompt_embeds, prompt_embeds_mask=mask,
        negative_prompt_embeds=None, negative_prompt_embeds_mask=None, image_latents=image_latents,
        img_shapes=pipe.image_shapes(size, size, references), height=size, width=size)


def conditioning(pipe, references, texts, cfg: EditorConfig, image_latents: torch.Tensor | None = None):
    """The batched `TurnConditioning` of the examples' PIL `references` (one image each, or a list: the current image,
    then earlier ones oldest first; as many per example) and prompt `texts`; `image_latents` `(B, R * N, C)` are the
    references' latents in that order when given (carried ones), else the references are VAE-encoded."""
    area = cfg.condition_size**2
    if cfg.batch_text_encoding:
        prompt_embeds, mask = encode_text_inputs(pipe, text_inputs(pipe, texts, references, area))
    else:
        prompt_embeds, mask = encode_texts(pipe, texts, references, area)
    if image_latents is None:
        lists = [_image_list(images) for images in references]
        if len({len(images) for images in lists}) > 1:
            raise ValueError("every example of a batch needs as many references; group the examples by their count.")
        flat = encode_images(pipe, [image for images in lists for image in images], cfg.image_size)  # (B * R, N, C)
        image_latents = flat.reshape(len(lists), -1, flat.shape[-1])  # (B, R * N, C)
    return turn_conditioning(pipe, cfg, prompt_embeds, mask, image_latents)


def concat_conditioning(pipe, cfg: EditorConfig, first, second):
    """Two batched `TurnConditioning`s as one (prompt embeddings re-padded to the longer of the two)."""
    rows = [embeds[: int(mask.sum())] for part in (first, second)
            for embeds, mask in zip(part.prompt_embeds, part.prompt_embeds_mask)]  # (L_i, D) each
    prompt_embeds, mask = pad_prompt_embeds(rows)
    image_latents = torch.cat([first.image_latents, second.image_latents])  # (B1 + B2, N, C)
    return turn_conditioning(pipe, cfg, prompt_embeds, mask, image_latents)


def edit_region(before: torch.Tensor, after: torch.Tensor, threshold: float, dilate: int) -> torch.Tensor:
    """Tokens a turn's edit acts on: `(B, N)` bool where the clean latents of the true scenes before and after the
    turn (`(B, N, C)`, packed) differ by more than `threshold` (mean squared), grown by `dilate` tokens on the token
    grid (square images)."""
    changed = ((after - before) ** 2).mean(-1) > threshold  # (B, N)
    if dilate > 0:
        side = math.isqrt(changed.shape[1])
        if side * side != changed.shape[1]:
            raise ValueError(f"{changed.shape[1]} tokens are not a square grid: edit regions need square images.")
        grid = changed.float().view(-1, 1, side, side)
        changed = torch.nn.functional.max_pool2d(grid, 2 * dilate + 1, 1, dilate).view_as(changed) > 0
    return changed


def carried_targets(pipe, cfg: EditorConfig, current: torch.Tensor, scenes_now, scenes_next) -> torch.Tensor:
    """The targets of carried examples `(B, N, C)`. `carried_target="scene"`: the true next scene, rendered and
    VAE-encoded (the editor must also repair whatever its earlier turns got wrong, which this turn's text never
    asks for). `"edit"`: that only inside the turn's edit region (`edit_region` of the true scenes' clean latents),
    the carried latent `current` `(B, N, C)` everywhere else (apply the edit, keep the rest of its own state as it
    is)."""
    from editr2.bench.shapes.render import render

    size = cfg.image_size
    after = encode_images(pipe, [render(scene, size) for scene in scenes_next], size)
    if cfg.carried_target == "scene":
        return after
    before = encode_images(pipe, [render(scene, size) for scene in scenes_now], size)
    region = edit_region(before, after, cfg.edit_threshold, cfg.carried_target_dilate).unsqueeze(-1)  # (B, N, 1)
    return torch.where(region, after, current)


def carried_batch(pipe, cfg: EditorConfig, pool, count: int, step: int):
    """`[(conditioning, x0), ...]` of `count` examples from the carried pool, one group per number of references
    (a single group except in the "history" mode): the editor's own latents and images as the references, the targets
    of `carried_targets`; None when the pool has none yet."""
    examples = pool.draw_references(count, common.step_rng(cfg.seed, step, "carried"))
    if not examples:
        return None
    device = pipe.vae.device
    groups = {}
    for example in examples:
        groups.setdefault(len(example[0]), []).append(example)
    out = []
    for _, group in sorted(groups.items()):
        latents = torch.stack([torch.cat([latent for latent, _ in refs]) for refs, _, _, _ in group]).to(device)
        images = [[image for _, image in refs] for refs, _, _, _ in group]
        cond = conditioning(pipe, images, [text for _, text, _, _ in group], cfg, image_latents=latents)
        current = torch.stack([refs[0][0] for refs, _, _, _ in group]).to(device)  # (b, N, C)
        x0 = carried_targets(pipe, cfg, current, [now for *_, now in group], [nxt for _, _, nxt, _ in group])
        out.append((cond, x0))
    return out


def merge_groups(pipe, cfg: EditorConfig, groups: list) -> list:
    """`[(conditioning, x0), ...]` with the groups of equal reference counts concatenated (in order; empty groups
    dropped)."""
    merged: dict[int, tuple] = {}
    for cond, x0 in groups:
        if x0.shape[0] == 0:
            continue
        key = cond.image_latents.shape[1]
        if key in merged:
            first, first_x0 = merged[key]
            merged[key] = (concat_conditioning(pipe, cfg, first, cond), torch.cat([first_x0, x0]))
        else:
            merged[key] = (cond, x0)
    return list(merged.values())


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def self_contained(session, turn: int) -> bool:
    """The raw instruction says everything the edit needs (explicit target, no rule colour, not an undo)."""
    cmd = session.commands[turn]
    return (session.references[turn] in ("explicit", "none") and cmd.op != "undo" and not cmd.color_from_rule
            and session.rule_color is None)


def max_objects_at(cfg: EditorConfig, step: int) -> int:
    for fraction, max_objects in cfg.curriculum:
        if step < fraction * cfg.max_steps:
            return int(max_objects)
    return 5


def mode_text(cfg: EditorConfig, session, turn: int) -> str:
    """What conditions the edit of `turn` in the config's `prompt_mode`: the gold intent ("intent"), the raw
    instruction ("none"), or `history_prompt` of the earlier instructions and this one ("history")."""
    if cfg.prompt_mode == "intent":
        return session.gold_intent[turn]
    if cfg.prompt_mode == "none":
        return session.instruction[turn]
    from diffusers_editr2.pipeline_editr2 import history_prompt  # (imports diffusers)

    return history_prompt(session.instruction[:turn], session.instruction[turn])


def earlier_states(cfg: EditorConfig, turn: int) -> list[int]:
    """The earlier states (0 = the source) given as references after the current one at `turn`, oldest first: the
    last `max_history_images` of them in the "history" mode (as `EditR2Pipeline._reference_latents`), else none."""
    if cfg.prompt_mode != "history" or cfg.max_history_images == 0:
        return []
    return list(range(turn))[-cfg.max_history_images:]


def example_text(rng: random.Random, cfg: EditorConfig, session, turn: int) -> str:
    """The training text of a turn: `mode_text`, in the "intent" mode sometimes the raw instruction (self-contained
    ones, `raw_instruction_prob`), and the empty prompt at `drop_text_prob`."""
    text = mode_text(cfg, session, turn)
    if cfg.prompt_mode == "intent" and self_contained(session, turn) and rng.random() < cfg.raw_instruction_prob:
        text = session.instruction[turn]
    if rng.random() < cfg.drop_text_prob:
        text = " "
    return text


def draw_example(rng: random.Random, cfg: EditorConfig, max_objects: int = 5, earlier: int | None = None):
    """`(reference scenes, target scene, text)` of a random turn of a random training session: the references are
    the turn's input scene, then its `earlier_states` (oldest first). With `earlier`, only turns with that many
    earlier references are drawn (a batch's examples need as many references each)."""
    from editr2.bench.shapes import generate_session

    while True:
        family = rng.choice(("cm", "cu"))
        num_turns = rng.randint(1, cfg.max_turns)
        session = generate_session(family, num_turns, common.TRAIN_SEED_OFFSET + rng.randrange(10**9), cfg.image_size)
        turn = rng.randrange(num_turns)
        if (len(session.scenes[turn].objects) <= max_objects and (not cfg.ops or session.task_type[turn] in cfg.ops)
                and (earlier is None or len(earlier_states(cfg, turn)) == earlier)):
            break
    text = example_text(rng, cfg, session, turn)
    references = [session.scenes[turn]] + [session.scenes[k] for k in earlier_states(cfg, turn)]
    return references, session.scenes[turn + 1], text


def draw_turn(rng: random.Random, cfg: EditorConfig, max_objects: int = 5):
    """`(reference scene, target scene, text)` of a random turn of a random training session (`draw_example`
    without the earlier references)."""
    references, target, text = draw_example(rng, cfg, max_objects)
    return references[0], target, text


def draw_examples(rng: random.Random, cfg: EditorConfig, max_objects: int = 5) -> list:
    """A batch of `draw_example`s with as many references each: the first turn's count rules the batch's."""
    first = draw_example(rng, cfg, max_objects)
    earlier = len(first[0]) - 1 if cfg.prompt_mode == "history" else None
    return [first] + [draw_example(rng, cfg, max_objects, earlier) for _ in range(cfg.batch_size - 1)]


def example_batch(pipe, cfg: EditorConfig, step: int) -> dict:
    """The CPU part of a step's batch (what data workers compute; only the pipeline's processors are used): the
    drawn turns rendered and preprocessed for the VAE, and the text encoder's inputs (`batch_text_encoding`) or the
    reference images and texts (per-example `encode_prompt`). In the "history" mode each example has R references
    (its current image, then earlier ones; as many in every example), one after the other in `reference_pixels`."""
    from editr2.bench.shapes.render import render

    rng = common.step_rng(cfg.seed, step)
    examples = draw_examples(rng, cfg, max_objects_at(cfg, step))
    if cfg.render == "torch":
        return scene_batch(pipe, cfg, [(refs[0], tgt, text) for refs, tgt, text in examples])
    images = [[render(scene, cfg.image_size) for scene in refs] for refs, _, _ in examples]
    references = [refs[0] if len(refs) == 1 else refs for refs in images]
    targets = [render(tgt, cfg.image_size) for _, tgt, _ in examples]
    texts = [text for _, _, text in examples]
    batch = {"reference_pixels": preprocess_images(pipe, [image for refs in images for image in refs],
                                                   cfg.image_size),  # (B * R, 3, 1, H, W), R references each
             "target_pixels": preprocess_images(pipe, targets, cfg.image_size)}
    if cfg.batch_text_encoding:
        batch["text_inputs"] = text_inputs(pipe, texts, references, cfg.condition_size**2)
    else:
        batch["references"], batch["texts"] = references, texts
    return batch


def prompt_processor(pipe, cfg: EditorConfig):
    """The pipeline's processor as a `TensorPromptProcessor` for one-reference prompts at the condition view (cached
    per processor)."""
    from editr2.tensor_processor import TensorPromptProcessor

    key = (cfg.condition_size, pipe.prompt_template_encode)
    cache = _PROMPT_PROCESSORS.setdefault(pipe.processor, {})
    if key not in cache:
        cache[key] = TensorPromptProcessor(pipe.processor, pipe.prompt_template_encode, image_prompt(1),
                                           (cfg.condition_size, cfg.condition_size))
    return cache[key]


_PROMPT_PROCESSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scene_batch(pipe, cfg: EditorConfig, turns) -> dict:
    """`render="torch"`: a batch's drawn turns as CPU tensors (`torch_render.scene_indices` of the references and
    of the targets), which `make_batch` renders on the training device, and the texts (with `batch_text_encoding`:
    their token ids and mask, `(B, L)`)."""
    from editr2.bench.shapes.torch_render import scene_indices

    batch = {"reference_scenes": scene_indices([ref for ref, _, _ in turns]),
             "target_scenes": scene_indices([tgt for _, tgt, _ in turns])}
    texts = [text for _, _, text in turns]
    if cfg.batch_text_encoding:
        batch["input_ids"], batch["attention_mask"] = prompt_processor(pipe, cfg).input_ids(texts)
    else:
        batch["texts"] = texts
    return batch


def render_examples(pipe, cfg: EditorConfig, ex: dict) -> dict:
    """`render="torch"`: `scene_batch` output -> what `example_batch` gives with `render="pil"`, everything per pixel
    in one batch on the VAE's device: the references and targets rendered, the VAE's pixels, and (with
    `batch_text_encoding`) the text encoder's inputs (condition view and patches by `prompt_processor`); without it,
    the PIL references for the per-example prompt encoding are made from the render."""
    from PIL import Image

    from editr2.bench.shapes.torch_render import render_indices, to_uint8

    device, size = pipe.vae.device, cfg.image_size
    reference = render_indices(ex["reference_scenes"], size, device)  # (B, 3, H, W) in [0, 1], on the uint8 levels
    target = render_indices(ex["target_scenes"], size, device)
    batch = {"reference_pixels": (reference * 2.0 - 1.0).unsqueeze(2),  # as VaeImageProcessor.preprocess
             "target_pixels": (target * 2.0 - 1.0).unsqueeze(2)}
    if "input_ids" in ex:
        batch["text_inputs"] = prompt_processor(pipe, cfg).batch(
            ex["input_ids"].to(device), ex["attention_mask"].to(device), torch.round(reference * 255.0).to(torch.uint8))
    else:
        batch["references"] = [Image.fromarray(a, "RGB") for a in to_uint8(reference)]
        batch["texts"] = ex["texts"]
    return batch


def make_batch(pipe, cfg: EditorConfig, step: int, examples: dict | None = None):
    """`(conditioning, x0)` of a step on the pipeline's device, from `examples` (`example_batch(pipe, cfg, step)`
    when None)."""
    ex = example_batch(pipe, cfg, step) if examples is None else examples
    if "target_scenes" in ex:  # render: torch
        ex = render_examples(pipe, cfg, ex)
    if "text_inputs" in ex:
        prompt_embeds, mask = encode_text_inputs(pipe, ex["text_inputs"])
    else:
        prompt_embeds, mask = encode_texts(pipe, ex["texts"], ex["references"], cfg.condition_size**2)
    references = encode_pixels(pipe, ex["reference_pixels"])  # (B * R, N, C)
    references = references.reshape(prompt_embeds.shape[0], -1, references.shape[-1])  # (B, R * N, C)
    cond = turn_conditioning(pipe, cfg, prompt_embeds, mask, references)
    return cond, encode_pixels(pipe, ex["target_pixels"])


def flow_loss(pipe, cond, x0: torch.Tensor, cfg: EditorConfig, generator: torch.Generator,
              accelerator=None) -> tuple[torch.Tensor, dict]:
    """`editr2.flow.flow_matching_loss` of the pipeline's velocity, tokens the edit changes weighted up; sigma and
    noise are drawn on the CPU from `generator` (the same on every device)."""
    sigma = flow.training_sigmas(x0.shape[0], generator, cfg.logit_mean, cfg.logit_std, cfg.high_sigma_prob,
                                 cfg.high_sigma_min).to(x0.device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B, N, C)
    changed = ((x0 - cond.image_latents[:, : x0.shape[1]]) ** 2).mean(-1) > cfg.edit_threshold  # (B, N), current

    def velocity(noisy, sigma):
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            return pipe.predict_velocity(noisy, sigma * 1000, cond)  # (B, N, C)

    loss, err = flow.flow_matching_loss(velocity, x0, noise, sigma, 1 + cfg.edit_weight * changed.float())
    stats = {"mse": err.mean().item(), "mse_edit": err[changed].mean().item() if changed.any() else float("nan"),
             "edit_fraction": changed.float().mean().item()}
    return loss, stats


def grouped_flow_loss(pipe, groups: list, cfg: EditorConfig, generator: torch.Generator,
                      accelerator=None) -> tuple[torch.Tensor, dict]:
    """`flow_loss` of a batch split into `[(conditioning, x0), ...]` groups (examples with different numbers of
    references cannot share a transformer pass): the example-weighted mean of the groups' losses, which is the whole
    batch's mean (every target has as many tokens). One group is exactly `flow_loss`."""
    if len(groups) == 1:
        return flow_loss(pipe, *groups[0], cfg, generator, accelerator)
    total = sum(x0.shape[0] for _, x0 in groups)
    loss, sums = 0.0, {"mse": 0.0, "edit_fraction": 0.0, "mse_edit": 0.0, "edits": 0.0}
    for cond, x0 in groups:
        part, stats = flow_loss(pipe, cond, x0, cfg, generator, accelerator)
        share = x0.shape[0] / total
        loss = loss + share * part
        sums["mse"] += share * stats["mse"]
        sums["edit_fraction"] += share * stats["edit_fraction"]
        edits = stats["edit_fraction"] * x0.shape[0]
        if edits > 0:
            sums["mse_edit"] += edits * stats["mse_edit"]
            sums["edits"] += edits
    mse_edit = sums["mse_edit"] / sums["edits"] if sums["edits"] > 0 else float("nan")
    return loss, {"mse": sums["mse"], "mse_edit": mse_edit, "edit_fraction": sums["edit_fraction"]}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation through the pipeline's __call__
# ---------------------------------------------------------------------------------------------------------------------


def call_kwargs(cfg, steps: int | None = None, cfg_scale: float = 1.0) -> dict:
    """The `EditR2Pipeline.__call__` arguments the shipped model runs with."""
    kwargs = {"height": cfg.image_size, "width": cfg.image_size, "reference_area": None,
              "condition_area": cfg.condition_size**2, "num_inference_steps": steps or cfg.eval_steps,
              "true_cfg_scale": cfg_scale, "max_new_tokens": 96}
    if cfg_scale > 1:
        kwargs["negative_prompt"] = " "
    if getattr(cfg, "prompt_mode", "intent") == "history":
        kwargs["max_history_images"] = cfg.max_history_images
    return kwargs


def eval_reasoning(cfg: EditorConfig) -> str:
    """The pipeline's `reasoning=` the evaluations run with: "none" with the gold intent as the prompt in the
    "intent" mode (the editor alone, without the reasoner), else the mode itself with the raw instruction."""
    return "none" if cfg.prompt_mode == "intent" else cfg.prompt_mode


def eval_prompt(cfg: EditorConfig, session, turn: int) -> str:
    """The evaluations' prompt of `turn`: the gold intent ("intent" mode) or the raw instruction (the pipeline builds
    the history text itself)."""
    return session.gold_intent[turn] if cfg.prompt_mode == "intent" else session.instruction[turn]


@torch.no_grad()
def evaluate(pipe, cfg: EditorConfig, num_sessions: int | None = None, seed: int = 2_000_000,
             cfg_scale: float = 1.0) -> dict:
    """Single-turn edits on held-out sessions: IF and CC per family, and IF per task type. Conditioned on the gold
    intent (`reasoning="none"`, prompt = intent) in the "intent" mode, else on the raw instruction with the mode's
    `reasoning=` (`eval_reasoning`, `eval_prompt`)."""
    from editr2.bench.metrics import score_session
    from editr2.bench.shapes import generate_session

    num_sessions = num_sessions or cfg.eval_sessions
    pipe.transformer.eval()
    out, per_op = {}, {}
    for family in ("cm", "cu"):
        rows = []
        for k in range(num_sessions):
            session = generate_session(family, 1, seed + k, cfg.image_size)
            source = session.source_image()
            result = pipe(image=source, prompt=eval_prompt(cfg, session, 0), reasoning=eval_reasoning(cfg),
                          generator=torch.Generator().manual_seed(k), **call_kwargs(cfg, cfg_scale=cfg_scale))
            score = score_session(session, [source, result.images[0]])[0]
            rows.append(score)
            per_op.setdefault(session.task_type[0], []).append(score.IF)
        out[family] = {"IF": float(np.mean([r.IF for r in rows])), "CC": float(np.mean([r.CC for r in rows]))}
    pipe.transformer.train()
    out["IF"] = float(np.mean([out[f]["IF"] for f in ("cm", "cu")]))
    out["CC"] = float(np.mean([out[f]["CC"] for f in ("cm", "cu")]))
    out["IF_per_op"] = {op: float(np.mean(v)) for op, v in sorted(per_op.items())}
    if cfg.eval_carried_sessions > 0:
        out["carried"] = evaluate_carried(pipe, cfg, cfg.eval_carried_sessions, cfg.eval_carried_turns, seed,
                                          cfg_scale)
    return out


@torch.no_grad()
def gold_session(pipe, cfg: EditorConfig, session, generator_seed: int, cfg_scale: float = 1.0) -> list:
    """The editor alone over a whole session, each turn continuing from the previous turn's carried latent: the bench's
    `PipelineEditor` (turn t sampled with seed `generator_seed + t`). In the "intent" mode each turn's prompt is the
    gold intent (`prompts="gold"`, `reasoning="none"`; an intent naming an earlier state restores it exactly, as
    `reasoning="intent"` does); in the "none" and "history" modes the prompt is the raw instruction with that
    `reasoning=` and every turn (undo too) is an edit. Returns the images `[source, turn 1, ...]`."""
    from diffusers_editr2.bench import PipelineEditor

    gold = cfg.prompt_mode == "intent"
    editor = PipelineEditor(pipe, eval_reasoning(cfg), seed=generator_seed,
                            call_kwargs=call_kwargs(cfg, cfg_scale=cfg_scale), prompts="gold" if gold else "instruction")
    source = session.source_image()
    return [source] + editor.edit_session(source, list(session.instruction), session)


@torch.no_grad()
def evaluate_carried(pipe, cfg: EditorConfig, num_sessions: int, num_turns: int, seed: int = 2_000_000,
                     cfg_scale: float = 1.0) -> dict:
    """One-turn IF and CC at each turn of held-out sessions carried by the editor itself (`gold_session`: the gold
    intent, or the raw instruction in the "none" and "history" modes), per family: `{"cm": {"IF": [turn 1, ...], "CC": [...]}, "cu": ..., "IF": [...]}`."""
    from editr2.bench.metrics import score_session
    from editr2.bench.shapes import generate_session

    was_training = pipe.transformer.training
    pipe.transformer.eval()
    out = {}
    for family in ("cm", "cu"):
        scores = []
        for k in range(num_sessions):
            session = generate_session(family, num_turns, seed + k, cfg.image_size)
            scores.append(score_session(session, gold_session(pipe, cfg, session, k * 100, cfg_scale)))
        out[family] = {key: [float(np.mean([getattr(s[t], key) for s in scores])) for t in range(num_turns)]
                       for key in ("IF", "CC")}
    out["IF"] = [float(np.mean([out[f]["IF"][t] for f in ("cm", "cu")])) for t in range(num_turns)]
    pipe.transformer.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def train(cfg: EditorConfig, run_dir: str | Path, show_progress: bool = True, stop_after: int | None = None):
    """Train (or resume) in `run_dir`; returns the last evaluation (None when stopped by `stop_after`, which
    checkpoints and returns after that step, as an interruption would)."""
    run = common.Run(cfg, run_dir, "editor", show_progress, stop_after)
    pipe = build_pipeline(cfg).to(run.device)  # built on the CPU (the same init everywhere), then moved
    model = pipe.transformer.train()
    model, optimizer = run.prepare(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                                            weight_decay=cfg.weight_decay, betas=(0.9, 0.99)))
    pool = start_pool(pipe, cfg, run) if cfg.carried_schedule else None
    for step, examples in run.steps(lambda step: example_batch(pipe, cfg, step)):
        cond, x0 = make_batch(pipe, cfg, step, examples)
        groups, carried = [(cond, x0)], 0
        fraction = carried_fraction_at(cfg.carried_schedule, step, cfg.max_steps)
        if pool is not None and fraction > 0:
            pool.refresh(cfg.carried_refresh, step, model)
            own = carried_batch(pipe, cfg, pool, round(fraction * cfg.batch_size), step)
            if own is not None:  # the batch keeps its size: carried examples replace clean ones
                carried = sum(part[1].shape[0] for part in own)
                keep = cfg.batch_size - carried
                clean = replace(cond, prompt_embeds=cond.prompt_embeds[:keep],
                                prompt_embeds_mask=cond.prompt_embeds_mask[:keep],
                                image_latents=cond.image_latents[:keep])
                groups = merge_groups(pipe, cfg, [(clean, x0[:keep])] + own)
        loss, stats = grouped_flow_loss(pipe, groups, cfg, common.step_generator(cfg.seed, step), run.accelerator)
        common.set_lr(optimizer, common.lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps))
        optimizer.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        grad_norm = run.accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        row = {"loss": loss.item(), **stats, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
               "max_objects": max_objects_at(cfg, step), "carried": carried,
               "carried_rejected": pool.rejected if pool is not None else 0,
               "seconds": round(run.seconds(), 3)}  # training time so far
        if run.end_step(done, row, lambda: evaluate(pipe, cfg), done % cfg.eval_every == 0 or done == cfg.max_steps,
                        eval_at_cap=True, plot=("loss", "mse", "mse_edit"), describe=describe_eval):
            break
    if run.interrupted:
        return None
    model.eval()
    model.save_pretrained(run.run_dir / "transformer")
    evals = run.log.rows("eval")
    metrics = evals[-1] if evals else {}
    last = common.latest_checkpoint(run.run_dir)
    step = json.loads((last / "trainer_state.json").read_text())["step"] if last else 0
    metrics.update(step=step, train_seconds=run.train_seconds)
    common.write_json(run.run_dir / "metrics.json", metrics)
    return metrics


def start_pool(pipe, cfg: EditorConfig, run):
    """The carried pool of a run: the resumed checkpoint's, or new (every slot at its clean source); it is written
    into every checkpoint from then on."""
    pool = CarriedPool(pipe, cfg, cfg.carried_pool, cfg.carried_turns, cfg.seed)
    checkpoint = common.latest_checkpoint(run.run_dir)
    if checkpoint is None or not pool.load(checkpoint):
        pool.fill()
    run.save_hooks.append(pool.save)
    return pool


def describe_eval(metrics: dict) -> str:
    text = f"IF {metrics['IF']:.3f} CC {metrics['CC']:.3f} {metrics['IF_per_op']}"
    if "carried" in metrics:
        text += " carried IF by turn " + " ".join(f"{v:.2f}" for v in metrics["carried"]["IF"])
    return text


def main(argv=None) -> int:
    cfg, args = common.parse_args(EditorConfig, "gpu/editor.yaml", argv)
    metrics = train(cfg, args.run_dir, not args.no_progress, args.stop_after)
    print(json.dumps(metrics, indent=2) if metrics is not None else
          f"stopped after step {args.stop_after}; run the same command again to resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

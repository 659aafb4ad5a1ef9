"""The Edit-R2 nodes (ComfyUI V3 schema). They adapt `editr2.session` and `diffusers_editr2` to ComfyUI; no math here.

A session travels between nodes on an EDITR2_SESSION wire as an `editr2.session.Session` value: a node that "changes"
it returns a new one, so two Edit Turn nodes fed from the same wire branch the session without interfering.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from dataclasses import replace
from typing import Callable

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from editr2.filmstrip import filmstrip
from editr2.intent import REASONING_MODES
from editr2.session import SESSION_FILE, Session, SessionFormatError

from .images import pil_to_tensor, tensor_to_pil
from .model import (
    DEVICES,
    DTYPES,
    MEMORY_MODES,
    EditR2Model,
    list_loras,
    list_models,
    load_model,
    load_single_files,
    resolve_lora,
    resolve_model,
    with_lora,
)
from .single_file import list_configs, list_files, resolve_config, resolve_file

CATEGORY = "Edit-R2"
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
SESSION_SEARCH_DEPTH = 3  # how deep Load Session looks for session folders under input/ and output/
INPUT_NOTES = "input_notes"  # session.meta key: what was done to the source image to make it editable
CHANNEL_NOTES = {
    1: "the source image is greyscale (1 channel); it was converted to RGB",
    4: "the source image is RGBA (4 channels); its alpha channel was dropped (the RGB values are kept as they are)",
}

logger = logging.getLogger(__name__)

EditR2SessionType = io.Custom("EDITR2_SESSION")
EditR2ModelType = io.Custom("EDITR2_MODEL")


def _schema(node_id: str, display_name: str, description: str, **fields) -> io.Schema:
    """An `io.Schema` in the Edit-R2 category; `fields` are the node's inputs, outputs and other schema fields."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description, **fields)


def _validation_result(check: Callable[[], object], errors: tuple[type[Exception], ...] = (ValueError,)) -> bool | str:
    """What `validate_inputs` returns: True when `check()` passes, else the message of its error (shown on the node)."""
    try:
        check()
    except errors as e:
        return str(e)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Model


MODEL_OUTPUT_TOOLTIP = "The Edit-R2 model: connect it to Edit Turn's 'model' input (or to Load Edit-R2 LoRA first)."
DTYPE_TOOLTIP = "auto: bfloat16 on a GPU that supports it, else float32. Weights stored as fp8 are cast to it."
DEVICE_TOOLTIP = "auto: ComfyUI's device, offloaded when other models need the memory; cpu: run on the CPU."
MEMORY_TOOLTIP = (
    "comfyui: the whole model on the GPU for a turn (ComfyUI moves it out when other models need the room). "
    "fp8_storage: the transformer's weights stored as float8, computed in dtype (about half its memory). "
    "model_cpu_offload: one component at a time on the GPU. group_offload: blocks streamed to the GPU one at a time "
    "(least memory, slowest). The real model is ~20 B (transformer) + 7 B (text encoder) parameters."
)


def _memory_inputs() -> list:
    return [
        io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip=DTYPE_TOOLTIP),
        io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip=DEVICE_TOOLTIP),
        io.Combo.Input("memory", options=list(MEMORY_MODES), default="comfyui", optional=True,
                       tooltip=MEMORY_TOOLTIP),
    ]


class EditR2LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2LoadModel",
            display_name="Load Edit-R2 Model",
            description="Loads an Edit-R2 pipeline folder (the diffusers layout, e.g. a Qwen-Image-Edit-2509 or -2511 "
                        "folder) from models/editr2/, or the shipped tiny default. For ComfyUI's split model files "
                        "use 'Load Edit-R2 Model (single files)'.",
            inputs=[
                io.Combo.Input("model_name", options=list_models(),
                               tooltip="A pipeline folder (with model_index.json) in models/editr2/."),
                *_memory_inputs(),
            ],
            outputs=[EditR2ModelType.Output(display_name="model", tooltip=MODEL_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        return _validation_result(lambda: resolve_model(model_name), (FileNotFoundError, ValueError))

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto", device: str = "auto",
                memory: str = "comfyui") -> io.NodeOutput:
        return io.NodeOutput(load_model(model_name, dtype, device, memory))


class EditR2LoadSingleFiles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2LoadSingleFiles",
            display_name="Load Edit-R2 Model (single files)",
            description="Loads Qwen-Image-Edit-2509 or -2511 from ComfyUI's split model files: the diffusion model "
                        "(models/diffusion_models/), the Qwen2.5-VL text encoder (models/text_encoders/) and the VAE "
                        "(models/vae/). The configs ship with the pack; fp8 files are cast to dtype on load.",
            inputs=[
                io.Combo.Input("diffusion_model", options=list_files("diffusion_model"),
                               tooltip="The Qwen-Image-Edit transformer, e.g. qwen_image_edit_2509_fp8_e4m3fn."
                               "safetensors, from models/diffusion_models/."),
                io.Combo.Input("text_encoder", options=list_files("text_encoder"),
                               tooltip="Qwen2.5-VL-7B, e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors, from "
                               "models/text_encoders/. Writing intents needs a file with the LM head (lm_head)."),
                io.Combo.Input("vae", options=list_files("vae"),
                               tooltip="The Qwen-Image VAE, e.g. qwen_image_vae.safetensors, from models/vae/."),
                io.Combo.Input("config", options=list_configs(), default="auto",
                               tooltip="The release the files belong to; auto: 2511 when the diffusion model file "
                               "says so (its marker key or '2511' in its name), else 2509."),
                *_memory_inputs(),
            ],
            outputs=[EditR2ModelType.Output(display_name="model", tooltip=MODEL_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def validate_inputs(cls, diffusion_model: str, text_encoder: str, vae: str, config: str = "auto") -> bool | str:
        def check():
            for kind, name in (("diffusion_model", diffusion_model), ("text_encoder", text_encoder), ("vae", vae)):
                resolve_file(kind, name)
            resolve_config(config, diffusion_model)

        return _validation_result(check, (FileNotFoundError, ValueError))

    @classmethod
    def execute(cls, diffusion_model: str, text_encoder: str, vae: str, config: str = "auto", dtype: str = "auto",
                device: str = "auto", memory: str = "comfyui") -> io.NodeOutput:
        return io.NodeOutput(load_single_files(diffusion_model, text_encoder, vae, config, dtype, device, memory))


class EditR2LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2LoadLoRA",
            display_name="Load Edit-R2 LoRA",
            description="Adds an Edit-R2 LoRA (an EditR2Trainer output folder in models/editr2/loras/) to the model: "
                        "the transformer LoRA changes the edits, the reasoning LoRA the intents the text encoder "
                        "writes. Only this wire's turns use it; chain several nodes to stack LoRAs.",
            inputs=[
                EditR2ModelType.Input("model", tooltip="The model to add the LoRA to (Load Edit-R2 Model output)."),
                io.Combo.Input("lora_name", options=list_loras(),
                               tooltip="A folder in models/editr2/loras/ with pytorch_lora_weights.safetensors "
                               "(transformer) and/or reasoning_lora/ (text encoder), as EditR2Trainer saves them."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the transformer LoRA (0: off)."),
                io.Float.Input("reasoning_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the reasoning LoRA, active only while the intent is written."),
            ],
            outputs=[EditR2ModelType.Output(display_name="model", tooltip="The model with the LoRA added.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str) -> bool | str:
        return _validation_result(lambda: resolve_lora(lora_name), (FileNotFoundError, ValueError))

    @classmethod
    def execute(cls, model: EditR2Model, lora_name: str, strength: float = 1.0,
                reasoning_strength: float = 1.0) -> io.NodeOutput:
        if not isinstance(model, EditR2Model):
            raise ValueError("Load Edit-R2 LoRA: connect 'model' to a Load Edit-R2 Model output")
        return io.NodeOutput(with_lora(model, lora_name, strength, reasoning_strength))


# ----------------------------------------------------------------------------------------------------------------------
# Sessions and turns


class EditR2StartSession(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2StartSession",
            display_name="Start Edit-R2 Session",
            description="Starts a multi-turn editing session from one image, with optional persistent rules.",
            inputs=[
                io.Image.Input("image", tooltip="The source image (a batch of one); its size is the session's size, "
                               "rounded down to what the model needs."),
                io.String.Input("rules", multiline=True, default="", optional=True,
                                tooltip="Persistent rules, one per line, that every turn must keep."),
            ],
            outputs=[EditR2SessionType.Output(display_name="session",
                                              tooltip="The new session: connect it to an Edit Turn.")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, rules: str = "") -> io.NodeOutput:
        source = tensor_to_pil(image, node="Start Edit-R2 Session")
        rule_lines = tuple(line.strip() for line in rules.splitlines() if line.strip())
        notes = [CHANNEL_NOTES[image.shape[-1]]] if image.shape[-1] in CHANNEL_NOTES else []
        for note in notes:
            logger.warning("Start Edit-R2 Session: %s", note)
        meta = {INPUT_NOTES: notes} if notes else {}
        return io.NodeOutput(Session(source_image=source, rules=rule_lines, meta=meta))


def _step_callback(total_steps: int):
    """A diffusers `callback_on_step_end` that advances ComfyUI's progress bar and honours its interrupt."""
    bar = comfy.utils.ProgressBar(total_steps)

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)
        return callback_kwargs

    return on_step_end


def _negative_prompt(text: str, cfg: float) -> str | None:
    """The pipeline runs true CFG only with a negative prompt: cfg > 1 means CFG is on, even with an empty one."""
    if cfg <= 1:
        return None
    return text if text.strip() else " "


def _at_working_size(pipeline, session: Session) -> Session:
    """A fresh session at the pipeline's working size for its image (the image's own size, floored to the multiple the
    model needs), keeping the rules; the pipeline decides the size and does the resizing. A resize is logged and
    added to the session's input notes (`meta["input_notes"]`), which the first Edit Turn shows."""
    multiple_of = pipeline.vae_scale_factor * 2
    width, height = session.size
    if min(width, height) < multiple_of:
        raise ValueError(
            f"Edit Turn: the session's image is {width}x{height}; this model needs at least {multiple_of} pixels a "
            "side; scale it up first (e.g. the 'Upscale Image' node)"
        )
    started = pipeline.start_session(session.source_image, height=height, width=width)
    notes = list(session.meta.get(INPUT_NOTES, []))
    if started.size != session.size:
        note = (f"the image was resized from {width}x{height} to {started.size[0]}x{started.size[1]} (each side "
                f"rounded down to a multiple of {multiple_of}, as this model needs; resize it yourself to choose how)")
        logger.warning("Edit-R2 Edit Turn: %s", note)
        notes.append(note)
    meta = {**session.meta, **started.meta, **({INPUT_NOTES: notes} if notes else {})}
    return replace(started, rules=session.rules, meta=meta)


def _shown_text(intent: str, notes: list[str]) -> str:
    """What the Edit Turn node shows: the intent, then a `note:` line for each change made to the input."""
    return "\n".join([intent, *(f"note: {note}" for note in notes)])


def _turn_ui(shown: str, image: torch.Tensor, node: type) -> dict:
    """What Edit Turn shows on the node: the intent text (`text`) and a preview of the edited image (`images`)."""
    preview = ui.PreviewImage(image, cls=node)
    return {"text": (shown,), **preview.as_dict()}


def _check_instruction(instruction: str) -> None:
    if not instruction.strip():
        raise ValueError("Edit Turn: the instruction is empty; type what this turn should change")


class EditR2EditTurn(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2EditTurn",
            display_name="Edit-R2 Edit Turn",
            description="One editing turn: reconstructs the operative intent from the session (what this instruction "
                        "means given the earlier turns and rules), then edits the current image with it. Shows the "
                        "intent and the edited image on the node; two turns fed from one session branch it.",
            inputs=[
                EditR2SessionType.Input("session", tooltip="The session to continue (Start Session, Edit Turn or "
                                        "Load Session output)."),
                EditR2ModelType.Input("model", tooltip="The Edit-R2 model (Load Edit-R2 Model, single files or LoRA "
                                      "output)."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="What to change in this turn; it may refer to earlier turns."),
                io.Combo.Input("reasoning", options=list(REASONING_MODES), default="intent",
                               tooltip="intent: write the operative intent from the session first; history: all "
                               "instructions so far; none: this instruction only."),
                # min 2: with Qwen-Image's scheduler (shift_terminal) a single step divides 0 by 0 in diffusers
                io.Int.Input("steps", default=20, min=2, max=200, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=4.0, min=1.0, max=20.0, step=0.1, round=0.01,
                               tooltip="True classifier-free guidance scale (1 turns it off)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the turn's noise (and of sampled reasoning); the same seed and inputs "
                             "give the same edit."),
                io.String.Input("negative_prompt", multiline=True, default="", optional=True,
                                tooltip="Used when cfg > 1 (guidance is on then, even with this left empty)."),
                io.Float.Input("keep_unedited", default=0.0, min=0.0, max=10.0, step=0.05, round=0.01, optional=True,
                               tooltip="Copy the current image back wherever this turn changed it by at most this "
                               "much (RMS change per latent pixel, e.g. 0.2), so what the edit did not touch stays "
                               "exactly as it was over any number of turns. 0 = off."),
            ],
            outputs=[
                EditR2SessionType.Output(display_name="session",
                                         tooltip="The session with this turn added: connect the next Edit Turn."),
                io.Image.Output(display_name="image", tooltip="This turn's edited image."),
                io.String.Output(display_name="intent", tooltip="The operative intent that conditioned the edit (the "
                                 "instruction itself with reasoning 'none')."),
            ],
            is_output_node=True,  # its intent and image are shown on the node, and shown again when it is cached
        )

    @classmethod
    def validate_inputs(cls, instruction: str | None = None) -> bool | str:
        # at queue time, before any node runs; an instruction wired from another node arrives only in `execute`
        if instruction is None:
            return True
        return _validation_result(lambda: _check_instruction(instruction))

    @classmethod
    def execute(cls, session: Session, model: EditR2Model, instruction: str, reasoning: str = "intent",
                steps: int = 20, cfg: float = 4.0, seed: int = 0, negative_prompt: str = "",
                keep_unedited: float = 0.0) -> io.NodeOutput:
        if not isinstance(session, Session):
            raise ValueError("Edit Turn: connect 'session' to a Start Session, Edit Turn or Load Session output")
        _check_instruction(instruction)
        if reasoning not in REASONING_MODES:
            raise ValueError(f"Edit Turn: reasoning must be one of {list(REASONING_MODES)}, got {reasoning!r}")
        if not isinstance(model, EditR2Model):
            raise ValueError("Edit Turn: connect 'model' to a Load Edit-R2 Model output")
        if not (math.isfinite(keep_unedited) and keep_unedited >= 0):
            raise ValueError(f"Edit Turn: keep_unedited must be a finite change >= 0 (0 = off), got {keep_unedited}")
        if reasoning == "intent" and not model.can_reason:
            raise ValueError(
                "Edit Turn: this model's text-encoder file has no language-model head (lm_head.weight; ComfyUI's "
                "Qwen2.5-VL files may leave it out), so it cannot write intents; set reasoning to 'history' or "
                "'none', or load a text-encoder file that includes the head"
            )
        comfy.model_management.throw_exception_if_processing_interrupted()
        model.prepare()
        model.activate_loras()
        notes = []
        if session.num_turns == 0 and session.source_latents is None:
            session = _at_working_size(model.pipeline, session)
            notes = session.meta.get(INPUT_NOTES, [])
        output = model.pipeline(
            prompt=instruction,
            session=session,
            reasoning=reasoning,
            num_inference_steps=steps,
            true_cfg_scale=cfg,
            negative_prompt=_negative_prompt(negative_prompt, cfg),
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=_step_callback(steps),
            output_type="pil",
            reference_area=None,  # the source's reference latent at the session's size, not upstream's 1 MP
            keep_unedited=keep_unedited or None,
            **model.call_kwargs(),  # what the model folder was trained with (VLM image size, request template)
        )
        intent = output.intents[0]
        image = pil_to_tensor(output.images[0])
        return io.NodeOutput(output.session, image, intent, ui=_turn_ui(_shown_text(intent, notes), image, cls))


class EditR2SessionImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2SessionImages",
            display_name="Edit-R2 Session Images",
            description="All images of a session as one IMAGE batch: the source (optional), then each turn.",
            inputs=[
                EditR2SessionType.Input("session", tooltip="The session whose images to take."),
                io.Boolean.Input("include_source", default=True,
                                 tooltip="Put the source image first (off: the turns' images only)."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The images as one batch, oldest first.")],
        )

    @classmethod
    def execute(cls, session: Session, include_source: bool = True) -> io.NodeOutput:
        images = [im for im in session.images[(0 if include_source else 1):] if im is not None]
        if not images:
            raise ValueError("Session Images: the session has no turn images yet; add an Edit Turn or include_source")
        return io.NodeOutput(pil_to_tensor(images))


class EditR2SessionFilmstrip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2SessionFilmstrip",
            display_name="Edit-R2 Session Filmstrip",
            description="One image showing every turn, with its instruction and operative intent underneath.",
            inputs=[
                EditR2SessionType.Input("session", tooltip="The session to draw."),
                io.Int.Input("tile", default=256, min=16, max=2048, step=16,
                             tooltip="The longer side of each image in the strip, in pixels."),
            ],
            outputs=[io.Image.Output(display_name="filmstrip",
                                     tooltip="One image: every turn with its instruction and intent underneath.")],
        )

    @classmethod
    def execute(cls, session: Session, tile: int = 256) -> io.NodeOutput:
        return io.NodeOutput(pil_to_tensor(filmstrip(session, tile=tile)))


# ----------------------------------------------------------------------------------------------------------------------
# Save / load


def _inside(base: str, relative: str, *, strictly: bool = False) -> pathlib.Path:
    """`base / relative` resolved (symlinks followed), refusing absolute paths and `..` that would leave `base`; with
    `strictly`, also refusing `base` itself (e.g. "." or "a/..")."""
    base_path = pathlib.Path(base).resolve()
    path = (base_path / relative).resolve()
    escapes = not path.is_relative_to(base_path) or (strictly and path == base_path)
    if pathlib.PurePath(relative).is_absolute() or escapes:
        raise ValueError(f"{relative!r} must be a relative path inside {base_path}")
    return path


DEFAULT_FOLDER_PREFIX = "editr2/session"


def _save_prefix(folder_prefix: str) -> pathlib.Path:
    """Save Session's prefix as a resolved path strictly inside the output directory: the folders it writes,
    `<prefix>_00001`, ..., are then siblings of the prefix inside it (a prefix "." would write `output_00001` next to
    the output directory, so it is refused like ".." and absolute paths)."""
    return _inside(folder_paths.get_output_directory(), folder_prefix.strip() or DEFAULT_FOLDER_PREFIX, strictly=True)


class EditR2SaveSession(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2SaveSession",
            display_name="Save Edit-R2 Session",
            description="Saves the session (images, intents, latents) as a new folder in ComfyUI's output directory.",
            inputs=[
                EditR2SessionType.Input("session", tooltip="The session to save."),
                io.String.Input("folder_prefix", default=DEFAULT_FOLDER_PREFIX,
                                tooltip="Relative to the output directory, and inside it; _00001, _00002, ... is "
                                "appended."),
            ],
            outputs=[io.String.Output(display_name="folder",
                                      tooltip="The saved folder, relative to the output directory.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, folder_prefix: str | None = None) -> bool | str:
        # at queue time; a prefix wired from another node arrives only in `execute`
        if folder_prefix is None:
            return True
        return _validation_result(lambda: _save_prefix(folder_prefix))

    @classmethod
    def execute(cls, session: Session, folder_prefix: str = DEFAULT_FOLDER_PREFIX) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        prefix = _save_prefix(folder_prefix)
        counter = 1
        while (prefix.parent / f"{prefix.name}_{counter:05d}").exists():
            counter += 1
        folder = session.save(prefix.parent / f"{prefix.name}_{counter:05d}")  # a sibling of prefix: inside too
        relative = folder.relative_to(pathlib.Path(output_dir).resolve()).as_posix()
        text = f"Saved {session.num_turns} turn(s) to output/{relative} (load it as '{relative} [output]')"
        return io.NodeOutput(relative, ui=ui.PreviewText(text))


def _find_sessions(base: str) -> list[str]:
    """Relative (posix) paths of the session folders under `base`, at most SESSION_SEARCH_DEPTH levels deep."""
    found = []
    for root, dirs, files in os.walk(base):
        depth = len(pathlib.Path(root).relative_to(base).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < SESSION_SEARCH_DEPTH else []
        if SESSION_FILE in files and depth > 0:
            found.append(pathlib.Path(root).relative_to(base).as_posix())
    return sorted(found)


def list_sessions() -> list[str]:
    """Session folders in the input directory, then those in the output directory marked ' [output]'."""
    names = []
    for directory, suffix in ((folder_paths.get_input_directory(), ""),
                              (folder_paths.get_output_directory(), " [output]")):
        if os.path.isdir(directory):
            names += [name + suffix for name in _find_sessions(directory)]
    return names


def _session_path(folder: str) -> pathlib.Path:
    name, base = folder_paths.annotated_filepath(folder)
    return _inside(base or folder_paths.get_input_directory(), name)


def _load_session(folder: str) -> Session:
    """Loads `folder` (an entry of `list_sessions`), turning every failure into a one-line ValueError."""
    if not folder:
        raise ValueError("Load Session: no session folder picked; save one with Save Session or put one in input/")
    try:
        return Session.load(_session_path(folder))
    except (SessionFormatError, OSError, ValueError) as e:
        raise ValueError(f"Load Session: cannot load '{folder}': {e}") from None


class EditR2LoadSession(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="EditR2LoadSession",
            display_name="Load Edit-R2 Session",
            description="Loads a saved session folder from ComfyUI's input (or output) directory to continue it.",
            inputs=[io.Combo.Input("folder", options=list_sessions(), tooltip="A folder holding session.json.")],
            outputs=[EditR2SessionType.Output(display_name="session", tooltip="The loaded session: continue it with "
                                              "an Edit Turn."),
                     io.Image.Output(display_name="image", tooltip="The session's current (latest) image.")],
        )

    @classmethod
    def validate_inputs(cls, folder: str) -> bool | str:
        return _validation_result(lambda: _load_session(folder))

    @classmethod
    def fingerprint_inputs(cls, folder: str) -> float:
        try:
            return os.path.getmtime(_session_path(folder) / SESSION_FILE)
        except (OSError, ValueError):
            return float("nan")  # never equal to itself: run (and report the error) again

    @classmethod
    def execute(cls, folder: str) -> io.NodeOutput:
        session = _load_session(folder)
        return io.NodeOutput(session, pil_to_tensor(session.current_image))


NODES: list[type[io.ComfyNode]] = [
    EditR2LoadModel,
    EditR2LoadSingleFiles,
    EditR2LoadLoRA,
    EditR2StartSession,
    EditR2EditTurn,
    EditR2SessionImages,
    EditR2SessionFilmstrip,
    EditR2SaveSession,
    EditR2LoadSession,
]

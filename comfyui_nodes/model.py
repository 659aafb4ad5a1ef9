"""Finding, loading and memory-managing Edit-R2 pipelines inside ComfyUI.

Pipeline folders (the `save_pretrained` layout, with a `model_index.json`) live under `models/editr2/` (ComfyUI's
models directory, registered through `folder_paths`, so `extra_model_paths.yaml` can add more places). The shipped
default `editr2-shapes-tiny` is also looked for in this repository's `checkpoints/` folder.

A loaded pipeline's torch modules are wrapped in one `ModelPatcher`, so ComfyUI's memory management moves them to the
GPU before a turn (`load_models_gpu`) and back to the offload device when another model needs the memory.

Low-VRAM modes (`MEMORY_MODES`, the Load Model nodes' `memory` input) use diffusers' memory features instead:

- `comfyui` (default): the whole pipeline on the GPU for a turn, managed by ComfyUI as above;
- `fp8_storage`: the same, with the transformer's weights stored as float8 (`enable_layerwise_casting`) and each layer
  computed in the chosen dtype: about half the transformer's memory in bf16, at some quality cost;
- `model_cpu_offload`: one component at a time on the GPU (`enable_model_cpu_offload`; the text encoder's reasoning
  step included), the rest in CPU memory;
- `group_offload`: the transformer's and text encoder's blocks stream to the GPU one group at a time
  (`enable_group_offload`, block level, CUDA streams when on a GPU): the least GPU memory, the slowest.

In the offload modes the hooks move the weights themselves; before a turn the node asks ComfyUI to free the GPU memory
the largest component needs (`free_memory`), so other models (a ComfyUI checkpoint, an upscaler) make room.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass, replace
from typing import Any

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

MODEL_FOLDER = "editr2"  # folder_paths key and the folder name under ComfyUI's models/
DEFAULT_MODEL = "editr2-shapes-tiny"
# Call defaults of a model folder that Edit Turn applies (it has inputs for steps and CFG; the session's size follows
# the image, and the reference latent is always the session's own).
NODE_CALL_DEFAULTS = ("condition_area", "reasoning_condition_area", "template", "max_new_tokens", "max_history_images",
                      "max_sequence_length")
SHIPPED_CHECKPOINTS = pathlib.Path(__file__).resolve().parent.parent / "checkpoints"
EXAMPLE_INPUT = pathlib.Path(__file__).resolve().parent.parent / "example_workflows" / "editr2_shapes_scene.png"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu")
# Edit-R2 LoRAs: EditR2Trainer output folders in models/editr2/loras/<name>/, holding the transformer LoRA (diffusers'
# format) and/or the reasoning LoRA (peft's format, in reasoning_lora/)
LORA_SUBFOLDER = "loras"
TRANSFORMER_LORA_FILE = "pytorch_lora_weights.safetensors"
REASONING_LORA_DIR = "reasoning_lora"
MEMORY_MODES = ("comfyui", "fp8_storage", "model_cpu_offload", "group_offload")
FP8_STORAGE_DTYPE = torch.float8_e4m3fn


def register_model_folder() -> None:
    """Registers `models/editr2/` with ComfyUI (extra folders from extra_model_paths.yaml are kept)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def install_example_input() -> None:
    """Copies the example workflow's input image (`example_workflows/editr2_shapes_scene.png`, a MICE-Shapes scene
    the shipped tiny model was trained on) into ComfyUI's input directory, unless a file of that name is there. A
    pack installed without the repository's example_workflows/ copies nothing."""
    import logging
    import shutil

    source = EXAMPLE_INPUT
    target = pathlib.Path(folder_paths.get_input_directory()) / source.name
    if not source.is_file() or target.exists():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as e:
        logging.getLogger(__name__).warning("Edit-R2: could not copy the example input to %s: %s", target, e)


def _is_pipeline_dir(path: pathlib.Path) -> bool:
    return (path / "model_index.json").is_file()


def _model_dirs() -> list[pathlib.Path]:
    return [pathlib.Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]


def list_models() -> list[str]:
    """The model names a user can pick: the shipped default first, then every pipeline folder found."""
    names = [DEFAULT_MODEL]
    for base in _model_dirs():
        if base.is_dir():
            names += [p.name for p in sorted(base.iterdir()) if _is_pipeline_dir(p) and p.name not in names]
    return names


def resolve_model(name: str) -> pathlib.Path:
    """Returns the pipeline folder for `name`; raises `FileNotFoundError` saying where it was looked for."""
    if not name or pathlib.PurePath(name).name != name or name in (".", ".."):
        raise ValueError(f"model name must be a folder name (no path separators), got {name!r}")
    for base in _model_dirs():
        if _is_pipeline_dir(base / name):
            return base / name
    if name == DEFAULT_MODEL and _is_pipeline_dir(SHIPPED_CHECKPOINTS / name):
        return SHIPPED_CHECKPOINTS / name
    places = [str(base) for base in _model_dirs()]
    message = (
        f"Edit-R2 model '{name}' was not found. Put a pipeline folder named '{name}' (the save_pretrained layout, "
        f"with model_index.json) into one of: {', '.join(places)}."
    )
    if name == DEFAULT_MODEL:
        message += f" The shipped default is looked for at {SHIPPED_CHECKPOINTS / name}, and this install lacks it."
    raise FileNotFoundError(message)


def _pick_devices(device: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a device choice."""
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    if device == "auto":
        return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def _pick_dtype(dtype: str, load_device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    if load_device.type != "cpu" and comfy.model_management.should_use_bf16(load_device):
        return torch.bfloat16
    return torch.float32


class _PipelineModules(torch.nn.Module):
    """The pipeline's torch components under one module, so a ModelPatcher can measure and move them together."""

    def __init__(self, pipeline: Any):
        super().__init__()
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                self.add_module(name, component)


@dataclass(eq=False)
class EditR2Model:
    """What travels on an EDITR2_MODEL wire: the pipeline and the ModelPatcher ComfyUI manages it through.

    Args:
        name: the model name picked in the loader.
        pipeline: the loaded `diffusers_editr2.EditR2Pipeline`.
        patcher: a `comfy.model_patcher.ModelPatcher` over the pipeline's torch modules.
        memory: the low-VRAM mode (`MEMORY_MODES`).
        can_reason: False when the text encoder has no language-model head (a ComfyUI text-encoder file without
            `lm_head.weight`): it encodes prompts but cannot write intents.
        loras: `(kind, name, strength)` of each LoRA applied (Load Edit-R2 LoRA), in order.
    """

    name: str
    pipeline: Any
    patcher: Any
    memory: str = "comfyui"
    can_reason: bool = True
    loras: tuple = ()

    @property
    def call_defaults(self) -> dict:
        """The pipeline's call defaults (the `__call__` arguments its model was trained for: its folder's
        `editr2_call_defaults.json`; `{}` without one). Edit Turn passes those it has no input for
        (`NODE_CALL_DEFAULTS`)."""
        return getattr(self.pipeline, "call_defaults", {})

    def call_kwargs(self) -> dict:
        """The folder's call defaults that Edit Turn does not expose as inputs (e.g. the VLM's view of the image and
        the reasoning request template the model was trained with)."""
        return {k: v for k, v in self.call_defaults.items() if k in NODE_CALL_DEFAULTS}

    def activate_loras(self) -> None:
        """Switches the pipeline's adapters to this wire's LoRAs and strengths (none: all off). Several model wires
        share one pipeline, so each Edit Turn activates its own wire's set before running."""
        activate_loras(self.pipeline, self.loras)

    def prepare(self) -> None:
        """Moves the pipeline to its load device through ComfyUI (which may offload other models first); in the
        offload modes, asks ComfyUI to free what the largest component needs and leaves the moving to the hooks."""
        if self.memory in ("comfyui", "fp8_storage"):
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
            return
        if self.patcher.load_device.type != "cpu":
            comfy.model_management.free_memory(_offload_memory_required(self.pipeline, self.memory),
                                               self.patcher.load_device)


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _offload_memory_required(pipeline: Any, memory: str) -> int:
    """GPU bytes a turn needs in an offload mode: the largest component (model offload), or an eighth of it with
    some room for activations (group offload: one block group at a time, estimated)."""
    largest = max(_module_bytes(m) for m in pipeline.components.values() if isinstance(m, torch.nn.Module))
    return largest if memory == "model_cpu_offload" else largest // 8 + (1 << 30)


def apply_memory_mode(pipeline: Any, memory: str, load_device: torch.device, offload_device: torch.device,
                      dtype: torch.dtype) -> None:
    """Sets up `memory` (`MEMORY_MODES`) on a pipeline loaded on the CPU."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {list(MEMORY_MODES)}, got {memory!r}")
    if memory == "fp8_storage":
        pipeline.transformer.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=dtype)
    elif memory == "model_cpu_offload":
        pipeline.enable_model_cpu_offload(device=load_device)
    elif memory == "group_offload":
        pipeline.enable_group_offload(
            onload_device=load_device, offload_device=offload_device, offload_type="block_level",
            num_blocks_per_group=1, use_stream=load_device.type == "cuda",
        )


def _make_model(name: str, pipeline: Any, device: str, dtype: str, memory: str,
                can_reason: bool = True) -> EditR2Model:
    load_device, offload_device = _pick_devices(device)
    pipeline.set_progress_bar_config(disable=True)  # ComfyUI shows its own progress bar
    apply_memory_mode(pipeline, memory, load_device, offload_device, _pick_dtype(dtype, load_device))
    patcher = comfy.model_patcher.ModelPatcher(_PipelineModules(pipeline), load_device, offload_device)
    return EditR2Model(name=name, pipeline=pipeline, patcher=patcher, memory=memory,
                       can_reason=can_reason)


def load_model(name: str, dtype: str = "auto", device: str = "auto", memory: str = "comfyui") -> EditR2Model:
    """Loads the pipeline folder `name` (see `resolve_model`) on the offload device; `prepare()` moves it to run."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {list(MEMORY_MODES)}, got {memory!r}")
    path = resolve_model(name)
    # model_index.json may name this module, and diffusers loads components only from already-imported libraries
    import diffusers_editr2.processing  # noqa: F401
    from diffusers_editr2 import EditR2Pipeline

    load_device, _ = _pick_devices(device)
    torch_dtype = _pick_dtype(dtype, load_device)
    pipeline = EditR2Pipeline.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    return _make_model(name, pipeline, device, dtype, memory)


def load_single_files(diffusion_model: str, text_encoder: str, vae: str, config: str = "auto", dtype: str = "auto",
                      device: str = "auto", memory: str = "comfyui") -> EditR2Model:
    """Loads Qwen-Image-Edit from ComfyUI's split files (see `comfyui_nodes.single_file`), on the offload device."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {list(MEMORY_MODES)}, got {memory!r}")
    import diffusers_editr2.processing  # noqa: F401
    from diffusers_editr2.call_defaults import read_call_defaults

    from .single_file import load_pipeline

    load_device, _ = _pick_devices(device)
    pipeline, has_lm_head, config_dir = load_pipeline(diffusion_model, text_encoder, vae, config,
                                                      _pick_dtype(dtype, load_device))
    name = f"{diffusion_model} ({config_dir.name})"
    pipeline.call_defaults = read_call_defaults(config_dir)  # the shipped config's, as from_pretrained reads a folder's
    return _make_model(name, pipeline, device, dtype, memory, can_reason=has_lm_head)


# ----------------------------------------------------------------------------------------------------------------------
# LoRAs


def _lora_dirs() -> list[pathlib.Path]:
    return [base / LORA_SUBFOLDER for base in _model_dirs() if (base / LORA_SUBFOLDER).is_dir()]


def _is_lora_dir(path: pathlib.Path) -> bool:
    return (path / TRANSFORMER_LORA_FILE).is_file() or (path / REASONING_LORA_DIR / "adapter_config.json").is_file()


def list_loras() -> list[str]:
    """The Edit-R2 LoRA folders in models/editr2/loras/ (EditR2Trainer output folders)."""
    names = []
    for base in _lora_dirs():
        names += [p.name for p in sorted(base.iterdir()) if _is_lora_dir(p) and p.name not in names]
    return names


def resolve_lora(name: str) -> pathlib.Path:
    """The LoRA folder `name`; raises `FileNotFoundError` saying what belongs there."""
    if not name or pathlib.PurePath(name).name != name or name in (".", ".."):
        raise ValueError(f"LoRA name must be a folder name (no path separators), got {name!r}")
    for base in _lora_dirs():
        if _is_lora_dir(base / name):
            return base / name
    places = ", ".join(str(base / LORA_SUBFOLDER) for base in _model_dirs())
    raise FileNotFoundError(
        f"Edit-R2 LoRA '{name}' was not found. Put an EditR2Trainer output folder named '{name}' (with "
        f"{TRANSFORMER_LORA_FILE} and/or {REASONING_LORA_DIR}/) into one of: {places}."
    )


def _adapter_name(name: str) -> str:
    return "editr2_" + re.sub(r"\W", "_", name)


def with_lora(model: EditR2Model, name: str, strength: float = 1.0, reasoning_strength: float = 1.0) -> EditR2Model:
    """A model wire with the LoRA folder `name` added: its transformer LoRA at `strength` and its reasoning LoRA
    (on the reasoner, active only while the intent is written) at `reasoning_strength`. The adapters are loaded into the
    shared pipeline once; which of them are active is decided per wire ([`activate_loras`])."""
    path = resolve_lora(name)
    pipeline, adapter = model.pipeline, _adapter_name(name)
    has_transformer = (path / TRANSFORMER_LORA_FILE).is_file()
    has_reasoning = (path / REASONING_LORA_DIR / "adapter_config.json").is_file()
    if has_transformer and adapter not in (getattr(pipeline.transformer, "peft_config", None) or {}):
        pipeline.load_lora_weights(str(path), weight_name=TRANSFORMER_LORA_FILE, adapter_name=adapter)
    if has_reasoning and adapter not in (getattr(pipeline.reasoner, "peft_config", None) or {}):
        pipeline.load_reasoning_lora(str(path / REASONING_LORA_DIR), adapter_name=adapter)
    entry = (adapter, float(strength) if has_transformer else None,
             float(reasoning_strength) if has_reasoning else None)
    loras = tuple(lora for lora in model.loras if lora[0] != adapter) + (entry,)
    return replace(model, name=f"{model.name} + {name}", loras=loras)


def activate_loras(pipeline: Any, loras: tuple) -> None:
    """Makes exactly `loras` (`(adapter, strength or None, reasoning_strength or None)`) active on `pipeline`."""
    if getattr(pipeline, "_editr2_active_loras", ()) == loras:
        return
    transformer = [(adapter, s) for adapter, s, _ in loras if s is not None]
    if getattr(pipeline.transformer, "peft_config", None):
        if transformer:
            pipeline.enable_lora()
            pipeline.set_adapters([a for a, _ in transformer], adapter_weights=[s for _, s in transformer])
        else:
            pipeline.disable_lora()
    reasoning = [(adapter, s) for adapter, _, s in loras if s is not None]
    reasoner = pipeline.reasoner
    if getattr(reasoner, "_hf_peft_config_loaded", False):
        from peft.tuners.lora import LoraLayer

        if reasoning:
            reasoner.enable_adapters()
            reasoner.set_adapter([a for a, _ in reasoning])
            for module in reasoner.modules():
                if isinstance(module, LoraLayer):
                    for adapter, s in reasoning:
                        module.set_scale(adapter, s)
        else:
            reasoner.disable_adapters()
    pipeline.reasoning_prefix_cache.clear()  # the reasoning keys/values depend on the active adapters and strengths
    pipeline._editr2_active_loras = loras

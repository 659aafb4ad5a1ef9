"""Finding, loading and memory-managing Edit-R2 pipelines inside ComfyUI.

Pipeline folders (the `save_pretrained` layout, with a `model_index.json`) live under `models/editr2/` (ComfyUI's
models directory, registered through `folder_paths`, so `extra_model_paths.yaml` can add more places). The shipped
default `editr2-shapes-tiny` is also looked for in this repository's `checkpoints/` folder.

A loaded pipeline's torch modules are wrapped in one `ModelPatcher`, so ComfyUI's memory management moves them to the
GPU before a turn (`load_models_gpu`) and back to the offload device when another model needs the memory.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

MODEL_FOLDER = "editr2"  # folder_paths key and the folder name under ComfyUI's models/
DEFAULT_MODEL = "editr2-shapes-tiny"
# Call defaults of a model folder that Edit Turn applies (it has inputs for steps and CFG; the session's size follows
# the image, and the reference latent is always the session's own).
NODE_CALL_DEFAULTS = ("condition_area", "template", "max_new_tokens", "max_history_images", "max_sequence_length")
SHIPPED_CHECKPOINTS = pathlib.Path(__file__).resolve().parent.parent / "checkpoints"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu")


def register_model_folder() -> None:
    """Registers `models/editr2/` with ComfyUI (extra folders from extra_model_paths.yaml are kept)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


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

    The model folder's call defaults (the `__call__` arguments it was trained for) are the pipeline's
    (`pipeline.call_defaults`); Edit Turn passes those it has no input for (`NODE_CALL_DEFAULTS`).
    """

    name: str
    pipeline: Any
    patcher: Any

    @property
    def call_defaults(self) -> dict:
        """The pipeline's call defaults (its folder's `editr2_call_defaults.json`; `{}` without one)."""
        return getattr(self.pipeline, "call_defaults", {})

    def call_kwargs(self) -> dict:
        """The folder's call defaults that Edit Turn does not expose as inputs (e.g. the VLM's view of the image and
        the reasoning request template the model was trained with)."""
        return {k: v for k, v in self.call_defaults.items() if k in NODE_CALL_DEFAULTS}

    def prepare(self) -> None:
        """Moves the pipeline to its load device through ComfyUI (which may offload other models first)."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)


def load_model(name: str, dtype: str = "auto", device: str = "auto") -> EditR2Model:
    """Loads the pipeline folder `name` (see `resolve_model`) on the offload device; `prepare()` moves it to run."""
    path = resolve_model(name)
    # model_index.json may name this module, and diffusers loads components only from already-imported libraries
    import diffusers_editr2.processing  # noqa: F401
    from diffusers_editr2 import EditR2Pipeline

    load_device, offload_device = _pick_devices(device)
    torch_dtype = _pick_dtype(dtype, load_device)
    pipeline = EditR2Pipeline.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)  # ComfyUI shows its own progress bar
    patcher = comfy.model_patcher.ModelPatcher(_PipelineModules(pipeline), load_device, offload_device)
    return EditR2Model(name=name, pipeline=pipeline, patcher=patcher)

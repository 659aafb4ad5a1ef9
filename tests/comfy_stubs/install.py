"""Puts the stand-ins on sys.path for one test module and takes them (and the imported pack) away afterwards."""

import contextlib
import importlib
import pathlib
import sys
import types

import pytest

STUBS = pathlib.Path(__file__).resolve().parent
_MODULE_ROOTS = ("comfy_api", "comfy", "folder_paths", "comfyui_nodes", "workflow_api")


def _forget_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _MODULE_ROOTS:
            del sys.modules[name]


@contextlib.contextmanager
def installed(base: pathlib.Path):
    """Imports the stand-ins rooted at `base` (models/, input/, output/) and the Edit-R2 pack against them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITR2_STUB_COMFY_BASE", str(base))
        mp.syspath_prepend(str(STUBS))
        _forget_modules()
        try:
            yield types.SimpleNamespace(
                base=base,
                pack=importlib.import_module("comfyui_nodes"),
                nodes=importlib.import_module("comfyui_nodes.nodes"),
                model=importlib.import_module("comfyui_nodes.model"),
                folder_paths=importlib.import_module("folder_paths"),
                model_management=importlib.import_module("comfy.model_management"),
                utils=importlib.import_module("comfy.utils"),
                io=importlib.import_module("comfy_api.latest").io,
                workflow_api=importlib.import_module("workflow_api"),
            )
        finally:
            _forget_modules()

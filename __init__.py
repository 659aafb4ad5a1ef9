"""ComfyUI entry point for a clone of this repository in `ComfyUI/custom_nodes/` (the nodes live in comfyui_nodes/).

ComfyUI imports this file as the pack: it makes the repository's packages importable and re-exports the V3 entry
point. Imported anywhere else (pytest imports it while collecting tests/), it does nothing. It is not part of the
`editr2` Python distribution.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_api") is not None:  # inside ComfyUI
    _ROOT = os.path.dirname(os.path.abspath(__file__))
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

    from comfyui_nodes import comfy_entrypoint  # noqa: E402

    WEB_DIRECTORY = "./comfyui_nodes/web"
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]

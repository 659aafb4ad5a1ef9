"""Edit-R2 for diffusers: `EditR2Pipeline`, multi-turn intent-first editing over the Qwen-Image-Edit family.

Imports are lazy, so that `import diffusers_editr2` (and the `editr2` command line) stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EditR2Pipeline": "pipeline_editr2",
    "TurnConditioning": "pipeline_editr2",
    "ReasoningPrefixCache": "pipeline_editr2",
    "EditR2PipelineOutput": "pipeline_output",
    "Qwen2VLImageOnlyProcessor": "processing",
    "tiny_pipeline": "testing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_editr2' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

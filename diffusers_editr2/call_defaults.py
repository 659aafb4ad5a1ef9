"""A model folder's call defaults: the `__call__` arguments its model was trained for (size, steps, CFG, ...).

They live in the folder's `editr2_call_defaults.json`. [`EditR2Pipeline.from_pretrained`] reads them into
`pipe.call_defaults` and [`EditR2Pipeline.save_pretrained`] writes `pipe.call_defaults` back; `read_call_defaults` is
the one reader, for callers that need them without loading the model (e.g. to check settings first).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CALL_DEFAULTS_FILE = "editr2_call_defaults.json"


def read_call_defaults(path: str | os.PathLike) -> dict:
    """The call defaults of the pipeline folder `path`: its `editr2_call_defaults.json`, or `{}` when it has none
    (a real Qwen-Image-Edit folder, or a Hub id: upstream's defaults apply).

    Raises:
        `ValueError`: when the file holds anything but a JSON object.
    """
    file = Path(path) / CALL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    defaults = json.loads(file.read_text())
    if not isinstance(defaults, dict):
        raise ValueError(f"{file} holds {type(defaults).__name__}: it must be a JSON object of `__call__` arguments, "
                         f'e.g. {{"height": 64, "width": 64, "num_inference_steps": 16}}.')
    return defaults


def write_call_defaults(path: str | os.PathLike, call_defaults: dict) -> None:
    """Write `call_defaults` (a dict of JSON values) as the folder's `editr2_call_defaults.json`; nothing when empty."""
    if not isinstance(call_defaults, dict):
        raise TypeError(f"call_defaults must be a dict of `__call__` arguments, got {type(call_defaults).__name__}.")
    if call_defaults:
        (Path(path) / CALL_DEFAULTS_FILE).write_text(json.dumps(call_defaults, indent=2) + "\n")

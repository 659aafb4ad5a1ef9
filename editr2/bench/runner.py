"""The bench runner core of `editr2 bench shapes` and `editr2 bench mice`: edit a session with an `Editor`, and run
sessions against an append-only results file (`editr2.bench.resume`), skipping those already recorded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from .editors import Editor
from .resume import append_result, latest_by_id, read_results


class EditorOutputError(ValueError):
    """An editor that did not return one PIL image per turn."""


def edit_images(editor: Editor, source: Image.Image, instructions: Sequence[str], session: Any) -> list[Image.Image]:
    """`[source, turn 1, ..., turn T]` (RGB) of `editor.edit_session(source, instructions, session)`; raises
    `EditorOutputError` unless the editor returned one PIL image per instruction."""
    outputs = editor.edit_session(source, list(instructions), session)
    if len(outputs) != len(instructions) or not all(isinstance(im, Image.Image) for im in outputs):
        raise EditorOutputError(f"editor {editor.name} returned {len(outputs)} item(s) for {len(instructions)} turns; "
                                "it must return one PIL image per turn")
    return [source] + [im.convert("RGB") for im in outputs]


def run_sessions(items: Iterable[tuple[str, Any]], step: Callable[[str, Any, dict | None], tuple[dict | None, str]],
                 results_path: str | Path | None = None, done: dict[str, dict] | None = None) -> Counter:
    """Run `step(session_id, session, earlier)` for each `(session_id, session)` of `items`, in order.

    `earlier` is the session's last record in `results_path` (or in `done`, when given), else None. `step` returns
    `(record, outcome)`: a record (a new result, e.g. the session edited and scored) is appended to `results_path` at
    once, so a run killed later resumes after it; None records nothing (e.g. `earlier` is reused). Returns how many
    times each outcome occurred.
    """
    if done is None:
        done = latest_by_id(read_results(results_path)) if results_path is not None else {}
    outcomes: Counter = Counter()
    for session_id, session in items:
        record, outcome = step(session_id, session, done.get(session_id))
        if record is not None and results_path is not None:
            append_result(results_path, record)
        outcomes[outcome] += 1
    return outcomes



def model_call_kwargs(pipeline_kwargs: str | None, steps: int | None) -> dict:
    """The `__call__` arguments of a bench command's `--pipeline-kwargs JSON` and `--steps N` (`SystemExit` naming the
    flag for a bad one)."""
    call_kwargs = {}
    if pipeline_kwargs is not None:
        try:
            call_kwargs = json.loads(pipeline_kwargs)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--pipeline-kwargs must be a JSON object: {err}") from None
        if not isinstance(call_kwargs, dict):
            raise SystemExit('--pipeline-kwargs must be a JSON object, e.g. \'{"num_inference_steps": 8}\'')
    if steps is not None:
        if steps < 1:
            raise SystemExit(f"--steps {steps}: pass at least 1.")
        call_kwargs["num_inference_steps"] = steps
    return call_kwargs

"""MICE-Shapes: a procedural world of flat shapes on a textured background, with exact ground truth.

- `world`: vocabulary, `Obj`, `Scene`.
- `render`: `render(scene, size=64)` (deterministic, anti-aliased).
- `parser`: the oracle parser `parse(image) -> Scene` (and `analyze` for the background estimate and object mask).
- `grammar`: edit commands, their phrasings, a literal instruction parser and the canonical (gold) intent.
- `sessions`: `generate_session("cm" | "cu", num_turns, seed)` in the MICE JSONL format plus scenes and gold intents.
- `language`: everyday phrasing (`generate_session(..., phrasing="seen" | "unseen" | "all")`): phrasing families
  split into training and held-out ones, references, relative places, rule changes, undo of undo and restores, and
  the oracle reader `interpret(dialogue, text)` (docs/shapes_language.md).
- `reconstruct` (module): text-only intent reconstruction, `reconstruct.reconstruct(history, instruction) ->
  (reasoning, intent)`; imported on demand (`from editr2.bench.shapes import reconstruct` gives the module).
- `runner`: `run_bench(editor, ...)`, scoring any editor (imported on demand: it pulls in the metrics).
"""

from .grammar import (TASK_TYPES, Command, Literal, apply_command, canonical_intent, formatted_instruction,
                      parse_instruction, realize)
from .parser import ParseResult, analyze, analyze_batch, parse, parse_batch
from .render import DEFAULT_SIZE, render, render_background
from .sessions import FAMILIES, ShapesSession, generate_session, generate_sessions
from .world import CELL_NAMES, COLOR_NAMES, COLORS, SHAPES, SIZES, TONE_NAMES, Desc, Obj, Scene, random_scene

__all__ = [
    "TASK_TYPES", "Command", "Literal", "apply_command", "canonical_intent", "formatted_instruction",
    "parse_instruction", "realize", "ParseResult", "analyze", "analyze_batch", "parse", "parse_batch",
    "DEFAULT_SIZE", "render", "render_background", "FAMILIES", "ShapesSession", "generate_session",
    "generate_sessions", "CELL_NAMES", "COLOR_NAMES", "COLORS", "SHAPES", "SIZES", "TONE_NAMES", "Desc", "Obj",
    "Scene", "random_scene",
]

"""MICE-Bench session format: the JSON-lines format of the Edit-R2 release, loaded and written unchanged.

One session per line::

    {"image": "source_image/056257b296835f65.jpg",
     "instruction": [...], "task_type": [...], "formatted_instruction": [...],
     "bg_consistency": [...], "unchanged_objects": [[...], ...], "available_objects": [[...], ...],
     "all_objects": [[...], ...], "turns": 3}

Every per-turn field holds one entry per turn. ``available_objects`` and ``all_objects`` are optional (empty lists per
turn when absent; the release always has them); fields this module does not know are kept in ``MiceSession.extra`` and
written back, so MICE-Shapes sessions (which add ground-truth scenes) round-trip too.

``read_results`` reads the append-only ``results.jsonl`` the bench runner resumes from (`editr2.bench.resume`'s, with a
bad line reported as a `MiceFormatError`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import resume as _resume

# The nine EdiVal task types of the real release, plus "size_change" that only MICE-Shapes uses.
TASK_TYPES: tuple[str, ...] = (
    "subject_add",
    "subject_remove",
    "subject_replace",
    "count_change",
    "text_change",
    "background_change",
    "position_change",
    "color_alter",
    "material_alter",
)
SHAPES_ONLY_TASK_TYPES: tuple[str, ...] = ("size_change", "undo")
ALL_TASK_TYPES: tuple[str, ...] = TASK_TYPES + SHAPES_ONLY_TASK_TYPES

REQUIRED_FIELDS: tuple[str, ...] = (
    "image",
    "instruction",
    "task_type",
    "formatted_instruction",
    "bg_consistency",
    "unchanged_objects",
)
OPTIONAL_OBJECT_FIELDS: tuple[str, ...] = ("available_objects", "all_objects")
# Order in which fields are written: the release's order.
FIELD_ORDER: tuple[str, ...] = REQUIRED_FIELDS + OPTIONAL_OBJECT_FIELDS + ("turns",)


class MiceFormatError(ValueError):
    """A MICE-format line that cannot be used.

    Args:
        source: the file (or "<string>") the line came from.
        line: 1-based line number, or None.
        reason: what is wrong and what to pass instead.
        field: the offending field, if one.
    """

    def __init__(self, source: str, line: int | None, reason: str, field: str | None = None):
        self.source, self.line, self.reason, self.field = source, line, reason, field
        where = f"{source}:{line}" if line is not None else source
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {reason}")


@dataclass(frozen=True)
class MiceSession:
    """One multi-turn editing session in the MICE release format.

    Attributes:
        image: the source image path as written in the file (relative to an images directory).
        instruction: raw user instruction per turn.
        task_type: task type per turn (one of `ALL_TASK_TYPES`).
        formatted_instruction: self-contained instruction per turn, objects in [brackets].
        bg_consistency: whether the background must stay unchanged at this turn.
        unchanged_objects: objects that must stay unchanged at this turn (compared with the source image).
        available_objects: objects present after this turn (release field).
        all_objects: every object mentioned so far (release field).
        extra: fields this format does not define, kept and written back.
        source: file the session was read from ("" when built in code).
        line: 1-based line number in `source` (0 when built in code).
    """

    image: str
    instruction: tuple[str, ...]
    task_type: tuple[str, ...]
    formatted_instruction: tuple[str, ...]
    bg_consistency: tuple[bool, ...]
    unchanged_objects: tuple[tuple[str, ...], ...]
    available_objects: tuple[tuple[str, ...], ...] = ()
    all_objects: tuple[tuple[str, ...], ...] = ()
    extra: dict = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def num_turns(self) -> int:
        return len(self.instruction)

    @property
    def session_id(self) -> str:
        """A stable id for result files: the line number and the image's file stem (``00012_056257b296835f65``)."""
        return f"{self.line:05d}_{Path(self.image).stem}"

    def to_dict(self) -> dict[str, Any]:
        """The release-format dict (lists, not tuples), in the release's field order, extras last."""
        record: dict[str, Any] = {
            "image": self.image,
            "instruction": list(self.instruction),
            "task_type": list(self.task_type),
            "formatted_instruction": list(self.formatted_instruction),
            "bg_consistency": list(self.bg_consistency),
            "unchanged_objects": [list(objs) for objs in self.unchanged_objects],
            "available_objects": [list(objs) for objs in self.available_objects],
            "all_objects": [list(objs) for objs in self.all_objects],
            "turns": self.num_turns,
        }
        record.update(self.extra)
        return record

    @classmethod
    def from_dict(
        cls,
        record: Any,
        *,
        source: str = "<dict>",
        line: int | None = None,
        task_types: Sequence[str] = ALL_TASK_TYPES,
    ) -> "MiceSession":
        """Validate one release-format record and build a session.

        Raises:
            MiceFormatError: naming `source`, `line` and the field for a missing field, a wrong type, per-turn lists of
                different lengths, a `turns` that disagrees with them, or an unknown task type.
        """

        def fail(reason: str, name: str | None = None) -> MiceFormatError:
            return MiceFormatError(source, line, reason, name)

        if not isinstance(record, dict):
            raise fail(f"expected a JSON object per line, got {type(record).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise fail(f"missing required field(s) {missing}; a session needs {list(REQUIRED_FIELDS)}")
        if not isinstance(record["image"], str) or not record["image"]:
            raise fail("must be a non-empty string (the source image path)", "image")

        instruction = _string_list(record, "instruction", fail)
        num_turns = len(instruction)
        if num_turns == 0:
            raise fail("must hold at least one turn", "instruction")
        task_type = _string_list(record, "task_type", fail)
        formatted = _string_list(record, "formatted_instruction", fail)
        bg = record["bg_consistency"]
        if not isinstance(bg, list) or not all(isinstance(v, bool) for v in bg):
            raise fail("must be a list of true/false, one per turn", "bg_consistency")
        objects = {"unchanged_objects": _nested_string_list(record, "unchanged_objects", fail)}
        for name in OPTIONAL_OBJECT_FIELDS:
            objects[name] = _nested_string_list(record, name, fail) if name in record else [[]] * num_turns

        lengths = {"task_type": len(task_type), "formatted_instruction": len(formatted), "bg_consistency": len(bg)}
        lengths.update({name: len(value) for name, value in objects.items()})
        for name, length in lengths.items():
            if length != num_turns:
                raise fail(f"has {length} entries but 'instruction' has {num_turns}; every per-turn list needs one "
                           f"entry per turn", name)
        if "turns" in record and record["turns"] != num_turns:
            raise fail(f"is {record['turns']!r} but the per-turn lists have {num_turns} entries", "turns")
        for turn, name in enumerate(task_type):
            if name not in task_types:
                raise fail(f"unknown task type {name!r} at turn {turn + 1}; expected one of {list(task_types)}",
                           "task_type")

        extra = {key: value for key, value in record.items() if key not in FIELD_ORDER}
        return cls(
            image=record["image"],
            instruction=tuple(instruction),
            task_type=tuple(task_type),
            formatted_instruction=tuple(formatted),
            bg_consistency=tuple(bg),
            unchanged_objects=_freeze(objects["unchanged_objects"]),
            available_objects=_freeze(objects["available_objects"]),
            all_objects=_freeze(objects["all_objects"]),
            extra=extra,
            source=source,
            line=line or 0,
        )


def _string_list(record: dict, name: str, fail) -> list[str]:
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail("must be a list of strings, one per turn", name)
    return value


def _nested_string_list(record: dict, name: str, fail) -> list[list[str]]:
    value = record[name]
    ok = isinstance(value, list) and all(
        isinstance(objs, list) and all(isinstance(v, str) for v in objs) for objs in value
    )
    if not ok:
        raise fail("must be a list (one per turn) of lists of object names", name)
    return value


def _freeze(nested: list[list[str]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(objs) for objs in nested)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing session files
# ---------------------------------------------------------------------------------------------------------------------


def iter_session_lines(
    path: str | os.PathLike, *, task_types: Sequence[str] = ALL_TASK_TYPES
) -> Iterator[tuple[int, MiceSession | MiceFormatError]]:
    """Yield ``(line_number, session_or_error)`` for every non-blank line, without stopping at a bad one.

    The bench runner uses this to report bad sessions and carry on; `load_sessions` raises on the first.
    """
    source = str(path)
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                yield number, MiceFormatError(source, number, f"is not valid JSON ({err.msg} at column {err.colno})")
                continue
            try:
                yield number, MiceSession.from_dict(record, source=source, line=number, task_types=task_types)
            except MiceFormatError as err:
                yield number, err


def load_sessions(
    path: str | os.PathLike, *, limit: int | None = None, task_types: Sequence[str] = ALL_TASK_TYPES
) -> list[MiceSession]:
    """Load a MICE-format JSONL file (the release's `train_metadata.jsonl` loads as is).

    Args:
        path: the JSONL file. A last line without a newline is fine.
        limit: keep only the first `limit` sessions.
        task_types: accepted task types (default: the 9 real ones and "size_change").

    Raises:
        MiceFormatError: on the first bad line, naming the file and line.
    """
    sessions = []
    for _, item in iter_session_lines(path, task_types=task_types):
        if isinstance(item, MiceFormatError):
            raise item
        sessions.append(item)
        if limit is not None and len(sessions) >= limit:
            break
    return sessions


def write_sessions(path: str | os.PathLike, sessions: Iterable[MiceSession | dict]) -> Path:
    """Write sessions in the release format, atomically (a temporary file renamed into place).

    Lines are ``json.dumps`` with ``ensure_ascii=False`` in the release's field order; every line ends with a newline.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in sessions:
        record = item.to_dict() if isinstance(item, MiceSession) else MiceSession.from_dict(item).to_dict()
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    _resume.write_text_atomic(path, "".join(lines))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Append-only results (resume support)
# ---------------------------------------------------------------------------------------------------------------------


def read_results(path: str | os.PathLike, *, repair: bool = True) -> list[dict]:
    """Read the records of an append-only ``results.jsonl`` (`editr2.bench.resume.read_results`).

    A run killed while writing can leave a last line that is cut short. With `repair`, that line is dropped from the
    file (the session is simply run again); any other unreadable line raises `MiceFormatError`.
    """
    try:
        return _resume.read_results(path, repair=repair)
    except _resume.ResultsFileError as err:
        raise MiceFormatError(err.path, err.line, err.reason) from None

"""Multi-turn editing sessions: turns, persistent rules, and an atomic save / strict load.

A `Session` is a value. `append`, `truncate` and `with_rule` return new sessions and never change the one they are
called on; images and latent tensors are shared between the old and new session, never copied. Branching a session is
therefore cheap, and two branches share the `Turn` objects of their common history.

On disk a session is one directory:

```
session.json          format_version, size, rules, meta, per-turn text fields, seeds, timings, file names
source.png            the source image
turn_01.png ...       one PNG per turn that produced an image
latents.safetensors   only when latents are present: keys "source", "turn_01", ... (dtype preserved bit-exactly)
```

`session.json` also records each latent's dtype and shape (`"latents"`), and `load` checks the tensors against it.
Latents must be finite: `save` refuses NaN / inf latents and `load` refuses a file holding them (naming the turn), so
a diverged turn is never carried into later ones.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import pathlib
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

FORMAT_VERSION = 1
SESSION_FILE = "session.json"
SOURCE_FILE = "source.png"
LATENTS_FILE = "latents.safetensors"


class SessionFormatError(ValueError):
    """A saved session is corrupt, truncated or of an unknown format.

    Args:
        file: the file at fault (a path).
        field: the JSON field or latent key at fault, e.g. `"turns[1].intent"` ("" when the whole file is bad).
        reason: what is wrong, e.g. `"expected str, got int"`.
    """

    def __init__(self, file: str | os.PathLike, field: str, reason: str):
        self.file, self.field, self.reason = str(file), field, reason
        super().__init__(f"{self.file}: {field}: {reason}" if field else f"{self.file}: {reason}")


# ----------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_rgb(image: Any, name: str) -> None:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL.Image.Image in RGB mode, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"{name} must be an RGB image, got mode {image.mode!r}; pass image.convert('RGB')")


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not accepted as an int or float (a seed of True is a bug)."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _type_error(types: tuple[type, ...], value: Any, optional: bool = False) -> str:
    names = [t.__name__ for t in types] + (["null"] if optional else [])
    return f"expected {' or '.join(names)}, got {type(value).__name__}"


def _check_type(value: Any, types: type | tuple[type, ...], name: str) -> None:
    types = types if isinstance(types, tuple) else (types,)
    if not _is(value, types):
        raise ValueError(f"{name}: {_type_error(types, value)}")


def _check_timings(timings: Any, name: str) -> None:
    _check_type(timings, dict, name)
    for key, value in timings.items():
        _check_type(key, str, f"{name} key")
        _check_type(value, (int, float), f"{name}[{key!r}]")
        if not math.isfinite(value):
            raise ValueError(f"{name}[{key!r}]: expected a finite number of seconds, got {value}")


def _check_meta(meta: Any, name: str) -> None:
    _check_type(meta, dict, name)
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable (str, numbers, lists, dicts): {e}") from None


def _latents_problem(latents: torch.Tensor) -> str | None:
    """Why `latents` cannot be a session's latent (`(1, N, C)`, floating point, finite), or None when it can."""
    if latents.ndim != 3 or latents.shape[0] != 1:
        return f"expected shape (1, N, C), got {tuple(latents.shape)}"
    if not latents.dtype.is_floating_point:
        return f"expected a floating-point dtype, got {latents.dtype}"
    if not bool(torch.isfinite(latents).all()):
        return "non-finite values (NaN or inf): the turn that made them diverged"
    return None


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _turn_label(key: str) -> str:
    """`"source"` -> "the source", `"turn_02"` -> "turn 2" (1-based, as users count turns)."""
    number = key.removeprefix("turn_")
    return "the source" if key == "source" else f"turn {int(number)}" if number.isdigit() else repr(key)


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _same_image(a: Image.Image | None, b: Image.Image | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------------------------------------------------
# Turn and Session


@dataclass(frozen=True, eq=False)
class Turn:
    """One editing turn.

    Args:
        instruction: the raw user text of this turn.
        image: the produced image (RGB, the session's size), or None when the turn produced none.
        intent: the operative intent that conditioned the edit (== instruction when no reasoning is used).
        reasoning: the `<think>` trace ("" when none).
        fallback_reason: why the reasoning answer was not used (`editr2.intent`'s `FALLBACK_*`: "empty_output",
            "no_think_end_tag", "empty_after_think", "too_long"), or None.
        seed: the sampling seed, or None.
        timings: seconds per stage ("reasoning", "encode", "denoise", "decode", "total"); finite numbers.
        latents: `(1, N, C)` packed, normalised latent of `image`, carried to the next turn; or None.
        meta: JSON-serialisable extras (task_type, reasoning mode, ...). Treat as read-only: it is shared, not copied.
        restored_from: the earlier session state this turn restored (0 = the source, k = the state after turn k), or
            None for an ordinary edit. A restore turn holds that state's image and latents (the same objects, see
            `Session.restore`); nothing was generated.
    """

    instruction: str
    image: Image.Image | None
    intent: str
    reasoning: str = ""
    fallback_reason: str | None = None
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    restored_from: int | None = None

    def __post_init__(self):
        if self.restored_from is not None:
            _check_type(self.restored_from, int, "Turn.restored_from")
            if self.restored_from < 0:
                raise ValueError(f"Turn.restored_from must be a state index >= 0 (0 = the source), got "
                                 f"{self.restored_from}")
        for name in ("instruction", "intent", "reasoning"):
            _check_type(getattr(self, name), str, f"Turn.{name}")
        if self.image is not None:
            _check_rgb(self.image, "Turn.image")
        if self.fallback_reason is not None:
            _check_type(self.fallback_reason, str, "Turn.fallback_reason")
        if self.seed is not None:
            _check_type(self.seed, int, "Turn.seed")
        if self.latents is not None:
            _check_type(self.latents, torch.Tensor, "Turn.latents")
        _check_timings(self.timings, "Turn.timings")
        _check_meta(self.meta, "Turn.meta")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Turn):
            return NotImplemented
        plain = ("instruction", "intent", "reasoning", "fallback_reason", "seed", "timings", "meta", "restored_from")
        return (
            all(getattr(self, k) == getattr(other, k) for k in plain)
            and _same_image(self.image, other.image)
            and _same_tensor(self.latents, other.latents)
        )


@dataclass(frozen=True, eq=False)
class Session:
    """A multi-turn editing session: the source image, the turns so far and the persistent rules.

    Args:
        source_image: the image the session starts from (RGB). Every turn image must have its size.
        turns: the turns so far, oldest first (a list is accepted and stored as a tuple).
        rules: persistent rules given explicitly (rules stated inside instructions are found by `editr2.intent`).
        source_latents: `(1, N, C)` packed, normalised latent of the source image, or None.
        meta: JSON-serialisable extras. Treat as read-only: it is shared, not copied.
    """

    source_image: Image.Image
    turns: tuple[Turn, ...] = ()
    rules: tuple[str, ...] = ()
    source_latents: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_rgb(self.source_image, "Session.source_image")
        object.__setattr__(self, "turns", tuple(self.turns))
        object.__setattr__(self, "rules", tuple(self.rules))
        for i, turn in enumerate(self.turns):
            _check_type(turn, Turn, f"Session.turns[{i}]")
            if turn.restored_from is not None and turn.restored_from > i:
                raise ValueError(f"Session.turns[{i}].restored_from is {turn.restored_from}, but only states 0..{i} "
                                 "exist before that turn")
            if turn.image is not None and turn.image.size != self.source_image.size:
                raise ValueError(
                    f"Session.turns[{i}].image has size {turn.image.size}, the source has {self.source_image.size}; "
                    "resize the turn image to the source size"
                )
        for i, rule in enumerate(self.rules):
            _check_type(rule, str, f"Session.rules[{i}]")
        if self.source_latents is not None:
            _check_type(self.source_latents, torch.Tensor, "Session.source_latents")
        _check_meta(self.meta, "Session.meta")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Session):
            return NotImplemented
        return (
            _same_image(self.source_image, other.source_image)
            and self.turns == other.turns
            and self.rules == other.rules
            and _same_tensor(self.source_latents, other.source_latents)
            and self.meta == other.meta
        )

    # -- modifiers: each returns a new Session ---------------------------------------------------------------------

    def append(self, turn: Turn) -> Session:
        """Returns a new session with `turn` added at the end."""
        return replace(self, turns=self.turns + (turn,))

    def truncate(self, num_turns: int) -> Session:
        """Returns a new session keeping only the first `num_turns` turns (undo)."""
        if not 0 <= num_turns <= self.num_turns:
            raise ValueError(f"num_turns must be in [0, {self.num_turns}], got {num_turns}")
        return replace(self, turns=self.turns[:num_turns])

    def restore(self, index: int, instruction: str, intent: str | None = None, **turn_fields) -> Session:
        """Returns a new session with one more turn that restores the state after turn `index` (0 = the source).

        The new turn holds that state's image and latents, the same objects (shared, never copied or regenerated), and
        records `restored_from=index`; later turns continue from it exactly as from the restored state. Restoring the
        source gives the turn the source image and the source latents only when they are at the working size
        (`meta["source_latents_size"]`); otherwise its latents are None and the pipeline uses the source's reference
        latent for the next turn (`state_origin`).

        Args:
            index (`int`): the state to restore, `0 <= index <= num_turns`.
            instruction (`str`): the user's text of this turn.
            intent (`str`, *optional*): the operative intent (defaults to `instruction`).
            turn_fields: other [`Turn`] fields (`reasoning`, `fallback_reason`, `seed`, `timings`, `meta`).
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= self.num_turns:
            raise ValueError(f"`index` must be a state of this session, an int in [0, {self.num_turns}] (0 = the "
                             f"source, k = after turn k), got {index!r}")
        state = self.truncate(index)
        image, latents = state.current_image, state.current_latents
        if state.state_origin(index) == 0 and list(self.meta.get("source_latents_size") or []) != list(self.size):
            latents = None  # the source's latent is at the reference size, not the working size
        turn = Turn(instruction=instruction, image=image, intent=instruction if intent is None else intent,
                    latents=latents, restored_from=index, **turn_fields)
        return self.append(turn)

    def state_origin(self, index: int | None = None) -> int:
        """The state whose image the state after turn `index` shows (default: the current one), following restore
        turns and turns without an image back to the turn that drew it; 0 = the source image."""
        index = self.num_turns if index is None else index
        while index > 0:
            turn = self.turns[index - 1]
            if turn.restored_from is not None:
                index = turn.restored_from
            elif turn.image is None:
                index -= 1
            else:
                return index
        return 0

    def with_rule(self, rule: str) -> Session:
        """Returns a new session with the persistent `rule` added (unchanged if it is already there)."""
        _check_type(rule, str, "rule")
        return self if rule in self.rules else replace(self, rules=self.rules + (rule,))

    # -- views -------------------------------------------------------------------------------------------------------

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def instructions(self) -> list[str]:
        return [t.instruction for t in self.turns]

    @property
    def intents(self) -> list[str]:
        return [t.intent for t in self.turns]

    @property
    def images(self) -> list[Image.Image | None]:
        """`[source, turn 1, ..., turn T]`; a turn that produced no image contributes None."""
        return [self.source_image] + [t.image for t in self.turns]

    @property
    def current_image(self) -> Image.Image:
        """The most recent turn image, or the source when no turn produced one."""
        return next((t.image for t in reversed(self.turns) if t.image is not None), self.source_image)

    @property
    def current_latents(self) -> torch.Tensor | None:
        """The latents paired with `current_image` (None when that image has none)."""
        turn = next((t for t in reversed(self.turns) if t.image is not None), None)
        return self.source_latents if turn is None else turn.latents

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the source image."""
        return self.source_image.size

    # -- persistence -------------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Saves the session to `directory` atomically; returns its path.

        Everything is written and fsynced into a temporary sibling directory (`.<name>.tmp-*`), which is then swapped
        in with `os.replace`. An existing session at `directory` is first renamed aside (`.<name>.old-<time>-*`) and
        deleted after the swap, so a crash leaves either the old or the new session complete (in the instant between
        the two renames the old one sits aside; `load` names it if it finds nothing else). An existing directory that
        is not a saved session is refused rather than replaced.

        A save that was killed (power loss, `kill -9`) leaves its temporary or aside sibling behind; the next `save`
        or `load` of the same session removes them once a complete session is in place. One process at a time may
        save a given session.

        Raises:
            `ValueError`: `directory` holds something else, or a latent is not `(1, N, C)`, floating point and finite
            (a diverged turn's NaN latents are refused here, naming the turn).
        """
        _check_latents_savable(self)
        target = pathlib.Path(directory)
        if target.exists() and not (target / SESSION_FILE).is_file() and (target.is_file() or any(target.iterdir())):
            raise ValueError(f"{target} exists and is not a saved session; pass a new or empty directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(target, include_aside=False)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_session(self, tmp)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remove_leftovers(target, include_aside=True)  # a complete session is in place: older copies are stale
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Session:
        """Loads a session saved by `save`; raises `SessionFormatError` naming the file and field on corrupt input.

        Every image must be a file inside `directory` (a symbolic link that leads out of it is refused), and every
        latent must match the dtype and shape `session.json` records and be finite. Leftovers of a killed `save` of
        this session (see `save`) are removed once it loaded.
        """
        directory = pathlib.Path(directory)
        if directory.name == SESSION_FILE and directory.is_file():
            directory = directory.parent
        if not directory.is_dir():
            aside = _aside_copies(directory)
            hint = (
                f" (an interrupted save left the previous version at {aside[-1]}; rename it to {directory.name})"
                if aside
                else ""
            )
            raise FileNotFoundError(f"no saved session at {directory}{hint}")
        session = _read_session(directory)
        _remove_leftovers(directory, include_aside=True)
        return session


def _check_latents_savable(session: Session) -> None:
    named = [("source", session.source_latents)]
    named += [(f"turn_{i:02d}", t.latents) for i, t in enumerate(session.turns, start=1)]
    for key, latents in named:
        problem = None if latents is None else _latents_problem(latents)
        if problem:
            raise ValueError(f"Cannot save the latents of {_turn_label(key)}: {problem}. Rebuild that turn (or drop "
                             "it with `truncate`) before saving.")


def _aside_copies(target: pathlib.Path) -> list[pathlib.Path]:
    """Complete sessions an interrupted `save` renamed aside, oldest first (their names embed the time of the save)."""
    def when(path: pathlib.Path) -> tuple[int, float]:
        stamp = path.name.rsplit(".old-", 1)[1].split("-")[0]
        return (int(stamp), 0.0) if stamp.isdigit() and len(stamp) > 8 else (0, path.stat().st_mtime)

    pattern = f".{glob.escape(target.name)}.old-*"
    copies = [p for p in target.parent.glob(pattern) if (p / SESSION_FILE).is_file()]
    return sorted(copies, key=when)


def _remove_leftovers(target: pathlib.Path, include_aside: bool) -> None:
    """Remove what killed saves of `target` left next to it: temporary folders, and (once `target` holds a complete
    session, `include_aside`) copies renamed aside."""
    name = glob.escape(target.name)
    patterns = [f".{name}.tmp-*"] + ([f".{name}.old-*"] if include_aside else [])
    if include_aside and not (target / SESSION_FILE).is_file():
        return
    for pattern in patterns:
        for path in target.parent.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def _fsync_write(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _fsync_dir(path: pathlib.Path) -> None:
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_session(session: Session, directory: pathlib.Path) -> None:
    from safetensors.torch import save as save_tensors

    latents = {}
    if session.source_latents is not None:
        latents["source"] = session.source_latents
    _fsync_write(directory / SOURCE_FILE, _png_bytes(session.source_image))
    turns = []
    for i, turn in enumerate(session.turns, start=1):
        name = f"turn_{i:02d}"
        if turn.image is not None:
            _fsync_write(directory / f"{name}.png", _png_bytes(turn.image))
        if turn.latents is not None:
            latents[name] = turn.latents
        turns.append(
            {
                "instruction": turn.instruction,
                "intent": turn.intent,
                "reasoning": turn.reasoning,
                "fallback_reason": turn.fallback_reason,
                "seed": turn.seed,
                "timings": {k: float(v) for k, v in turn.timings.items()},
                "meta": turn.meta,
                "image": f"{name}.png" if turn.image is not None else None,
                "latents": name if turn.latents is not None else None,
                "restored_from": turn.restored_from,
            }
        )
    if latents:
        # clone: safetensors refuses tensors that share memory, and a branch may reuse one tensor twice
        cpu = {k: v.detach().to("cpu").clone().contiguous() for k, v in latents.items()}
        _fsync_write(directory / LATENTS_FILE, save_tensors(cpu))
    doc = {
        "format_version": FORMAT_VERSION,
        "size": list(session.size),
        "source_image": SOURCE_FILE,
        "source_latents": "source" if session.source_latents is not None else None,
        "rules": list(session.rules),
        "meta": session.meta,
        "turns": turns,
        "latents": {k: {"dtype": _dtype_name(v), "shape": list(v.shape)} for k, v in latents.items()},
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)
    _fsync_write(directory / SESSION_FILE, text.encode("utf-8"))
    _fsync_dir(directory)


def _swap_in(tmp: pathlib.Path, target: pathlib.Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
    elif not any(target.iterdir()):
        target.rmdir()
        os.replace(tmp, target)
    else:
        old = target.parent / f".{target.name}.old-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


# ----------------------------------------------------------------------------------------------------------------------
# Reading (strict: every field is checked and every error names its file and field)


def _get(doc: dict, key: str, types: type | tuple[type, ...], where: str, file: pathlib.Path, optional=False) -> Any:
    path = f"{where}.{key}" if where else key
    if key not in doc:
        raise SessionFormatError(file, path, "missing field")
    value = doc[key]
    if value is None and optional:
        return None
    types = types if isinstance(types, tuple) else (types,)
    if not _is(value, types):
        raise SessionFormatError(file, path, _type_error(types, value, optional))
    return value


def _read_image(directory: pathlib.Path, name: str, field: str, size: tuple[int, int] | None) -> Image.Image:
    path = directory / name
    if pathlib.Path(name).name != name:
        raise SessionFormatError(directory / SESSION_FILE, field, f"image name {name!r} must be a plain file name")
    if not path.is_file():
        raise SessionFormatError(path, field, "missing image file")
    _check_inside(directory, path, field)
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except Exception as e:  # PIL raises many types for truncated / non-image files
        raise SessionFormatError(path, field, f"unreadable image ({e})") from None
    if image.mode != "RGB":
        raise SessionFormatError(path, field, f"expected an RGB image, got mode {image.mode!r}")
    if size is not None and image.size != size:
        raise SessionFormatError(path, field, f"image size {image.size} does not match the session size {size}")
    return image


def _check_inside(directory: pathlib.Path, path: pathlib.Path, field: str) -> None:
    """Refuse a file that is a symbolic link leading out of the session folder (loading would read any file)."""
    if not path.resolve().is_relative_to(directory.resolve()):
        raise SessionFormatError(path, field, f"a symbolic link to {path.resolve()}, outside the session folder; "
                                 "copy the file into the folder instead")


def _read_latents(directory: pathlib.Path, doc: dict, file: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    names = [doc.get("source_latents")] + [t.get("latents") for t in doc["turns"] if isinstance(t, dict)]
    if not any(isinstance(n, str) for n in names):
        return {}
    path = directory / LATENTS_FILE
    if not path.is_file():
        raise SessionFormatError(path, "", "missing latents file (session.json refers to latents)")
    _check_inside(directory, path, "")
    try:
        return load_file(path)
    except Exception as e:
        raise SessionFormatError(path, "", f"unreadable safetensors file ({e})") from None


def _latent(
    tensors: dict, key: str | None, field: str, directory: pathlib.Path, layout: dict | None
) -> torch.Tensor | None:
    """The tensor `key` of the latents file, checked: `(1, N, C)`, floating point, finite, and (when `session.json`
    records it) of the recorded dtype and shape."""
    if key is None:
        return None
    path = directory / LATENTS_FILE
    if key not in tensors:
        raise SessionFormatError(path, field, f"missing tensor {key!r}")
    latents = tensors[key]
    label = _turn_label(key)
    expected = (layout or {}).get(key)
    if expected is not None:
        dtype, shape = _dtype_name(latents), list(latents.shape)
        if not isinstance(expected, dict) or (expected.get("dtype"), expected.get("shape")) != (dtype, shape):
            raise SessionFormatError(
                path, field, f"the latents of {label} are {dtype} {tuple(shape)}, but session.json records {expected}; "
                "the latents file does not belong to this session"
            )
    problem = _latents_problem(latents)
    if problem:
        raise SessionFormatError(path, field, f"the latents of {label}: {problem}")
    return latents


def _read_session(directory: pathlib.Path) -> Session:
    file = directory / SESSION_FILE
    if not file.is_file():
        raise SessionFormatError(file, "", "missing file")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SessionFormatError(file, "", f"not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(doc, dict):
        raise SessionFormatError(file, "", f"expected a JSON object, got {type(doc).__name__}")

    version = _get(doc, "format_version", int, "", file)
    if version > FORMAT_VERSION:
        raise SessionFormatError(file, "format_version", f"{version} is newer than this editr2 reads ({FORMAT_VERSION}); "
                                 "upgrade editr2")
    size = _get(doc, "size", list, "", file)
    if len(size) != 2 or not all(_is(s, (int,)) and s > 0 for s in size):
        raise SessionFormatError(file, "size", f"expected [width, height] of positive ints, got {size}")
    size = tuple(size)
    source_name = _get(doc, "source_image", str, "", file)
    _get(doc, "source_latents", str, "", file, optional=True)
    rules = _get(doc, "rules", list, "", file)
    for i, rule in enumerate(rules):
        if not isinstance(rule, str):
            raise SessionFormatError(file, f"rules[{i}]", f"expected str, got {type(rule).__name__}")
    meta = _get(doc, "meta", dict, "", file)
    turn_docs = _get(doc, "turns", list, "", file)

    fields = {}  # per turn: validated JSON values
    for i, t in enumerate(turn_docs):
        where = f"turns[{i}]"
        if not isinstance(t, dict):
            raise SessionFormatError(file, where, f"expected object, got {type(t).__name__}")
        fields[i] = dict(
            instruction=_get(t, "instruction", str, where, file),
            intent=_get(t, "intent", str, where, file),
            reasoning=_get(t, "reasoning", str, where, file),
            fallback_reason=_get(t, "fallback_reason", str, where, file, optional=True),
            seed=_get(t, "seed", int, where, file, optional=True),
            timings=_get(t, "timings", dict, where, file),
            meta=_get(t, "meta", dict, where, file),
            image=_get(t, "image", str, where, file, optional=True),
            latents=_get(t, "latents", str, where, file, optional=True),
            # absent in files written before restores were recorded: an ordinary edit
            restored_from=_get(t, "restored_from", int, where, file, optional=True) if "restored_from" in t else None,
        )
        restored = fields[i]["restored_from"]
        if restored is not None and not 0 <= restored <= i:
            raise SessionFormatError(file, f"{where}.restored_from", f"expected a state in [0, {i}], got {restored}")
        for key, value in fields[i]["timings"].items():
            if not _is(value, (int, float)):
                raise SessionFormatError(file, f"{where}.timings.{key}", _type_error((float,), value))

    layout = doc.get("latents")  # {key: {"dtype", "shape"}}; absent in files written before it was recorded
    if layout is not None and not isinstance(layout, dict):
        raise SessionFormatError(file, "latents", _type_error((dict,), layout, optional=True))
    tensors = _read_latents(directory, doc, file)
    source = _read_image(directory, source_name, "source_image", size)
    turns = []
    for i, f in fields.items():
        image_name = f.pop("image")
        image = None if image_name is None else _read_image(directory, image_name, f"turns[{i}].image", size)
        latents = _latent(tensors, f.pop("latents"), f"turns[{i}].latents", directory, layout)
        turns.append(Turn(image=image, latents=latents, **f))
    source_latents = _latent(tensors, doc["source_latents"], "source_latents", directory, layout)
    return Session(source, tuple(turns), tuple(rules), source_latents, meta)

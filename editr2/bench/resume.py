"""Resumable bench output folders, shared by `editr2 bench mice` and `editr2 bench shapes`.

A bench run writes one JSON line per finished session to an append-only results file, and records what produced those
results (editor, model fingerprint, judges, metrics, reasoning mode, call settings, ...) in ``OUT/bench_config.json``.
Started again with the same output folder, a run skips the sessions already recorded; started with a different
configuration, it stops with a `ConfigMismatchError` naming the settings that differ, instead of mixing (or
relabelling) results of two set-ups. ``force=True`` (``--force`` on the command line) deletes the old results and
starts over; a new folder needs nothing.

    from editr2.bench.resume import append_result, open_run, read_results

    open_run(out_dir, {"editor": "identity", "metrics": ["IF", "GA"]}, outputs=["results.jsonl"])
    done = {r["session_id"] for r in read_results(out_dir / "results.jsonl")}
    ...
    append_result(out_dir / "results.jsonl", {"session_id": "00001_x", ...})
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

CONFIG_FILE = "bench_config.json"

# model_fingerprint: files up to this size are hashed whole; larger ones by size and three sampled blocks.
_WHOLE_FILE_LIMIT = 4 * 2**20
_SAMPLE_BYTES = 2**20
# documentation in a model folder (its model card and the card's pictures): no output depends on it
DOCUMENTATION_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp")


class ConfigMismatchError(ValueError):
    """An output folder holds results made with another configuration (or with an unknown one)."""


class ResultsFileError(ValueError):
    """A results file line that is not a results record (and is not a last line cut short by a kill).

    Args:
        path: the results file.
        line: 1-based line number.
        reason: what is wrong with the line.
    """

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


# ---------------------------------------------------------------------------------------------------------------------
# The configuration record
# ---------------------------------------------------------------------------------------------------------------------


def normalize_config(config: dict) -> dict:
    """`config` as it reads back from JSON (tuples become lists, keys strings); refuses what JSON cannot hold."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of JSON values, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config must hold only finite JSON values (str, number, bool, None, list, dict): {err}") \
            from None


def config_differences(recorded: dict, current: dict) -> list[str]:
    """One line per top-level key whose value differs: ``key: <recorded> (recorded) vs <current> (now)``."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            lines.append(f"{key}: {json.dumps(old, sort_keys=True)} (recorded) vs {json.dumps(new, sort_keys=True)} "
                         "(now)")
    return lines


def open_run(out_dir: str | os.PathLike, config: dict, *, outputs: Sequence[str] = ("results.jsonl",),
             force: bool = False, force_hint: str = "force=True", accept: dict | None = None) -> Path:
    """Make `out_dir` ready for a run with `config`, and record `config` there.

    - A new or empty folder: `config` is written to ``bench_config.json``.
    - A folder whose ``bench_config.json`` equals `config`: nothing changes (the run resumes).
    - A folder recorded with another configuration, or holding results but no ``bench_config.json``: raises
      `ConfigMismatchError` naming the differences, unless `force`, which first deletes `outputs` and the record.

    Args:
        out_dir: the output folder (created if needed).
        config: what the results depend on, as JSON values (compared after a JSON round trip).
        outputs: the folder's result files and sub-folders, relative to `out_dir`: what counts as "holding results"
            and what `force` deletes.
        force: start over in this folder.
        force_hint: how the caller's user asks for `force`, for the error message (a CLI passes ``"--force"``).
        accept: `{key: [values]}`: recorded values of a top-level key that mean the same as `config`'s (e.g. a
            fingerprint computed the way older runs recorded it); such a record is rewritten with `config`.

    Returns:
        `out_dir` as a `Path`.
    """
    out_dir = Path(out_dir)
    config = normalize_config(config)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: pass a folder for the bench outputs")
    record = out_dir / CONFIG_FILE
    if force:
        for name in [*outputs, CONFIG_FILE]:
            _remove(out_dir / name)
    elif record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigMismatchError(f"{record} is not readable JSON ({err}); start over with {force_hint} or pass "
                                      "another output folder") from None
        differences = config_differences(recorded, config) if isinstance(recorded, dict) else ["<not an object>"]
        if differences and accept and isinstance(recorded, dict):
            same = {k: config[k] for k, values in accept.items() if k in config and recorded.get(k) in list(values)}
            if same and not config_differences({**recorded, **same}, config):
                write_text_atomic(record, json.dumps(config, indent=2, sort_keys=True) + "\n")
                return out_dir
        if differences:
            raise ConfigMismatchError(
                f"{out_dir} holds results made with another configuration:\n  " + "\n  ".join(differences)
                + f"\nStart over in this folder with {force_hint}, or pass another output folder.")
        return out_dir
    else:
        present = [name for name in outputs if (out_dir / name).exists()]
        if present:
            raise ConfigMismatchError(
                f"{out_dir} holds results ({', '.join(present)}) but no {CONFIG_FILE}, so what made them is unknown. "
                f"Start over in this folder with {force_hint}, or pass another output folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place (a kill leaves the old file or the new)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Model fingerprint
# ---------------------------------------------------------------------------------------------------------------------


def model_fingerprint(path: str | os.PathLike, *, documentation: bool = False) -> str:
    """A cheap fingerprint (sha256 hex) of a model folder, to tell whether two runs used the same model.

    Every file under `path` (hidden files and folders, and documentation: `DOCUMENTATION_SUFFIXES`, e.g. the model
    card, excluded) contributes its relative path and size; files up to 4 MiB (configs, tokenizers, call defaults)
    are hashed whole, larger ones (weights) by three 1 MiB blocks at the start, middle and end. Reading a few MiB per
    weights file, it tells apart a re-trained model with the same architecture (every weight changes), not a change
    confined to bytes it does not read. Editing a model card leaves it unchanged.

    Args:
        documentation (`bool`, defaults to False): hash the documentation too, as runs recorded before it was left
            out did (`open_run(accept=...)` takes such a record for the same model).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model path {root} is not a folder: pass the folder a pipeline was saved to")
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and (documentation or p.suffix.lower() not in DOCUMENTATION_SUFFIXES))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if size <= _WHOLE_FILE_LIMIT:
                digest.update(handle.read())
                continue
            for offset in (0, size // 2 - _SAMPLE_BYTES // 2, size - _SAMPLE_BYTES):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def weights_fingerprint(files) -> str:
    """sha256 of weight files read whole (each one's name and bytes, in the order given; missing files are skipped):
    a fingerprint of adapters, whose cards and reports beside them do not change the images."""
    digest = hashlib.sha256()
    for file in map(Path, files):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Append-only results
# ---------------------------------------------------------------------------------------------------------------------


def read_results(path: str | os.PathLike, *, repair: bool = True) -> list[dict]:
    """Read the records of an append-only results file (one JSON object with a ``session_id`` per line).

    A run killed while writing can leave a last line that is cut short. With `repair`, that line is dropped from the
    file (the session is simply run again); any other unreadable line raises `ResultsFileError` naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, offset = [], 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        is_last = offset + len(raw) == len(data)
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "session_id" not in record:
                raise ValueError("no session_id")
        except ValueError as err:
            if is_last and repair:
                with open(path, "r+b") as handle:
                    handle.truncate(offset)
                break
            raise ResultsFileError(path, number, f"is not a results record ({err})") from None
        if is_last and not raw.endswith(b"\n") and repair:
            with open(path, "ab") as handle:
                handle.write(b"\n")
        records.append(record)
        offset += len(raw)
    return records


def append_result(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one finished session's record as one JSON line, flushed and fsynced before returning."""
    if "session_id" not in record:
        raise ValueError("a results record needs a 'session_id'")
    line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def latest_by_id(records: Sequence[dict]) -> dict[str, dict]:
    """``{session_id: the last record written for it}`` (a session run again appends a newer record)."""
    return {record["session_id"]: record for record in records}

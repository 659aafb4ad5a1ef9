"""Run any editor over generated MICE-Shapes sessions and score it (IF / CC / GA / reward per turn).

    from editr2.bench.shapes.runner import run_bench
    results = run_bench(my_editor, family="cu", num_sessions=100, num_turns=3, seed=0)

`my_editor(images, history, instruction) -> PIL image` (see `editr2.bench.editors`); an editor with a
`bind(session)` method is bound to each session first. The result is the `results.json` structure:
`{"per_turn": [{"turn", "IF", "CC", "GA", "reward"}, ...], "mean": {...}, "config": {...}, "drift": {...}}`, where
"drift" holds the drift measures per turn and the decay summary (`editr2.bench.drift.drift_results`).

With `results_path`, every finished session's scores are appended to that JSON-lines file as it finishes, and the
sessions already there are read back instead of run again: a run killed after k sessions and started again gives the
same result as an uninterrupted one (`editr2 bench shapes` resumes this way; `editr2.bench.resume` has the file format
and the configuration check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..drift import drift_results, session_drift
from ..metrics import METRICS, TurnScore, mean_scores, score_session
from ..resume import append_result, latest_by_id, read_results
from .render import DEFAULT_SIZE
from .sessions import ShapesSession, generate_session


def run_session(editor: Callable, session: ShapesSession) -> tuple[list[Image.Image], list[TurnScore]]:
    """Let `editor` edit one session turn by turn; returns `(images [source, turn 1, ...], scores per turn)`."""
    bound = editor.bind(session) if hasattr(editor, "bind") else editor
    images = [session.source_image()]
    for t in range(session.num_turns):
        out = bound(list(images), list(session.instruction[:t]), session.instruction[t])
        if not isinstance(out, Image.Image):
            raise TypeError(f"The editor returned {type(out).__name__}: return a PIL.Image.Image.")
        images.append(out.convert("RGB"))
    return images, score_session(session, images)


def session_id(family: str, seed: int) -> str:
    """The id of the generated session `family` / `seed` in a results file (``cm_1005``)."""
    return f"{family}_{seed}"


def session_record(sid: str, session: ShapesSession, scores: Sequence[TurnScore], editor: Callable,
                   drift: Sequence | None = None) -> dict:
    """One finished session for the results file: its id, family, seed and per-turn scores; with an editor that keeps
    per-session `records` (e.g. `diffusers_editr2.bench.PipelineEditor`: intents and fallbacks), the last of them."""
    record = {"session_id": sid, "family": session.family, "seed": session.seed,
              "turns": [score.to_dict() for score in scores]}
    if drift is not None:
        record["drift"] = [row.to_dict() for row in drift]
    records = getattr(editor, "records", None)
    if isinstance(records, list) and records:
        record["editor_record"] = records[-1]
    return record


def run_bench(editor: Callable, family: str = "cm", num_sessions: int = 100, num_turns: int = 3, seed: int = 0,
              size: int = DEFAULT_SIZE, progress: bool = True, sessions: Sequence[ShapesSession] | None = None,
              editor_name: str | None = None, results_path: str | Path | None = None) -> dict:
    """Score `editor` on `num_sessions` generated sessions (seeds `seed, seed + 1, ...`).

    Args:
        editor: the editor callable (see the module docstring).
        family (`str`): "cm" or "cu".
        num_sessions, num_turns, seed, size: what to generate.
        progress (`bool`): show a tqdm progress bar.
        sessions: pre-generated sessions to use instead (then family/num_sessions/num_turns/seed are only recorded).
        editor_name (`str`, *optional*): recorded in the config (defaults to the editor's `name` attribute).
        results_path (`str` or `Path`, *optional*): a JSON-lines file of per-session results (`session_record`):
            sessions recorded there are read back, the others run and appended as they finish. Only the sessions
            asked for are reported. The caller makes sure the file was written with the same editor and settings
            (`editr2.bench.resume.open_run`).

    Returns:
        `{"per_turn": [...], "mean": {...}, "config": {...}, "drift": {...}}` ("drift":
        `editr2.bench.drift.drift_results`).
    """
    if sessions is None and num_sessions < 1:
        raise ValueError(f"num_sessions={num_sessions}: pass at least 1.")
    count = num_sessions if sessions is None else len(sessions)
    done = latest_by_id(read_results(results_path)) if results_path is not None else {}
    iterator = range(count)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"shapes {family} {editor_name or getattr(editor, 'name', 'editor')}",
                        unit="session")
    per_turn: dict[int, list[TurnScore]] = {}
    session_scores, session_drifts = [], []  # per session, for the drift measures and the decay summary
    for i in iterator:
        given = sessions[i] if sessions is not None else None
        sid = session_id(given.family, given.seed) if given is not None else session_id(family, seed + i)
        if sid in done and len(done[sid]["turns"]) == (given.num_turns if given is not None else num_turns):
            scores = [TurnScore(**turn) for turn in done[sid]["turns"]]
            drift = done[sid].get("drift")  # absent in files written before the drift measures
        else:
            session = given if given is not None else generate_session(family, num_turns, seed + i, size)
            images, scores = run_session(editor, session)
            drift = session_drift(session, images)
            if results_path is not None:
                append_result(results_path, session_record(sid, session, scores, editor, drift))
        session_scores.append(scores)
        if drift is not None:
            session_drifts.append(drift)
        for row in scores:
            per_turn.setdefault(row.turn, []).append(row)
    rows = [{"turn": t, **mean_scores(per_turn[t])} for t in sorted(per_turn)]
    everything = [r for t in sorted(per_turn) for r in per_turn[t]]
    config = {"editor": editor_name or getattr(editor, "name", type(editor).__name__), "family": family,
              "sessions": count, "turns": num_turns, "seed": seed, "size": size}
    return {"per_turn": [{k: r[k] for k in ("turn",) + METRICS} for r in rows], "mean": mean_scores(everything),
            "config": config, "drift": drift_results(session_scores, session_drifts, max(per_turn, default=0))}

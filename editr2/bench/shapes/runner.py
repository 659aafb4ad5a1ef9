"""Run any editor over generated MICE-Shapes sessions and score it (IF / CC / GA / reward per turn).

    from editr2.bench.shapes.runner import run_bench
    results = run_bench(my_editor, family="cu", num_sessions=100, num_turns=3, seed=0)

`my_editor` is an `editr2.bench.editors.Editor` (`edit_session(source, instructions, session)`). The result is the
`results.json` structure: `{"per_turn": [{"turn", "IF", "CC", "GA", "reward", "IF_ci", ...}, ...], "mean": {...},
"restores": {...}, "config": {...}, "drift": {...}}`, where each score has its 95% percentile bootstrap interval over
sessions next to it (`"IF_ci": [low, high]`, `add_intervals`: whole sessions resampled, fixed seed), `"restores"` is
`{"turns", "CC"}`: how many undo turns there were and their mean CC against the state each restores
(`editr2.bench.metrics.restore_cc`; 1.0 for an editor that restores exactly), and "drift" holds the drift measures
per turn and the decay summary (`editr2.bench.drift.drift_results`).

`PROMPT_SOURCES` names what an editor may be prompted with each turn: the session's instruction, or its gold intent
(`editr2 bench shapes --prompts gold`: `diffusers_editr2.bench.PipelineEditor` reads `session.gold_intent` from the
session `run_session` passes it, so the runner itself is the same for both).

With `results_path`, every finished session's scores are appended to that JSON-lines file as it finishes, and the
sessions already there are read back instead of run again: a run killed after k sessions and started again gives the
same result as an uninterrupted one (`editr2 bench shapes` resumes this way; `editr2.bench.resume` has the file format
and the configuration check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..drift import drift_results, session_drift
from ..editors import Editor
from ..metrics import METRICS, TurnScore, mean_scores, restore_summary, score_session
from ..runner import edit_images, run_sessions
from ..stats import bootstrap_ci
from .render import DEFAULT_SIZE
from .sessions import ShapesSession, generate_session


def run_session(editor: Editor, session: ShapesSession) -> tuple[list[Image.Image], list[TurnScore]]:
    """Let `editor` edit one session; returns `(images [source, turn 1, ...], scores per turn)`."""
    images = edit_images(editor, session.source_image(), session.instruction, session)
    return images, score_session(session, images)


def session_id(family: str, seed: int) -> str:
    """The id of the generated session `family` / `seed` in a results file (``cm_1005``)."""
    return f"{family}_{seed}"


def session_record(sid: str, session: ShapesSession, scores: Sequence[TurnScore], editor: Editor,
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


# The prompt an editor gets each turn: the session's instruction, or its gold intent (the self-contained operative
# instruction: the editor alone, on its own carried state; `diffusers_editr2.bench.PipelineEditor(prompts=...)` reads
# it from the session `run_session` passes).
PROMPT_SOURCES = ("instruction", "gold")

CI_LEVEL = 0.95  # the intervals of every bench shapes result: 95% percentile bootstrap over sessions
CI_RESAMPLES = 1000
CI_SEED = 0  # fixed: a resumed run's intervals equal an uninterrupted run's


def score_matrix(session_scores: Sequence[Sequence[TurnScore]], metric: str,
                 num_turns: int | None = None) -> np.ndarray:
    """`(sessions, turns)` array of `metric` (one of `METRICS`), row i holding session i's turns 1..T in order; NaN
    where a session has fewer turns than the longest (or than `num_turns`)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: pass one of {', '.join(METRICS)}.")
    width = max([num_turns or 0] + [score.turn for scores in session_scores for score in scores])
    matrix = np.full((len(session_scores), width), np.nan)
    for i, scores in enumerate(session_scores):
        for score in scores:
            matrix[i, score.turn - 1] = getattr(score, metric)
    return matrix


def add_intervals(per_turn: list[dict], mean: dict, session_scores: Sequence[Sequence[TurnScore]], *,
                  num_resamples: int = CI_RESAMPLES, seed: int = CI_SEED) -> None:
    """Add `"<metric>_ci": [low, high]` (95% percentile bootstrap over sessions, `editr2.bench.stats.bootstrap_ci`)
    to every row of `per_turn` (that turn's mean over the sessions having it) and to `mean` (the mean over every turn
    of the resampled sessions, as `mean` itself is over every turn of every session). Whole sessions are resampled,
    in the order given, with `seed`: the same sessions give the same intervals however the run was split."""
    if not session_scores:
        return
    for metric in METRICS:
        matrix = score_matrix(session_scores, metric)
        for row in per_turn:
            column = matrix[:, row["turn"] - 1]
            interval = bootstrap_ci(column[~np.isnan(column)], np.mean, num_resamples, CI_LEVEL, seed)
            row[f"{metric}_ci"] = list(interval)
        mean[f"{metric}_ci"] = list(bootstrap_ci(matrix, np.nanmean, num_resamples, CI_LEVEL, seed))


def run_bench(editor: Editor, family: str = "cm", num_sessions: int = 100, num_turns: int = 3, seed: int = 0,
              size: int = DEFAULT_SIZE, progress: bool = True, sessions: Sequence[ShapesSession] | None = None,
              editor_name: str | None = None, results_path: str | Path | None = None,
              phrasing: str = "grammar") -> dict:
    """Score `editor` on `num_sessions` generated sessions (seeds `seed, seed + 1, ...`).

    Args:
        editor: the `Editor` (see the module docstring).
        family (`str`): "cm" or "cu".
        num_sessions, num_turns, seed, size: what to generate.
        progress (`bool`): show a tqdm progress bar.
        sessions: pre-generated sessions to use instead (then family/num_sessions/num_turns/seed are only recorded).
        editor_name (`str`, *optional*): recorded in the config (defaults to the editor's `name` attribute).
        results_path (`str` or `Path`, *optional*): a JSON-lines file of per-session results (`session_record`):
            sessions recorded there are read back, the others run and appended as they finish. Only the sessions
            asked for are reported. The caller makes sure the file was written with the same editor and settings
            (`editr2.bench.resume.open_run`).
        phrasing (`str`, defaults to `"grammar"`): how the generated sessions are worded: "grammar", or everyday
            phrasing "seen" / "unseen" / "all" (`generate_session`); recorded in the config as "phrasing" (left out
            for "grammar", so the configs recorded before it existed still compare equal).

    Returns:
        `{"per_turn": [...], "mean": {...}, "restores": {"turns", "CC"}, "config": {...}, "drift": {...}}` ("drift":
        `editr2.bench.drift.drift_results`); the rows of "per_turn" and "mean" hold each metric and its interval
        `"<metric>_ci"` (`add_intervals`).
    """
    if sessions is None and num_sessions < 1:
        raise ValueError(f"num_sessions={num_sessions}: pass at least 1.")
    if phrasing not in ("grammar", "seen", "unseen", "all"):
        raise ValueError(f"phrasing={phrasing!r}: pass 'grammar', 'seen', 'unseen' or 'all'.")
    count = num_sessions if sessions is None else len(sessions)
    # (id, the session, or the seed of the one to generate when it has to be run)
    items = [(session_id(s.family, s.seed), s) for s in sessions] if sessions is not None else \
        [(session_id(family, seed + i), seed + i) for i in range(count)]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=count, desc=f"shapes {family} {editor_name or getattr(editor, 'name', 'editor')}",
                     unit="session")
    per_turn: dict[int, list[TurnScore]] = {}
    session_scores, session_drifts = [], []  # per session, for the drift measures and the decay summary

    def step(sid: str, given: ShapesSession | int, earlier: dict | None) -> tuple[dict | None, str]:
        generated = isinstance(given, int)
        record = None
        if earlier is not None and len(earlier["turns"]) == (num_turns if generated else given.num_turns):
            scores = [TurnScore(**turn) for turn in earlier["turns"]]
            drift = earlier.get("drift")  # absent in files written before the drift measures
        else:
            session = generate_session(family, num_turns, given, size, phrasing) if generated else given
            images, scores = run_session(editor, session)
            drift = session_drift(session, images)
            record = session_record(sid, session, scores, editor, drift)
        session_scores.append(scores)
        if drift is not None:
            session_drifts.append(drift)
        for row in scores:
            per_turn.setdefault(row.turn, []).append(row)
        return record, "run" if record is not None else "reused"

    run_sessions(items, step, results_path)
    rows = [{"turn": t, **mean_scores(per_turn[t])} for t in sorted(per_turn)]
    everything = [r for t in sorted(per_turn) for r in per_turn[t]]
    config = {"editor": editor_name or getattr(editor, "name", type(editor).__name__), "family": family,
              "sessions": count, "turns": num_turns, "seed": seed, "size": size}
    worded = sessions[0].phrasing if sessions else phrasing
    if worded != "grammar":  # everyday phrasing is named; the fixed grammar's configs stay as they were recorded
        config["phrasing"] = worded
    per_turn_rows = [{k: r[k] for k in ("turn",) + METRICS} for r in rows]
    mean = mean_scores(everything)
    add_intervals(per_turn_rows, mean, session_scores)
    return {"per_turn": per_turn_rows, "mean": mean,
            "restores": restore_summary(everything), "config": config,
            "drift": drift_results(session_scores, session_drifts, max(per_turn, default=0))}

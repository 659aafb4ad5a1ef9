"""Run an editor over real MICE-format sessions and score every turn with the judges (IF, CC, GA).

    editr2 bench mice --sessions cm_test.jsonl --images DIR --editor identity --judge judge.yaml --out runs/mice

Each finished session is appended to ``OUT/results.jsonl`` at once (its turn images go to
``OUT/turns/<session_id>/turn_<k>.png``), so an interrupted run started again with the same ``--out`` skips the
sessions already there. ``OUT/bench_config.json`` records what the results were made with (editor, model fingerprint,
call settings, judges, metrics); a rerun with another configuration stops with the differences named, unless
``--force`` (start over) or another ``--out``. A bad session (missing or unreadable image, a malformed line, an editor
that fails) is recorded with its error and the run goes on; a judgement that fails is recorded as missing, never as a
made-up score, and ``--rejudge-missing`` judges those again from the saved turn images, without editing. At the end
(and from the results file alone) ``report.md``, ``per_turn.png`` and one side-by-side filmstrip per session
(``filmstrips/<session_id>.png``) are written.

The run ends with one line: sessions run now, already done, re-judged, then over the whole results file the sessions
done, errored and the missing judgements. Exit status: 0 when no session is recorded with an error (judgements may
still be missing: the line counts them), 1 when any is; bad arguments and a configuration mismatch stop before any work
with a one-line message (also non-zero).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from .editors import Editor, IdentityEditor
from .mice import MiceFormatError, MiceSession, iter_session_lines, read_results
from .report import write_report
from .resume import ConfigMismatchError, model_fingerprint, open_run
from .runner import EditorOutputError, edit_images, model_call_kwargs, run_sessions

TURNS_DIR = "turns"
# What a run writes into --out (what `--force` deletes).
OUTPUTS = ("results.jsonl", "report.md", "summary.json", "per_turn.png", "filmstrips", TURNS_DIR)

EDITORS: dict[str, Callable[[], Editor]] = {"identity": IdentityEditor}  # the symbolic editor for real images


# ---------------------------------------------------------------------------------------------------------------------
# One session
# ---------------------------------------------------------------------------------------------------------------------


class SessionError(Exception):
    """A session that cannot be run; its message goes into the report."""


def resolve_image(images_dir: Path, relative: str) -> Path:
    """``images_dir / relative``, else ``images_dir / basename``; `SessionError` naming both when neither exists."""
    candidates = [images_dir / relative, images_dir / Path(relative).name]
    for path in candidates:
        if path.is_file():
            return path
    raise SessionError(f"image file not found: {relative!r} (looked for {', '.join(str(p) for p in candidates)})")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
        raise SessionError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


def _turn_reward(scores: dict[str, float | None], weights: dict[str, float]) -> float | None:
    from ..rewards import combine

    return combine({name: [scores[name]] for name in weights}, weights)[0]


def evaluate_session(session: MiceSession, images_dir: Path, editor: Editor, judges, weights: dict[str, float],
                     filmstrip_dir: Path | None = None, turns_dir: Path | None = None) -> dict:
    """Edit one session and judge every turn. Never raises for a bad session: the error goes into the record.

    With `turns_dir`, the edited images are saved as ``turns_dir/<session_id>/turn_<k>.png`` (lossless) before they
    are judged, so `rejudge_missing` can judge them again later without editing.
    """
    record: dict = {"session_id": session.session_id, "line": session.line, "image": session.image,
                    "num_turns": session.num_turns, "status": "ok", "error": None, "turns": [], "seconds": {}}
    try:
        source = load_image(resolve_image(images_dir, session.image))
        start = time.perf_counter()
        try:
            images = edit_images(editor, source, session.instruction, session)
        except EditorOutputError as err:
            raise SessionError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - an editor failure ends this session only
            raise SessionError(f"editor {editor.name} failed: {type(err).__name__}: {err}") from None
        record["seconds"]["edit"] = round(time.perf_counter() - start, 3)
        if turns_dir is not None:
            save_turn_images(images[1:], turns_dir / session.session_id)
        start = time.perf_counter()
        results = judges.judge_session(session, images)
        record["seconds"]["judge"] = round(time.perf_counter() - start, 3)
    except SessionError as err:
        record.update(status="error", error=str(err))
        return record
    except Exception as err:  # noqa: BLE001 - whatever happens, the run goes on
        record.update(status="error", error=f"unexpected {type(err).__name__}: {err}")
        return record

    for t in range(session.num_turns):
        turn = {"turn": t + 1, "task_type": session.task_type[t], "instruction": session.instruction[t],
                "judgements": {}}
        for metric, judgements in results.items():
            turn[metric] = judgements[t].score
            turn["judgements"][metric] = judgements[t].to_dict()
        turn["reward"] = _turn_reward({m: turn.get(m) for m in weights}, weights)
        record["turns"].append(turn)
    _draw_filmstrip(images, session, record, filmstrip_dir)
    return record


def _draw_filmstrip(images, session: MiceSession, record: dict, filmstrip_dir: Path | None) -> None:
    if filmstrip_dir is None:
        return
    try:
        save_filmstrip(images, session, record, filmstrip_dir / f"{session.session_id}.png")
        record.pop("filmstrip_error", None)
    except Exception as err:  # noqa: BLE001 - a drawing problem must not lose the scores
        record["filmstrip_error"] = f"{type(err).__name__}: {err}"


def save_turn_images(images: Sequence[Image.Image], folder: Path) -> None:
    """``folder/turn_<k>.png`` for k = 1..T (PNG: what is judged again is exactly what was judged)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images, start=1):
        image.save(folder / f"turn_{k}.png")


def load_turn_images(folder: Path, num_turns: int) -> list[Image.Image]:
    """The images `save_turn_images` wrote; `SessionError` naming the first one that is absent or unreadable."""
    paths = [folder / f"turn_{k}.png" for k in range(1, num_turns + 1)]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise SessionError(f"no saved turn image {absent[0]} (sessions run before turn images were saved cannot be "
                           "judged again: run them again with --rerun-errors after --force, or in a new --out)")
    return [load_image(path) for path in paths]


def missing_metrics(record: dict) -> list[str]:
    """The metrics with at least one missing judgement in an ``ok`` record (in IF, CC, GA order)."""
    found = {metric for turn in record.get("turns", []) for metric, judgement in turn.get("judgements", {}).items()
             if judgement.get("status") == "missing"}
    return [m for m in ("IF", "CC", "GA") if m in found]


def rejudge_missing(record: dict, session: MiceSession, images_dir: Path, turns_dir: Path, judges,
                    weights: dict[str, float], filmstrip_dir: Path | None = None) -> dict:
    """Judge again the missing judgements of a finished session, from its saved turn images (no editing).

    IF and CC judge again only the turns whose judgement is missing; GA judges the whole sequence at once, so a
    session with a missing GA judgement gets all its GA judgements anew (GA is cumulative: its turns go together).
    Judgements that have a score are kept. Returns the new record (the rewards recomputed);
    raises `SessionError` when the source or a saved turn image cannot be read.
    """
    from .judges.protocol import TurnRequest

    metrics = [m for m in missing_metrics(record) if m in judges.metrics]
    source = load_image(resolve_image(images_dir, session.image))
    images = [source] + load_turn_images(turns_dir / session.session_id, session.num_turns)
    new = json.loads(json.dumps(record))
    turns = new["turns"]
    start = time.perf_counter()
    for metric in metrics:
        if metric == "GA":
            fresh = dict(enumerate(judges.ga_judge.judge_session(images, list(session.instruction))))
        else:
            judge = judges.if_judge if metric == "IF" else judges.cc_judge
            wanted = [t for t, turn in enumerate(turns)
                      if turn["judgements"].get(metric, {}).get("status") == "missing"]
            requests = [TurnRequest.from_session(session, images, t) for t in wanted]
            fresh = dict(zip(wanted, judge.judge_many(requests)))
        for t, judgement in fresh.items():
            turns[t][metric] = judgement.score
            turns[t]["judgements"][metric] = judgement.to_dict()
    for turn in turns:
        turn["reward"] = _turn_reward({m: turn.get(m) for m in weights}, weights)
    new["seconds"] = {**new.get("seconds", {}), "rejudge": round(time.perf_counter() - start, 3)}
    _draw_filmstrip(images, session, new, filmstrip_dir)
    return new


def error_record(line: int, error: MiceFormatError) -> dict:
    return {"session_id": f"{line:05d}_invalid", "line": line, "image": None, "num_turns": 0, "status": "error",
            "error": str(error), "turns": [], "seconds": {}}


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchSummary:
    results_path: Path
    report_path: Path
    finished: int  # sessions run in this call
    skipped: int  # sessions already in results.jsonl
    errors: int  # sessions recorded with an error (whole results file)
    done: int = 0  # sessions recorded as edited and judged (whole results file)
    missing: int = 0  # missing judgements in those sessions
    rejudged: int = 0  # sessions judged again in this call (`rejudge_missing`)
    pending: int = 0  # sessions of the file not run yet (left for a normal run by `rejudge_missing`)

    def line(self) -> str:
        """The one-line account a run ends with."""
        text = (f"{self.finished} session(s) run, {self.skipped} already done"
                + (f", {self.rejudged} re-judged" if self.rejudged else "")
                + (f", {self.pending} not run yet" if self.pending else "")
                + f"; results: {self.done} done, {self.errors} errored, {self.missing} missing judgement(s)")
        hints = (["--rerun-errors runs the errored sessions again"] if self.errors else []) + \
            (["--rejudge-missing judges the missing ones again"] if self.missing else [])
        return text + (f" ({'; '.join(hints)})" if hints else "") + f"; report: {self.report_path}"


def bench_config(editor: Editor | None, judges) -> dict:
    """The configuration `run_bench` records when none is given: the editor's name and the metrics."""
    if editor is None:
        raise ValueError("pass `config` (what the results in out_dir were made with) when `editor` is None")
    return {"bench": "mice", "editor": editor.name, "metrics": list(judges.metrics)}


def run_mice_bench(sessions_path: str | Path, images_dir: str | Path, editor: Editor | None, judges,
                   out_dir: str | Path, *, limit: int | None = None, filmstrips: bool = True,
                   rerun_errors: bool = False, rejudge: bool = False, config: dict | None = None, force: bool = False,
                   log: Callable[[str], None] | None = None) -> BenchSummary:
    """Run `editor` over the sessions of `sessions_path`, judge them, append results, then write the report.

    Args:
        sessions_path: MICE-format JSONL.
        images_dir: folder the sessions' ``image`` paths are relative to.
        editor: an `Editor`; None only with `rejudge` (nothing is edited then).
        judges: a `JudgeSet` (from `editr2.bench.judges.build_judges`).
        out_dir: output folder; ``results.jsonl`` there is resumed.
        limit: only the first `limit` lines with sessions.
        filmstrips: draw ``filmstrips/<session_id>.png``.
        rerun_errors: run sessions whose earlier record is an error again.
        rejudge: only judge again the missing judgements of finished sessions, from their saved turn images; sessions
            not run yet are left for a normal run (counted as pending).
        config: what the results depend on, recorded in ``out_dir/bench_config.json``; a folder recorded with another
            configuration raises `editr2.bench.resume.ConfigMismatchError` (defaults to `bench_config`).
        force: delete the folder's earlier results and start over.
        log: progress sink (default: stderr).
    """
    from .judges.rewards import REWARD_WEIGHTS

    if editor is None and not rejudge:
        raise ValueError("editor is None: pass an Editor (None is only allowed with rejudge=True)")
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out_dir, images_dir = Path(out_dir), Path(images_dir)
    open_run(out_dir, config if config is not None else bench_config(editor, judges), outputs=OUTPUTS, force=force)
    results_path = out_dir / "results.jsonl"
    turns_dir = out_dir / TURNS_DIR
    filmstrip_dir = out_dir / "filmstrips" if filmstrips else None
    if filmstrip_dir is not None:
        filmstrip_dir.mkdir(exist_ok=True)
    weights = {metric: REWARD_WEIGHTS[metric] for metric in judges.metrics}

    done = {r["session_id"]: r for r in read_results(results_path)}
    if rerun_errors:
        done = {sid: r for sid, r in done.items() if r.get("status") != "error"}
    lines = list(iter_session_lines(sessions_path))[:limit] if limit else list(iter_session_lines(sessions_path))
    items = [(item.session_id if isinstance(item, MiceSession) else error_record(line, item)["session_id"],
              (position, line, item)) for position, (line, item) in enumerate(lines, start=1)]

    def step(session_id: str, numbered, earlier: dict | None) -> tuple[dict | None, str]:
        position, line, item = numbered
        where = f"[{position}/{len(items)}] {session_id}"
        if earlier is not None:
            if rejudge and isinstance(item, MiceSession) and earlier.get("status") == "ok" and missing_metrics(earlier):
                try:
                    record = rejudge_missing(earlier, item, images_dir, turns_dir, judges, weights, filmstrip_dir)
                except SessionError as err:
                    log(f"{where}: not judged again: {err}")
                    return None, "skipped"
                log(f"{where}: re-judged {_one_line(record)}")
                return record, "rejudged"
            return None, "skipped"
        if rejudge:
            return None, "pending"
        if isinstance(item, MiceFormatError):
            record = error_record(line, item)
        else:
            record = evaluate_session(item, images_dir, editor, judges, weights, filmstrip_dir, turns_dir)
        log(f"{where}: {_one_line(record)}")
        return record, "finished"

    counts = run_sessions(items, step, results_path, done)
    records = latest_records(read_results(results_path))
    recorded = json.loads((out_dir / "bench_config.json").read_text(encoding="utf-8"))
    report_path = write_mice_report(out_dir, records, {"sessions": str(sessions_path), "images": str(images_dir),
                                                       **recorded, "metrics": judges.metrics})
    errors = sum(r.get("status") == "error" for r in records)
    ok = [r for r in records if r.get("status") == "ok"]
    missing = sum(judgement.get("status") == "missing" for r in ok for turn in r["turns"]
                  for judgement in turn.get("judgements", {}).values())
    return BenchSummary(results_path, report_path, counts["finished"], counts["skipped"], errors, done=len(ok),
                        missing=missing, rejudged=counts["rejudged"], pending=counts["pending"])


def _one_line(record: dict) -> str:
    if record["status"] == "error":
        return f"ERROR {record['error']}"
    parts = []
    for turn in record["turns"]:
        scores = " ".join(f"{m}={_fmt(turn.get(m))}" for m in ("IF", "CC", "GA") if m in turn)
        parts.append(f"t{turn['turn']}[{scores}]")
    return " ".join(parts)


def latest_records(records: list[dict]) -> list[dict]:
    """One record per session (the last one written), in file-line order."""
    latest = {r["session_id"]: r for r in records}
    return sorted(latest.values(), key=lambda r: (r.get("line") or 0, r["session_id"]))


# ---------------------------------------------------------------------------------------------------------------------
# Report, plot, filmstrips
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def per_turn_table(records: list[dict], metrics: Sequence[str]) -> list[dict]:
    """Per turn: mean of each metric over the judgements that have a score, with counts of missing / skipped."""
    rows: dict[int, dict] = {}
    for record in records:
        for turn in record.get("turns", []):
            row = rows.setdefault(turn["turn"], {"turn": turn["turn"], "n": 0})
            row["n"] += 1
            for metric in list(metrics) + ["reward"]:
                value = turn.get(metric)
                row.setdefault(metric, [])
                if value is not None:
                    row[metric].append(value)
            for metric in metrics:
                status = turn.get("judgements", {}).get(metric, {}).get("status")
                if status in ("missing", "skipped"):
                    row[f"{metric}_{status}"] = row.get(f"{metric}_{status}", 0) + 1
    table = []
    for number in sorted(rows):
        row = rows[number]
        out = {"turn": number, "n": row["n"]}
        for metric in list(metrics) + ["reward"]:
            values = row.get(metric, [])
            out[metric] = sum(values) / len(values) if values else None
            out[f"{metric}_count"] = len(values)
        for metric in metrics:
            out[f"{metric}_missing"] = row.get(f"{metric}_missing", 0)
            out[f"{metric}_skipped"] = row.get(f"{metric}_skipped", 0)
        table.append(out)
    return table


def reward_label(metrics: Sequence[str]) -> str:
    """What the reward column is, for the metrics computed: their paper weights, not renormalised.

    With all three metrics: ``Reward = 0.3 IF + 0.3 CC + 0.4 GA``. With a subset the weights stay the paper's (as in
    `editr2.rewards.combine`), so the reward is on another scale, and the label says so: with IF and GA only it is
    ``0.3 IF + 0.4 GA``, at most 0.7.
    """
    from .judges.rewards import REWARD_WEIGHTS

    present = [m for m in ("IF", "CC", "GA") if m in metrics]
    if not present:
        return "No reward: no metric was computed."
    formula = " + ".join(f"{REWARD_WEIGHTS[m]:g} {m}" for m in present)
    text = f"Reward = {formula}, only where all parts have a score."
    absent = [m for m in ("IF", "CC", "GA") if m not in present]
    if absent:
        top = sum(REWARD_WEIGHTS[m] for m in present)
        text += (f" {', '.join(absent)} not computed: the weights are the paper's, not renormalised, so this reward "
                 f"lies in [0, {top:g}] and is not comparable with the full 0.3 IF + 0.3 CC + 0.4 GA.")
    return text


def write_mice_report(out_dir: Path, records: list[dict], config: dict) -> Path:
    """``report.md`` (per-turn table, missing judgements, per-session errors, session list), ``summary.json`` and
    ``per_turn.png`` (`editr2.bench.report.write_report`)."""
    metrics = [m for m in ("IF", "CC", "GA") if m in config.get("metrics", ("IF", "CC", "GA"))]
    ok = [r for r in records if r.get("status") == "ok"]
    errors = [r for r in records if r.get("status") != "ok"]
    table = per_turn_table(ok, metrics)
    lines = [
        "# MICE-Bench report",
        "",
        f"- sessions file: `{config.get('sessions')}`; images: `{config.get('images')}`",
        f"- editor: `{config.get('editor')}`; metrics: {', '.join(metrics)}",
        f"- sessions: {len(records)} recorded, {len(ok)} scored, {len(errors)} with errors",
        "",
        "## Per turn",
        "",
        "Means over the judgements that have a score; missing (judge failed after retries) and skipped (not "
        f"applicable) judgements are excluded and counted. {reward_label(metrics)}",
        "",
        "| turn | sessions | " + " | ".join(metrics) + " | reward | " + " | ".join(f"{m} missing" for m in metrics)
        + " | " + " | ".join(f"{m} skipped" for m in metrics) + " |",
        "|" + "---|" * (3 + 3 * len(metrics)),
    ]
    for row in table:
        lines.append(
            f"| {row['turn']} | {row['n']} | " + " | ".join(_fmt(row[m]) for m in metrics) + f" | {_fmt(row['reward'])}"
            + " | " + " | ".join(str(row[f"{m}_missing"]) for m in metrics)
            + " | " + " | ".join(str(row[f"{m}_skipped"]) for m in metrics) + " |"
        )
    lines += ["", "## Missing judgements", ""]
    reasons: dict[str, int] = {}
    for record in ok:
        for turn in record["turns"]:
            for metric, judgement in turn.get("judgements", {}).items():
                if judgement.get("status") == "missing":
                    key = f"{metric}: {judgement.get('reason', '')[:160]}"
                    reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines += [f"- {count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:20]]
    else:
        lines.append("None.")
    lines += ["", "## Sessions with errors", ""]
    if errors:
        lines += ["| session | line | error |", "|---|---|---|"]
        lines += [f"| {r['session_id']} | {r.get('line')} | {str(r.get('error')).replace('|', '/')} |" for r in errors]
    else:
        lines.append("None.")
    lines += ["", "## Sessions", "", "| session | " + " | ".join(f"{m} per turn" for m in metrics) + " | filmstrip |",
              "|" + "---|" * (2 + len(metrics))]
    for record in ok:
        cells = [" ".join(_fmt(t.get(m)) for t in record["turns"]) for m in metrics]
        strip = f"[png](filmstrips/{record['session_id']}.png)" if (out_dir / "filmstrips" /
                                                                     f"{record['session_id']}.png").exists() else "-"
        lines.append(f"| {record['session_id']} | " + " | ".join(cells) + f" | {strip} |")
    present = [m for m in ("IF", "CC", "GA") if m in metrics]
    reward = "reward" if len(present) == 3 else f"reward ({' + '.join(present)} only)"
    plot = {"title": "MICE-Bench per turn", "keys": list(metrics) + ["reward"], "ylabel": "mean score",
            "labels": {"reward": reward}}
    summary = {"per_turn": table, "config": config, "reward": reward_label(metrics), "errors": len(errors),
               "scored": len(ok)}
    paths = write_report(summary, out_dir, markdown="\n".join(lines) + "\n", json_name="summary.json", plot=plot,
                         plot_section=True)
    return paths["report"]


def save_filmstrip(images: Sequence[Image.Image], session: MiceSession, record: dict, path: Path,
                   tile: int = 192) -> Path:
    """Source and every turn's output side by side, captioned with the task, the scores and the instruction."""
    from ..filmstrip import Frame, filmstrip

    frames = [Frame(images[0], "Source", Path(session.image).name)]
    for index, turn in enumerate(record["turns"], start=1):
        scores = "  ".join(f"{m} {_fmt(turn.get(m))}" for m in ("IF", "CC", "GA") if m in turn)
        frames.append(Frame(images[index], f"Turn {index}: {session.task_type[index - 1]}",
                            session.instruction[index - 1], scores))
    path.parent.mkdir(parents=True, exist_ok=True)
    filmstrip(frames, tile=tile, max_lines=5, font_size=11).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", required=True, help="MICE-format JSONL (e.g. the release's test_metadata.jsonl)")
    parser.add_argument("--images", required=True, help="folder the sessions' `image` paths are relative to")
    editor = parser.add_mutually_exclusive_group(required=True)
    editor.add_argument("--editor", choices=sorted(EDITORS), help="a built-in symbolic editor")
    editor.add_argument("--model", help="folder of an EditR2Pipeline (diffusers_editr2) to edit with")
    parser.add_argument("--judge", required=True, help="judge config YAML (see docs/mice_bench.md)")
    parser.add_argument("--out", required=True,
                        help="output folder (resumed when it holds results of the same configuration)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N sessions")
    parser.add_argument("--device", default="cpu", help="device for --model (cpu, cuda, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --model")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per turn for --model")
    parser.add_argument("--pipeline-kwargs", default=None, metavar="JSON",
                        help='extra EditR2Pipeline arguments for every turn, e.g. \'{"negative_prompt": " "}\'')
    parser.add_argument("--no-filmstrips", action="store_true", help="do not draw per-session filmstrips")
    parser.add_argument("--rerun-errors", action="store_true", help="run sessions recorded with an error again")
    parser.add_argument("--rejudge-missing", action="store_true",
                        help="judge again the missing judgements (e.g. after a judge outage) of the finished "
                             "sessions, from their saved turn images OUT/turns/: nothing is edited (--model is not "
                             "loaded) and sessions not run yet are left for a normal run")
    parser.add_argument("--force", action="store_true",
                        help="start over: delete the results in --out (needed when --out holds results made with "
                             "another editor, model, call settings or judges)")


def judge_settings(config) -> dict:
    """What in a `JudgeConfig` decides the scores, for ``bench_config.json``.

    Kept: the metrics, the VLM's model (server model name, or local folder with its `model_fingerprint`), dtype and
    answer length, the detector and feature models (folder, fingerprint, dtype, thresholds) and the IF / CC / GA
    settings. Left out, because they change how fast or how patiently the judges work, not what they answer: server
    URL and key variables, timeouts, concurrency, retries, devices, CC's batch size.
    """
    import dataclasses

    def model(section, drop: Sequence[str]) -> dict | None:
        if section is None:
            return None
        values = {k: v for k, v in dataclasses.asdict(section).items() if k not in drop}
        path = values.get("path")
        if path and Path(path).is_dir():
            values["fingerprint"] = model_fingerprint(path)
        return values

    transport = ("base_url", "base_url_env", "api_key_env", "timeout_s", "max_attempts", "backoff_s",
                 "max_backoff_s", "max_concurrency", "device")
    vlm = model(config.vlm, transport)
    if vlm is not None:
        vlm["backend"] = "openai" if "path" not in vlm else "transformers"
    cc = {k: v for k, v in dataclasses.asdict(config.cc).items() if k != "batch_pairs"}
    return {"metrics": list(config.metrics), "vlm": vlm, "detector": model(config.detector, ("device",)),
            "features": model(config.features, ("device",)), "if": dataclasses.asdict(config.if_judge), "cc": cc,
            "ga": dataclasses.asdict(config.ga)}


def run_config(args: argparse.Namespace, judge_config, call_kwargs: dict) -> dict:
    """``bench_config.json`` of a command line: editor, model fingerprint and call settings, judges, metrics.

    The model folder is fingerprinted (`editr2.bench.resume.model_fingerprint`: its files' names, sizes and sampled
    bytes, the folder's call defaults included), not loaded. ``--device`` is not part of it: a run may resume on
    another device.
    """
    config = {"bench": "mice", "metrics": list(judge_config.metrics), "judges": judge_settings(judge_config)}
    if args.editor:
        return {**config, "editor": args.editor}
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model}: no such folder; pass a folder saved with "
                         "EditR2Pipeline.save_pretrained")
    return {**config, "editor": f"EditR2Pipeline({args.model})", "model_fingerprint": model_fingerprint(args.model),
            "reasoning": call_kwargs.get("reasoning", "intent"), "seed": args.seed, "call_kwargs": call_kwargs}


def run(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; prints the summary line and returns the exit status (1: any session
    recorded with an error). Bad arguments and a configuration mismatch raise `SystemExit` with one clear line."""
    from .judges import build_judges, load_judge_config

    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    if not Path(args.sessions).is_file():
        raise SystemExit(f"--sessions: no such file {args.sessions}")
    if not Path(args.images).is_dir():
        raise SystemExit(f"--images: no such folder {args.images}")
    if args.force and args.rejudge_missing:
        raise SystemExit("--force deletes the results that --rejudge-missing would judge again: pass one of them")
    try:
        judge_config = load_judge_config(args.judge)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--judge: {err}") from None
    call_kwargs = model_call_kwargs(args.pipeline_kwargs, args.steps) if args.model else {}
    config = run_config(args, judge_config, call_kwargs)
    try:  # before loading the editor or the judges: a wrong --out costs nothing
        legacy = {"model_fingerprint": [model_fingerprint(args.model, documentation=True)]} if args.model else None
        open_run(args.out, config, outputs=OUTPUTS, force=args.force, force_hint="--force", accept=legacy)
    except (ConfigMismatchError, ValueError) as err:
        raise SystemExit(f"--out: {err}") from None
    editor = None
    if args.rejudge_missing:
        pass  # nothing is edited
    elif args.editor:
        editor = EDITORS[args.editor]()
    else:  # the folder's call defaults (upstream's without), under --steps / --pipeline-kwargs
        from editr2.cli import model_loader

        kwargs = dict(call_kwargs)
        editor = model_loader()(args.model, kwargs.pop("reasoning", "intent"), args.seed, kwargs, dtype=None,
                                    device=args.device, fallback={}, name=f"EditR2Pipeline({args.model})",
                                    turn_seeds=False)
    judges = build_judges(judge_config)
    summary = run_mice_bench(args.sessions, args.images, editor, judges, args.out, limit=args.limit,
                        filmstrips=not args.no_filmstrips, rerun_errors=args.rerun_errors,
                        rejudge=args.rejudge_missing, config=config)
    print(summary.line())
    return 1 if summary.errors else 0


if __name__ == "__main__":  # `python -m editr2.bench.mice_cli ...` == `editr2 bench mice ...`
    from editr2.cli import main

    sys.exit(main(["bench", "mice", *sys.argv[1:]]))

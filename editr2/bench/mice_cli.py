"""Run an editor over real MICE-format sessions and score every turn with the judges (IF, CC, GA).

    editr2 bench mice --sessions cm_test.jsonl --images DIR --editor identity --judge judge.yaml --out runs/mice

Each finished session is appended to ``OUT/results.jsonl`` at once, so an interrupted run started again with the same
``--out`` skips the sessions already there. A bad session (missing or unreadable image, a malformed line, an editor
that fails) is recorded with its error and the run goes on; a judgement that fails is recorded as missing, never as a
made-up score. At the end (and from the results file alone) ``report.md``, ``per_turn.png`` and one side-by-side
filmstrip per session (``filmstrips/<session_id>.png``) are written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from PIL import Image

from .mice import MiceFormatError, MiceSession, append_result, iter_session_lines, read_results

# ---------------------------------------------------------------------------------------------------------------------
# Editors
# ---------------------------------------------------------------------------------------------------------------------


class Editor(Protocol):
    """Edits a whole session: returns one output image per instruction, in order."""

    name: str

    def edit_session(self, source: Image.Image, instructions: Sequence[str], session: MiceSession) -> list[Image.Image]:
        ...


class IdentityEditor:
    """Returns the input unchanged at every turn: a floor for IF and GA, a ceiling for CC."""

    name = "identity"

    def edit_session(self, source, instructions, session):
        return [source.copy() for _ in instructions]


class PipelineEditor:
    """`diffusers_editr2.EditR2Pipeline` loaded from a folder (imported only when used).

    Args:
        path: the pipeline folder (`EditR2Pipeline.from_pretrained`).
        device: where to run it.
        seed: seeds one generator per session (the same session gets the same noise whatever ran before).
        call_kwargs: passed to every turn (e.g. ``{"num_inference_steps": 28, "negative_prompt": " "}``), over the
            folder's own `editr2_call_defaults.json` when it has one (upstream's defaults otherwise).
    """

    def __init__(self, path: str, device: str = "cpu", seed: int = 0, call_kwargs: dict | None = None):
        import torch

        from diffusers_editr2 import EditR2Pipeline
        from diffusers_editr2.bench import load_call_defaults

        self.name = f"EditR2Pipeline({path})"
        self.pipe = EditR2Pipeline.from_pretrained(path).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        defaults = load_call_defaults(path, fallback={})
        self.seed, self.call_kwargs, self._torch = seed, {**defaults, **(call_kwargs or {})}, torch

    def edit_session(self, source, instructions, session):
        generator = self._torch.Generator(device="cpu").manual_seed(self.seed)
        output = self.pipe.edit_session(source, list(instructions), generator=generator, **self.call_kwargs)
        return list(output.images)


EDITORS: dict[str, Callable[[], Editor]] = {"identity": IdentityEditor}


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
                     filmstrip_dir: Path | None = None) -> dict:
    """Edit one session and judge every turn. Never raises for a bad session: the error goes into the record."""
    record: dict = {"session_id": session.session_id, "line": session.line, "image": session.image,
                    "num_turns": session.num_turns, "status": "ok", "error": None, "turns": [], "seconds": {}}
    try:
        source = load_image(resolve_image(images_dir, session.image))
        start = time.perf_counter()
        try:
            outputs = editor.edit_session(source, list(session.instruction), session)
        except Exception as err:  # noqa: BLE001 - an editor failure ends this session only
            raise SessionError(f"editor {editor.name} failed: {type(err).__name__}: {err}") from None
        record["seconds"]["edit"] = round(time.perf_counter() - start, 3)
        if len(outputs) != session.num_turns or not all(isinstance(im, Image.Image) for im in outputs):
            raise SessionError(f"editor {editor.name} returned {len(outputs)} item(s) for {session.num_turns} turns; "
                               "it must return one PIL image per turn")
        images = [source] + [im.convert("RGB") for im in outputs]
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
    if filmstrip_dir is not None:
        try:
            save_filmstrip(images, session, record, filmstrip_dir / f"{session.session_id}.png")
        except Exception as err:  # noqa: BLE001 - a drawing problem must not lose the scores
            record["filmstrip_error"] = f"{type(err).__name__}: {err}"
    return record


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
    errors: int  # error records in the whole results file


def run_bench(sessions_path: str | Path, images_dir: str | Path, editor: Editor, judges, out_dir: str | Path, *,
              limit: int | None = None, filmstrips: bool = True, rerun_errors: bool = False,
              log: Callable[[str], None] | None = None) -> BenchSummary:
    """Run `editor` over the sessions of `sessions_path`, judge them, append results, then write the report.

    Args:
        sessions_path: MICE-format JSONL.
        images_dir: folder the sessions' ``image`` paths are relative to.
        editor: an `Editor`.
        judges: a `JudgeSet` (from `editr2.bench.judges.build_judges`).
        out_dir: output folder; ``results.jsonl`` there is resumed.
        limit: only the first `limit` lines with sessions.
        filmstrips: draw ``filmstrips/<session_id>.png``.
        rerun_errors: run sessions whose earlier record is an error again.
        log: progress sink (default: stderr).
    """
    from .judges.rewards import REWARD_WEIGHTS

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out_dir, images_dir = Path(out_dir), Path(images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    filmstrip_dir = out_dir / "filmstrips" if filmstrips else None
    if filmstrip_dir is not None:
        filmstrip_dir.mkdir(exist_ok=True)
    weights = {metric: REWARD_WEIGHTS[metric] for metric in judges.metrics}

    done = {r["session_id"]: r for r in read_results(results_path)}
    if rerun_errors:
        done = {sid: r for sid, r in done.items() if r.get("status") != "error"}
    items = list(iter_session_lines(sessions_path))[:limit] if limit else list(iter_session_lines(sessions_path))
    finished = skipped = 0
    for position, (line, item) in enumerate(items, start=1):
        if isinstance(item, MiceFormatError):
            record = error_record(line, item)
        else:
            record = None
        session_id = record["session_id"] if record else item.session_id
        if session_id in done:
            skipped += 1
            continue
        if record is None:
            record = evaluate_session(item, images_dir, editor, judges, weights, filmstrip_dir)
        append_result(results_path, record)
        finished += 1
        log(f"[{position}/{len(items)}] {session_id}: {_one_line(record)}")

    records = latest_records(read_results(results_path))
    report_path = write_report(out_dir, records, {"sessions": str(sessions_path), "images": str(images_dir),
                                                  "editor": editor.name, "metrics": judges.metrics})
    errors = sum(r.get("status") == "error" for r in records)
    return BenchSummary(results_path, report_path, finished, skipped, errors)


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


def write_report(out_dir: Path, records: list[dict], config: dict) -> Path:
    """``report.md`` (per-turn table, missing judgements, per-session errors, session list) and ``per_turn.png``."""
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
        "applicable) judgements are excluded and counted. Reward = 0.3 IF + 0.3 CC + 0.4 GA, only where all parts "
        "have a score.",
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
    if table:
        try:
            plot_per_turn(table, metrics, out_dir / "per_turn.png")
            lines += ["", "## Plot", "", "![per-turn scores](per_turn.png)"]
        except ImportError as err:
            lines += ["", f"(per_turn.png not drawn: {err})"]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps({"per_turn": table, "config": config,
                                                      "errors": len(errors), "scored": len(ok)}, indent=2))
    return report


def plot_per_turn(table: list[dict], metrics: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2), dpi=120)
    turns = [row["turn"] for row in table]
    for metric in list(metrics) + ["reward"]:
        values = [row[metric] if row[metric] is not None else float("nan") for row in table]
        axes.plot(turns, values, marker="o", label=metric)
    axes.set_xlabel("turn")
    axes.set_ylabel("mean score")
    axes.set_xticks(turns)
    axes.set_ylim(-0.05, 1.05)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("MICE-Bench per turn")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


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
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds results.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N sessions")
    parser.add_argument("--device", default="cpu", help="device for --model (cpu, cuda, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --model")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per turn for --model")
    parser.add_argument("--pipeline-kwargs", default=None, metavar="JSON",
                        help='extra EditR2Pipeline arguments for every turn, e.g. \'{"negative_prompt": " "}\'')
    parser.add_argument("--no-filmstrips", action="store_true", help="do not draw per-session filmstrips")
    parser.add_argument("--rerun-errors", action="store_true", help="run sessions recorded with an error again")


def run(args: argparse.Namespace) -> int:
    from .judges import build_judges, load_judge_config

    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    if not Path(args.sessions).is_file():
        raise SystemExit(f"--sessions: no such file {args.sessions}")
    if not Path(args.images).is_dir():
        raise SystemExit(f"--images: no such folder {args.images}")
    try:
        config = load_judge_config(args.judge)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--judge: {err}") from None
    if args.editor:
        editor = EDITORS[args.editor]()
    else:
        try:
            call_kwargs = json.loads(args.pipeline_kwargs) if args.pipeline_kwargs else {}
        except json.JSONDecodeError as err:
            raise SystemExit(f"--pipeline-kwargs must be a JSON object: {err}") from None
        if not isinstance(call_kwargs, dict):
            raise SystemExit("--pipeline-kwargs must be a JSON object, e.g. '{\"num_inference_steps\": 28}'")
        if args.steps is not None:
            call_kwargs["num_inference_steps"] = args.steps
        editor = PipelineEditor(args.model, args.device, args.seed, call_kwargs)
    judges = build_judges(config)
    summary = run_bench(args.sessions, args.images, editor, judges, args.out, limit=args.limit,
                        filmstrips=not args.no_filmstrips, rerun_errors=args.rerun_errors)
    print(f"{summary.finished} session(s) run, {summary.skipped} already done, {summary.errors} with errors; "
          f"report: {summary.report_path}")
    return 0


if __name__ == "__main__":  # `python -m editr2.bench.mice_cli ...` == `editr2 bench mice ...`
    _parser = argparse.ArgumentParser(prog="editr2 bench mice", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))

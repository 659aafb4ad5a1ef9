"""Compare two `editr2 bench shapes` runs on the same sessions: per turn, B - A with a paired bootstrap interval.

    editr2 bench shapes --model checkpoints/editr2-shapes-tiny --reasoning none --seed 1000 --out runs/none_cm
    editr2 bench shapes --model checkpoints/editr2-shapes-tiny --reasoning intent --seed 1000 --out runs/intent_cm
    editr2 bench compare runs/none_cm runs/intent_cm --out runs/intent_vs_none.md --json runs/intent_vs_none.json

RUN_A and RUN_B are two output folders of `editr2 bench shapes` (their results.json and session_results.jsonl) over
the same sessions: the same family, seeds, number of sessions, turns, image size and phrasing; anything else (editor,
model, reasoning, prompts, sample seed, call arguments) may differ, and is what is compared. Other sessions are
refused, naming what differs.

For every turn and metric (IF, CC, GA, reward), and over all turns: the mean of A, the mean of B, the difference
B - A and its 95% paired percentile bootstrap interval (`editr2.bench.stats.paired_bootstrap_ci`, 1000 resamples,
seed 0): each resample draws whole sessions, the same ones for both arms, so what a session makes easy or hard for
both cancels. A difference whose interval excludes 0 is marked `*`. Prints the markdown table; --out writes it, --json
writes the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# What makes the sessions of a run: two runs are compared only when all of these agree.
SESSION_KEYS = ("family", "seed", "sessions", "turns", "size", "phrasing")
CI_LEVEL, CI_RESAMPLES, CI_SEED = 0.95, 1000, 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="the baseline: an `editr2 bench shapes` --out folder")
    parser.add_argument("run_b", metavar="RUN_B", help="the other arm, over the same sessions")
    parser.add_argument("--out", default=None, metavar="FILE.md", help="also write the markdown table here")
    parser.add_argument("--json", default=None, metavar="FILE.json", help="write the numbers as JSON here")


def run(args: argparse.Namespace) -> int:
    try:
        result = compare_runs(args.run_a, args.run_b)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    text = compare_markdown(result)
    print(text, end="")
    for path, content in ((args.out, text), (args.json, json.dumps(result, indent=2) + "\n")):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    return 0


def session_config(config: dict) -> dict:
    """The part of a results.json `config` that fixes its sessions (`SESSION_KEYS`; phrasing "grammar" when absent,
    as `run_bench` records it)."""
    return {key: config.get(key, "grammar" if key == "phrasing" else None) for key in SESSION_KEYS}


def read_run_config(path) -> dict:
    """The results.json `config` of the bench shapes run in folder `path` (a `ValueError` names what is missing)."""
    folder = Path(path)
    results_file = folder / "results.json"
    if not results_file.is_file():
        raise ValueError(f"{folder}: no results.json there; pass the --out folder of a finished `editr2 bench shapes` "
                         "run.")
    try:
        config = json.loads(results_file.read_text())["config"]
        missing = [key for key in ("family", "seed", "sessions", "turns") if key not in config]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{results_file}: not an `editr2 bench shapes` results.json (no config); pass the --out "
                         "folder of a bench shapes run.") from None
    if missing:
        raise ValueError(f"{results_file}: its config lacks {', '.join(missing)}; pass the --out folder of a bench "
                         "shapes run.")
    return config


def read_run_scores(path, config: dict) -> list[list]:
    """The per-turn scores (`TurnScore` lists) of the sessions that `config` (the run's results.json config) reports,
    in seed order, read from the run's session_results.jsonl without changing it (a `ValueError` names a missing
    session or a broken line)."""
    from .metrics import TurnScore
    from .resume import ResultsFileError, latest_by_id, read_results
    from .shapes.runner import session_id
    from .shapes_cli import SESSION_RESULTS

    folder = Path(path)
    try:
        records = latest_by_id(read_results(folder / SESSION_RESULTS, repair=False))
    except ResultsFileError as err:
        raise ValueError(f"{err}: run the same `editr2 bench shapes` command again to finish that run.") from None
    scores = []
    for i in range(config["sessions"]):
        sid = session_id(config["family"], config["seed"] + i)
        record = records.get(sid)
        if record is None or len(record["turns"]) != config["turns"]:
            raise ValueError(f"{folder / SESSION_RESULTS} lacks session {sid} ({config['turns']} turns), which "
                             "results.json reports; run the same `editr2 bench shapes` command again.")
        scores.append([TurnScore(**turn) for turn in record["turns"]])
    return scores


def compare_runs(run_a, run_b, *, num_resamples: int = CI_RESAMPLES, seed: int = CI_SEED) -> dict:
    """Paired comparison of two bench shapes runs over the same sessions (see the module docstring).

    Args:
        run_a, run_b (`str` or `os.PathLike`): their --out folders; B - A is reported.
        num_resamples (`int`), seed (`int`): the paired bootstrap's.

    Returns:
        `{"a": {"path", "config"}, "b": {...}, "sessions": {the shared session settings}, "differs": {key: [A, B]} for
        the other config keys that differ, "level", "num_resamples", "seed", "per_turn": [{"turn", "<metric>":
        {"a", "b", "diff", "diff_ci": [low, high]}}], "mean": {"<metric>": {...}} over all turns}`.

    Raises:
        ValueError: a folder without a finished run, or runs over other sessions (naming the settings that differ).
    """
    import numpy as np

    from .metrics import METRICS
    from .shapes.runner import score_matrix
    from .stats import paired_bootstrap_ci

    a, b = ({"path": str(Path(run)), "config": read_run_config(run)} for run in (run_a, run_b))
    shared_a, shared_b = session_config(a["config"]), session_config(b["config"])
    if shared_a != shared_b:
        differ = "; ".join(f"{key}: {json.dumps(shared_a[key])} (A) vs {json.dumps(shared_b[key])} (B)"
                           for key in SESSION_KEYS if shared_a[key] != shared_b[key])
        raise ValueError(f"{a['path']} and {b['path']} are not over the same sessions ({differ}); pass two runs with "
                         "the same --family, --seed, --sessions, --turns, --size and --phrasing.")
    for run in (a, b):
        run["scores"] = read_run_scores(run["path"], run["config"])
    others = sorted((set(a["config"]) | set(b["config"])) - set(SESSION_KEYS))
    differs = {key: [a["config"].get(key), b["config"].get(key)] for key in others
               if a["config"].get(key) != b["config"].get(key)}

    def cell(matrix_a, matrix_b, statistic) -> dict:
        mean_a, mean_b = float(statistic(matrix_a)), float(statistic(matrix_b))
        low, high = paired_bootstrap_ci(matrix_a, matrix_b, statistic, num_resamples, CI_LEVEL, seed)
        return {"a": mean_a, "b": mean_b, "diff": mean_b - mean_a, "diff_ci": [low, high]}

    turns = shared_a["turns"]
    matrices = {m: (score_matrix(a["scores"], m, turns), score_matrix(b["scores"], m, turns)) for m in METRICS}
    per_turn = [{"turn": t, **{m: cell(ma[:, t - 1], mb[:, t - 1], np.mean) for m, (ma, mb) in matrices.items()}}
                for t in range(1, turns + 1)]
    mean = {m: cell(ma, mb, np.nanmean) for m, (ma, mb) in matrices.items()}
    return {"a": {"path": a["path"], "config": a["config"]}, "b": {"path": b["path"], "config": b["config"]},
            "sessions": shared_a, "differs": differs, "level": CI_LEVEL, "num_resamples": num_resamples,
            "seed": seed, "per_turn": per_turn, "mean": mean}


def compare_markdown(result: dict, digits: int = 3) -> str:
    """`compare_runs`'s result as markdown: what is compared, then one row per turn and metric (and over all turns):
    A, B, B - A and its interval, marked `*` where the interval excludes 0."""
    from .metrics import METRICS

    shared = result["sessions"]
    last = shared["seed"] + shared["sessions"] - 1
    lines = ["# Paired comparison: B - A", "",
             f"- A: `{result['a']['path']}` (editor `{result['a']['config'].get('editor')}`)",
             f"- B: `{result['b']['path']}` (editor `{result['b']['config'].get('editor')}`)",
             f"- sessions: {shared['sessions']} {shared['family']} sessions, seeds {shared['seed']}..{last}, "
             f"{shared['turns']} turns, size {shared['size']}, phrasing {shared['phrasing']}"]
    for key, (value_a, value_b) in result["differs"].items():
        lines.append(f"- {key}: `{json.dumps(value_a)}` (A) vs `{json.dumps(value_b)}` (B)")
    lines += ["", "| turn | metric | A | B | B - A | 95% CI |", "|---|---|---|---|---|---|"]
    rows = [(str(row["turn"]), row) for row in result["per_turn"]] + [("all", result["mean"])]
    for label, row in rows:
        for metric in METRICS:
            c = row[metric]
            low, high = c["diff_ci"]
            mark = " *" if low > 0 or high < 0 else ""
            lines.append(f"| {label} | {metric} | {c['a']:.{digits}f} | {c['b']:.{digits}f} | {c['diff']:+.{digits}f} "
                         f"| [{low:+.{digits}f}, {high:+.{digits}f}]{mark} |")
    lines += ["", f"{result['level']:.0%} paired percentile bootstrap intervals over the {shared['sessions']} sessions "
                  f"(the same resampled sessions for both arms; {result['num_resamples']} resamples, seed "
                  f"{result['seed']}); `*`: the interval excludes 0."]
    return "\n".join(lines) + "\n"

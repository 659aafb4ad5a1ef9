"""IF of `editr2 bench shapes` runs broken down by operation and by scene size, per band of turns.

    python -m recipes.shapes_tiny.turn_breakdown docs/carried/v4editor_gold_cm6 docs/carried/v4editor_gold_cu6

Reads each folder's `bench_config.json` and `session_results.jsonl` (no model), regenerates its sessions
(`generate_session(family, turns, seed)`, the same as the bench drew) and prints, for every run, the mean IF per
operation (`task_type` of the turn) and per number of objects in the scene the turn edits, in turn bands of two
(turns 1-2, 3-4, ...), with the number of turns behind each mean. Sessions in everyday phrasing are regenerated with
their phrasing (the operations do not depend on it).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

CROWDED = 4  # a scene with at least this many objects counts as crowded


def load_run(folder: Path) -> tuple[dict, list[dict]]:
    """`(bench_config, session rows)` of an `editr2 bench shapes` folder."""
    config_file, rows_file = folder / "bench_config.json", folder / "session_results.jsonl"
    if not config_file.is_file() or not rows_file.is_file():
        raise SystemExit(f"{folder}: not an `editr2 bench shapes` folder (needs bench_config.json and "
                         "session_results.jsonl).")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    return json.loads(config_file.read_text()), rows


def band(turn: int) -> str:
    """Turns 1-2 -> "1-2", 3-4 -> "3-4", ..."""
    first = turn - (turn - 1) % 2
    return f"{first}-{first + 1}"


def breakdown(config: dict, rows: list[dict]) -> dict:
    """`{"operation": {(op, band): [IF sum, n]}, "scene": {(size label, band): [IF sum, n]}}`."""
    from editr2.bench.shapes import generate_session

    kwargs = {"size": config.get("size", 64), "phrasing": config.get("phrasing") or "grammar"}
    out = {"operation": defaultdict(lambda: [0.0, 0]), "scene": defaultdict(lambda: [0.0, 0])}
    for row in rows:
        session = generate_session(config["family"], config["turns"], row["seed"], **kwargs)
        for turn in row["turns"]:
            k = turn["turn"] - 1
            objects = len(session.scenes[k].objects)  # the scene this turn edits
            size = f">= {CROWDED} objects" if objects >= CROWDED else f"<= {CROWDED - 1} objects"
            for table, key in (("operation", session.task_type[k]), ("scene", size)):
                cell = out[table][(key, band(turn["turn"]))]
                cell[0] += turn["IF"]
                cell[1] += 1
    return out


def markdown(name: str, config: dict, num_sessions: int, tables: dict) -> str:
    bands = sorted({b for table in tables.values() for _, b in table}, key=lambda b: int(b.split("-")[0]))
    lines = [f"## {name}: {config['family']}, {num_sessions} sessions x {config['turns']} turns",
             ""]
    for title, table in (("operation", tables["operation"]), ("scene the turn edits", tables["scene"])):
        lines += [f"| {title} | " + " | ".join(f"IF, turns {b} (n)" for b in bands) + " |",
                  "|---|" + "---|" * len(bands)]
        for key in sorted({k for k, _ in table}):
            cells = [table.get((key, b)) for b in bands]
            lines.append(f"| {key} | " + " | ".join(f"{c[0] / c[1]:.2f} ({c[1]})" if c else "–" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="`editr2 bench shapes` output folders")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    parts = []
    for folder in map(Path, args.runs):
        config, rows = load_run(folder)
        parts.append(markdown(folder.name, config, len(rows), breakdown(config, rows)))
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

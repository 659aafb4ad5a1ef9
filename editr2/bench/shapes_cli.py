"""Score a symbolic editor on generated MICE-Shapes sessions (IF / CC / GA / reward per turn).

Writes OUT/results.json ({"per_turn", "mean", "config"}), OUT/report.md and OUT/per_turn.png.
"""

from __future__ import annotations

import argparse

EDITOR_NAMES = ("oracle", "identity", "literal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--editor", choices=EDITOR_NAMES, default="oracle", help="which symbolic editor to score")
    parser.add_argument("--family", choices=("cm", "cu"), default="cm",
                        help="cm: persistent rule in turn 1; cu: back-references and undo")
    parser.add_argument("--sessions", type=int, default=100, help="number of sessions (default 100)")
    parser.add_argument("--turns", type=int, default=3, help="turns per session, 1-8 (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="first session seed (default 0)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from editr2.bench.editors import make_editor
    from editr2.bench.report import markdown_table, write_report
    from editr2.bench.shapes.runner import run_bench

    if not 1 <= args.turns <= 8:
        raise SystemExit(f"--turns {args.turns}: pass a value in 1..8.")
    if args.sessions < 1:
        raise SystemExit(f"--sessions {args.sessions}: pass at least 1.")
    results = run_bench(make_editor(args.editor), family=args.family, num_sessions=args.sessions,
                        num_turns=args.turns, seed=args.seed, size=args.size, progress=not args.no_progress,
                        editor_name=args.editor)
    paths = write_report(results, args.out)
    print(markdown_table(results))
    print(f"wrote {paths['results']}, {paths['report']}, {paths['plot']}")
    return 0

"""MICE-Shapes throughput: sessions generated per second, and sessions edited + scored per second per editor.

    python benchmarks/shapes_throughput.py --sessions 200 --turns 3

Prints a markdown table. "run" is the editor's turns plus scoring; "score" is scoring alone (parsing every image with
the oracle parser and computing IF / CC / GA) on the editor's images.
"""

from __future__ import annotations

import argparse
import time

from editr2.bench.editors import make_editor
from editr2.bench.metrics import score_session
from editr2.bench.shapes import generate_session
from editr2.bench.shapes.runner import run_session


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)

    print(f"sessions={args.sessions} turns={args.turns} size={args.size}\n")
    print("| family | editor | generate (sessions/s) | run + score (sessions/s) | score only (sessions/s) |")
    print("|---|---|---|---|---|")
    for family in ("cm", "cu"):
        start = time.perf_counter()
        sessions = [generate_session(family, args.turns, seed, args.size) for seed in range(args.sessions)]
        generate_rate = args.sessions / (time.perf_counter() - start)
        for name in ("oracle", "identity", "literal"):
            editor = make_editor(name)
            start = time.perf_counter()
            runs = [run_session(editor, s)[0] for s in sessions]
            run_rate = args.sessions / (time.perf_counter() - start)
            start = time.perf_counter()
            for s, images in zip(sessions, runs):
                score_session(s, images)
            score_rate = args.sessions / (time.perf_counter() - start)
            print(f"| {family} | {name} | {generate_rate:,.0f} | {run_rate:,.1f} | {score_rate:,.1f} |")


if __name__ == "__main__":
    main()

"""Score operative-intent reconstruction on MICE-format sessions (text only: no images, no model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", required=True, type=Path, help="MICE-format JSONL file (release format).")
    parser.add_argument("--reconstructor", default="rule", choices=["rule", "literal"],
                        help="'rule': the rule-based reconstructor; 'literal': the raw instruction (baseline).")
    parser.add_argument("--limit", type=int, default=None, help="Score only the first N sessions.")
    parser.add_argument("--out", type=Path, default=None, help="Write the summary JSON here too.")


def run(args: argparse.Namespace) -> int:
    from editr2.bench.intent_score import score_sessions
    from editr2.bench.mice import load_sessions
    from editr2.bench.shapes.reconstruct import RuleBasedReconstructor
    from editr2.intent import Intent

    sessions = load_sessions(args.sessions)[: args.limit]
    if args.reconstructor == "rule":
        reconstructor = RuleBasedReconstructor("mice")
    else:
        reconstructor = lambda history, instruction: Intent(instruction)  # noqa: E731
    summary = score_sessions([(s.instruction, s.formatted_instruction) for s in sessions], reconstructor).summarise()
    summary["reconstructor"] = args.reconstructor
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0

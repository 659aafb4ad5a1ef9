"""Run the main demo: multi-turn MICE-Shapes sessions, scored per turn (IF / CC / GA).

With the shipped default model (checkpoints/editr2-shapes-tiny) it edits one cm and one cu session in the fixed
grammar and one session typed in everyday words (`--everyday`: phrasing families held out from every training path,
`editr2.bench.shapes.language`) with EditR2Pipeline, and writes each session's folder and filmstrip. Without it (or with --symbolic) it scores the symbolic
reference editors (oracle, literal, identity) on both session families, which shows what the metrics measure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editr2.intent import REASONING_MODES

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "editr2-shapes-tiny"
SYMBOLIC_EDITORS = ("oracle", "literal", "identity")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="EditR2Pipeline folder (default: shipped)")
    parser.add_argument("--symbolic", action="store_true", help="score the symbolic editors even if a model exists")
    parser.add_argument("--sessions", type=int, default=50, help="sessions per family for the symbolic run")
    parser.add_argument("--turns", type=int, default=3, help="turns per session (default 3)")
    parser.add_argument("--seed", type=int, default=1000, help="first session seed (held-out range by default)")
    parser.add_argument("--reasoning", choices=REASONING_MODES, default="intent",
                        help="how the history reaches the model (default: intent)")
    parser.add_argument("--everyday", choices=("cm", "cu", "none"), default="cu",
                        help="family of the session typed in everyday words, held-out phrasing (default cu; none: "
                             "grammar sessions only)")


def run(args: argparse.Namespace) -> int:
    if not args.symbolic and (args.model / "model_index.json").is_file():
        from editr2.cli import model_loader  # the diffusers integration's; the model's call defaults apply

        return _run_model(args, model_loader()(args.model, args.reasoning, seed=args.seed, turn_seeds=False))
    if not args.symbolic:
        print(f"No model at {args.model}: scoring the symbolic reference editors instead.\n")
    return _run_symbolic(args)


def _run_symbolic(args: argparse.Namespace) -> int:
    from editr2.bench.editors import make_editor
    from editr2.bench.report import write_report
    from editr2.bench.shapes.runner import run_bench

    rows = []
    for family in ("cm", "cu"):
        for name in SYMBOLIC_EDITORS:
            results = run_bench(make_editor(name), family=family, num_sessions=args.sessions, num_turns=args.turns,
                                seed=args.seed, progress=False, editor_name=name)
            write_report(results, args.out / f"{family}_{name}")
            for row in results["per_turn"]:
                rows.append((family, name, row))
    print("| family | editor | turn | IF | CC | GA | reward |")
    print("|---|---|---|---|---|---|---|")
    for family, name, r in rows:
        print(f"| {family} | {name} | {r['turn']} | {r['IF']:.3f} | {r['CC']:.3f} | {r['GA']:.3f} | {r['reward']:.3f} |")
    print(f"\nReports (results.json, report.md, per_turn.png) under {args.out}/")
    return 0


def _run_model(args: argparse.Namespace, editor) -> int:
    from editr2.bench.metrics import score_session
    from editr2.bench.shapes.sessions import generate_session
    from editr2.filmstrip import filmstrip

    summary = {}
    runs = [(family, "grammar") for family in ("cm", "cu")]
    if args.everyday != "none":
        runs.append((args.everyday, "unseen"))
    for family, phrasing in runs:
        truth = generate_session(family, args.turns, args.seed, phrasing=phrasing)
        editor.edit_session(truth.source_image(), list(truth.instruction), truth)
        session = editor.session
        scores = score_session(truth, [session.source_image, *session.images[1:]])
        name = family if phrasing == "grammar" else f"{family}_everyday"
        wording = "" if phrasing == "grammar" else ", everyday words (held-out phrasing)"
        print(f"== {family} session (seed {args.seed}{wording}) ==")
        for turn, s in zip(session.turns, scores):
            note = f"  [fallback: {turn.fallback_reason}]" if turn.fallback_reason else ""
            print(f"  instruction: {turn.instruction}\n  intent:      {turn.intent}{note}\n"
                  f"  IF={s.IF:.2f} CC={s.CC:.2f} GA={s.GA:.2f}")
        directory = session.save(args.out / name)
        filmstrip(session).save(directory / "filmstrip.png")
        summary[name] = [s.__dict__ for s in scores]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nSession folders (with filmstrip.png) and summary.json under {args.out}/")
    return 0

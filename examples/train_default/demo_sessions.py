"""Run one cm and one cu MICE-Shapes session with the shipped model; print each turn's scores, write filmstrips.

    python examples/train_default/demo_sessions.py --model checkpoints/editr2-shapes-tiny --out demo_out

For each family: the instruction, the operative intent the model wrote, and IF / CC / GA of every turn (the oracle
parser reads the images back), then `OUT/<family>/` (a saved `editr2.session.Session`: session.json, source.png,
turn_XX.png, latents.safetensors) and `OUT/<family>/filmstrip.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(common.REPO / "checkpoints" / "editr2-shapes-tiny"))
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="session seed (held out from training)")
    parser.add_argument("--reasoning", choices=("intent", "history", "none"), default="intent")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers_editr2 import EditR2Pipeline
    from editr2.bench.shapes import generate_session
    from editr2.bench.shapes.runner import run_session
    from editr2.filmstrip import filmstrip

    model = Path(args.model)
    pipe = EditR2Pipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    defaults = model / "editr2_call_defaults.json"
    call_kwargs = json.loads(defaults.read_text()) if defaults.exists() else common.CALL_KWARGS
    for family in ("cm", "cu"):
        session = generate_session(family, args.turns, args.seed)
        editor = common.PipelineEditor(pipe, args.reasoning, seed=args.seed, call_kwargs=call_kwargs)
        tick = time.perf_counter()
        _, scores = run_session(editor, session)
        print(f"== {family} session (seed {args.seed}), {time.perf_counter() - tick:.1f} s")
        for k, (turn, score) in enumerate(zip(editor.session.turns, scores), start=1):
            print(f"turn {k}: {turn.instruction}")
            note = f"  [fallback: {turn.fallback_reason}]" if turn.fallback_reason else ""
            print(f"   intent: {turn.intent}{note}")
            print(f"   IF {score.IF:.0f}  CC {score.CC:.2f}  GA {score.GA:.0f}")
        directory = editor.session.save(Path(args.out) / family)
        filmstrip(editor.session).save(directory / "filmstrip.png")
        print(f"   wrote {directory}/ (session.json, turn_XX.png, filmstrip.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

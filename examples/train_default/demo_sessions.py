"""Run one cm and one cu MICE-Shapes session with the shipped model; print each turn's scores, write filmstrips.

    python examples/train_default/demo_sessions.py --model checkpoints/editr2-shapes-tiny --out demo_out

For each family: the instruction, the operative intent the model wrote, and IF / CC / GA of every turn (the oracle
parser reads the images back), then `OUT/<family>/` (a saved `editr2.session.Session`: session.json, source.png,
turn_XX.png, latents.safetensors) and `OUT/<family>/filmstrip.png`.
"""

from __future__ import annotations

import argparse
import sys
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

    from editr2 import demo  # `editr2 demo` runs the same sessions: one implementation serves both

    return demo.run(argparse.Namespace(model=Path(args.model), out=Path(args.out), turns=args.turns, seed=args.seed,
                                       reasoning=args.reasoning, symbolic=False, sessions=1))


if __name__ == "__main__":
    sys.exit(main())

"""What a reasoner gets wrong: its intents against the gold ones on held-out sessions, sorted into error kinds.

    python -m recipes.shapes_tiny.reasoner_errors --run runs/reasoner_v2 --checkpoint step_0005000 \
        --phrasing seen --sessions 5 --turns 4

Loads a `train_reasoner` run (its `config.json`, tokenizer and a checkpoint's weights, or the finished
`text_encoder/` without `--checkpoint`), writes every turn's intent through `train_reasoner.evaluate_phrasing` on
sessions from seed `--seed` (held out: training draws seeds >= 10,000,000) and prints the exact match per family, the
count of each error kind and every wrong turn (instruction, gold, written):

- `wrong operation`: the intent's first word (the operation) differs;
- `wrong object`: same operation, but the first object it names differs in size, colour or shape (read from the
  image or the history wrong);
- `occupied-cell policy`: the gold intent says where an object displaced by the move or add goes, the intent does not;
- `other`: anything else (a second object, the rule clause, wording).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

from editr2.bench.shapes.world import COLOR_NAMES, SHAPES

OBJECT = re.compile(rf"\b(small|large) ({'|'.join(COLOR_NAMES)}) ({'|'.join(SHAPES)})\b")
POLICY_WORDS = ("nearest free", "swapping")


def error_kind(gold: str, written: str) -> str:
    """The kind of a wrong intent (see the module docstring)."""
    if gold.split()[:1] != written.split()[:1]:
        return "wrong operation"
    gold_objects, written_objects = OBJECT.findall(gold), OBJECT.findall(written)
    if gold_objects and written_objects and gold_objects[0] != written_objects[0]:
        return "wrong object"
    if any(w in gold for w in POLICY_WORDS) and not any(w in written for w in POLICY_WORDS):
        return "occupied-cell policy"
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a train_reasoner run folder")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder name (default: the finished model)")
    parser.add_argument("--phrasing", choices=("grammar", "seen", "unseen"), default="seen")
    parser.add_argument("--sessions", type=int, default=5, help="sessions per family")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1000, help="first session seed")
    parser.add_argument("--json", default=None, help="also write the records and counts to this file")
    args = parser.parse_args(argv)

    import torch

    from recipes.shapes_tiny import common
    from recipes.shapes_tiny import train_reasoner as tr

    run = Path(args.run)
    if not (run / "config.json").is_file():
        raise SystemExit(f"--run {run}: no config.json there; pass a train_reasoner run folder.")
    fields = tr.ReasonerConfig.__dataclass_fields__
    cfg = tr.ReasonerConfig(**{k: v for k, v in json.loads((run / "config.json").read_text()).items() if k in fields})
    pipe = tr.build(cfg, run)
    weights = run / "checkpoints" / args.checkpoint if args.checkpoint else run / "text_encoder"
    if args.checkpoint:
        common.load_weights(pipe.text_encoder, weights)
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration

        pipe.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(weights)
    pipe.text_encoder.eval()
    records: list[dict] = []
    with torch.no_grad():
        metrics = tr.evaluate_phrasing(pipe, cfg, args.phrasing, args.sessions, args.turns, args.seed, record=records)
    wrong = [r for r in records if not r["exact"]]
    counts = collections.Counter(error_kind(r["gold"], r["intent"]) for r in wrong)
    print(f"{weights}: {args.phrasing} phrasing, {args.sessions} sessions x {args.turns} turns per family, exact "
          f"match cm {metrics['cm']['exact_match']:.3f} / cu {metrics['cu']['exact_match']:.3f}")
    print(f"{len(wrong)} wrong of {len(records)}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    for r in wrong:
        print(f"[{r['family']} seed {r['seed']} turn {r['turn']}, {error_kind(r['gold'], r['intent'])}] "
              f"{r['instruction']!r}\n    gold:    {r['gold']}\n    written: {r['intent']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": dict(counts), "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

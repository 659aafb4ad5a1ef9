"""How well a reasoner reconstructs the operative intent, in the grammar and in everyday words (seen / held-out).

    python -m recipes.shapes_tiny.reasoner_report --reasoner runs/reasoner_v3 --sessions 200 --turns 6 \
        --json docs/reasoner/v3.json
    python -m recipes.shapes_tiny.reasoner_report --reasoner checkpoints/editr2-shapes-tiny --sessions 200 \
        --turns 6 --json docs/reasoner/shipped.json
    python -m recipes.shapes_tiny.reasoner_report --from-json docs/reasoner/shipped.json docs/reasoner/v3.json \
        --out docs/reasoner.md

`--reasoner` is a `train_reasoner` run folder (its finished `text_encoder/`, or `--checkpoint step_X`) or an exported
pipeline folder (its text encoder, asked with the folder's call defaults). On `--sessions` held-out sessions per family
(seeds `--seed`..; training draws seeds >= 10,000,000) of `--turns` turns, in each `--phrasings` wording, every turn's
intent is written greedily from the true state before it (gold images and earlier intents:
`train_reasoner.evaluate_phrasing`) and compared with the gold intent. Each finished (phrasing, family) is saved to
`--json` at once, so the same command resumes. The markdown (stdout, or `--out`) has, per reasoner, the exact match per
turn with 95% bootstrap intervals over sessions, the rule kept and the references resolved ("it", "the first one",
...), then the exact match per operation and per phrasing family, with `--vocabulary` the words of the held-out
families that no training family uses, and the everyday-wording targets checked on the held-out families (exact >= 0.90 at turns 1-3 and >= 0.85 at turn 6, rule kept >= 0.99, references >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

PHRASINGS = ("grammar", "seen", "unseen")
FAMILIES = ("cm", "cu")
# everyday-wording targets, on the held-out phrasing families: (what, threshold)
TARGETS = (("exact, turns 1-3 (each)", 0.90), ("exact, turn 6", 0.85), ("rule kept", 0.99),
           ("references resolved", 0.95))


# ---------------------------------------------------------------------------------------------------------------------
# Running the reasoner
# ---------------------------------------------------------------------------------------------------------------------


def load_reasoner(path: Path, checkpoint: str | None = None):
    """`(pipeline, ReasonerConfig)` of a train_reasoner run folder or of an exported pipeline folder."""
    from recipes.shapes_tiny import common
    from recipes.shapes_tiny import train_reasoner as tr

    if (path / "model_index.json").is_file():  # an exported model: its reasoner, asked as its call defaults say
        import torch

        from diffusers_editr2 import EditR2Pipeline
        from diffusers_editr2.call_defaults import read_call_defaults

        if checkpoint:
            raise SystemExit("--checkpoint is for train_reasoner run folders; pass the run folder or no --checkpoint.")
        pipe = EditR2Pipeline.from_pretrained(path, dtype=torch.float32)
        calls = read_call_defaults(path) or {}
        template = "short" if calls.get("template") == tr.SHORT_TEMPLATE else "default"
        area = pipe.reasoning_area(calls.get("condition_area") or 32 * 32, calls.get("reasoning_condition_area"))
        side = int(round(area ** 0.5))
        cfg = tr.ReasonerConfig(template=template, condition_size=side,
                                max_new_tokens=int(calls.get("max_new_tokens") or 96))
        return pipe, cfg
    if not (path / "config.json").is_file():
        raise SystemExit(f"--reasoner {path}: neither a pipeline folder (model_index.json) nor a train_reasoner run "
                         "(config.json).")
    fields = tr.ReasonerConfig.__dataclass_fields__
    cfg = tr.ReasonerConfig(**{k: v for k, v in json.loads((path / "config.json").read_text()).items()
                               if k in fields and k not in ("init_from", "base_run")})
    pipe = tr.build(cfg, path)
    if checkpoint:
        common.load_weights(pipe.text_encoder, path / "checkpoints" / checkpoint)
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration

        if not (path / "text_encoder").is_dir():
            raise SystemExit(f"--reasoner {path}: the run has not finished (no text_encoder/); pass --checkpoint.")
        pipe.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder")
    return pipe, cfg


def run(args, data: dict, json_path: Path | None) -> dict:
    """Evaluate every (phrasing, family) that `data` lacks, saving after each."""
    import torch

    from recipes.shapes_tiny import train_reasoner as tr

    torch.set_num_threads(args.threads)
    wanted = {"reasoner": str(args.reasoner), "checkpoint": args.checkpoint, "sessions": args.sessions,
              "turns": args.turns, "seed": args.seed}
    if data.get("config") not in (None, wanted):
        raise SystemExit(f"{json_path} holds another evaluation ({data['config']}): pass another --json or delete it.")
    data.update(config=wanted, command="python -m recipes.shapes_tiny.reasoner_report " + shlex.join(args.argv))
    data.setdefault("records", {})
    pipe = cfg = None
    for phrasing in args.phrasings:
        for family in FAMILIES:
            key = f"{phrasing}/{family}"
            if key in data["records"]:
                continue
            if pipe is None:
                pipe, cfg = load_reasoner(Path(args.reasoner), args.checkpoint)
                pipe.reasoner.eval()
            records: list[dict] = []
            with torch.no_grad():
                tr.evaluate_phrasing(pipe, cfg, phrasing, args.sessions, args.turns, args.seed, record=records,
                                     families=(family,))
            data["records"][key] = [{k: v for k, v in r.items() if k != "reasoning"} for r in records]  # intents only
            if json_path is not None:
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
            print(f"{key}: exact {np.mean([r['exact'] for r in records]):.3f} ({len(records)} turns)", flush=True)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def rate(records: list[dict], keep=lambda r: True, value=lambda r: r["exact"]) -> tuple[float, tuple, int] | None:
    """Mean of `value` over the records `keep` selects, its 95% bootstrap interval over sessions, and the count."""
    from editr2.bench.stats import bootstrap_ci

    by_session: dict[int, list] = {}
    for r in records:
        if keep(r):
            by_session.setdefault(r["seed"], []).append(float(value(r)))
    if not by_session:
        return None
    rows = np.array([[sum(v), len(v)] for v in by_session.values()])  # (sessions, 2): a ratio of sums

    def mean(a):
        return float(a[:, 0].sum() / a[:, 1].sum())

    return mean(rows), bootstrap_ci(rows, mean), int(rows[:, 1].sum())


def referenced(record: dict) -> bool:
    """A turn that names its target by a reference ("it", "the earliest one", ...: `REFERENCE_KINDS`)."""
    from recipes.shapes_tiny.train_reasoner import REFERENCE_KINDS

    return record.get("reference") in REFERENCE_KINDS


def fmt(cell, interval: bool = True) -> str:
    if cell is None:
        return "–"
    value, (low, high), _ = cell
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if interval else f"{value:.2f}"


def name_of(data: dict) -> str:
    config = data["config"]
    return config["reasoner"] + (f" @ {config['checkpoint']}" if config.get("checkpoint") else "")


def main_table(reports: list[dict]) -> str:
    turns = max(r["config"]["turns"] for r in reports)
    head = ["reasoner", "phrasing", "family"] + [f"turn {t}" for t in range(1, turns + 1)] + [
        "all turns", "rule kept", "references"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for data in reports:
        for key, records in data["records"].items():
            phrasing, family = key.split("/")
            cells = [fmt(rate(records, lambda r, t=t: r["turn"] == t)) for t in range(1, turns + 1)]
            cells += [fmt(rate(records)), fmt(rate(records, lambda r: r.get("rule_kept") is not None,
                                                   lambda r: r["rule_kept"])),
                      fmt(rate(records, referenced))]
            lines.append(f"| {name_of(data)} | {phrasing} | {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(reports: list[dict], field: str, title: str) -> str:
    """Exact match per value of `field` (e.g. "operation", "words"), one column per (reasoner, phrasing)."""
    columns = [(data, phrasing) for data in reports for phrasing in PHRASINGS
               if any(k.startswith(phrasing + "/") for k in data["records"])]
    values = sorted({r.get(field) for data, _ in columns for recs in data["records"].values() for r in recs
                     if r.get(field) is not None})
    head = [title] + [f"{name_of(data)}, {phrasing}" for data, phrasing in columns]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for value in values:
        cells = []
        for data, phrasing in columns:
            records = [r for k, recs in data["records"].items() if k.startswith(phrasing + "/") for r in recs]
            cell = rate(records, lambda r: r.get(field) == value)
            cells.append("–" if cell is None else f"{cell[0]:.2f} (n={cell[2]})")
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(data: dict) -> list[tuple[str, float | None, float, str]]:
    """The everyday-wording targets on the held-out families, both session families pooled."""
    records = [r for k, recs in data["records"].items() if k.startswith("unseen/") for r in recs]
    if not records:
        return []
    turns = data["config"]["turns"]
    early = [rate(records, lambda r, t=t: r["turn"] == t) for t in range(1, min(3, turns) + 1)]
    values = [min(c[0] for c in early) if early else None,
              rate(records, lambda r: r["turn"] == 6)[0] if turns >= 6 else None,
              (rate(records, lambda r: r.get("rule_kept") is not None, lambda r: r["rule_kept"]) or (None,))[0],
              (rate(records, referenced) or (None,))[0]]
    out = []
    for (what, threshold), value in zip(TARGETS, values):
        status = "not measured" if value is None else "met" if value >= threshold - 1e-9 else "missed"
        out.append((what, value, threshold, status))
    return out


def words(text: str) -> list[str]:
    """The lower-cased words and symbols of an instruction."""
    import re

    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def vocabulary_gap(train_sessions: int = 1500, test_sessions: int = 300, turns: int = 6) -> dict:
    """Per held-out phrasing family: the share of turns with a word that no training-family instruction uses, and
    the most frequent such words (training: `train_sessions` sessions per session family from the training seeds;
    held out: `test_sessions` from seed 0). A reasoner trained from scratch has never seen those words."""
    import collections

    from editr2.bench.shapes import generate_session

    known = set()
    for family in FAMILIES:
        for seed in range(10_000_000, 10_000_000 + train_sessions):
            for text in generate_session(family, turns, seed, phrasing="seen").instruction:
                known.update(words(text))
    turns_with_new, total, new_words = collections.Counter(), collections.Counter(), collections.Counter()
    for family in FAMILIES:
        for seed in range(test_sessions):
            session = generate_session(family, turns, seed, phrasing="unseen")
            for text, words_family in zip(session.instruction, session.phrasing_families):
                new = [w for w in words(text) if w not in known]
                total[words_family] += 1
                turns_with_new[words_family] += bool(new)
                new_words.update(new)
    return {"known_words": len(known), "known": sorted(known),
            "share": {f: turns_with_new[f] / total[f] for f in sorted(total)}, "turns": dict(total),
            "top": new_words.most_common(25)}


def has_new_word(text: str, known) -> bool:
    return any(w not in known for w in words(text))


def vocabulary_section(gap: dict, reports: list[dict] = ()) -> list[str]:
    shares = ", ".join(f"{family} {share:.0%} of {gap['turns'][family]} turns" for family, share in gap["share"].items())
    top = ", ".join(f"`{w}` ({n})" for w, n in gap["top"])
    lines = ["## Words the training families never use", "",
             f"The training families' instructions use {gap['known_words']} distinct words and symbols. Held-out turns "
             f"with at least one word outside them: {shares}. Most frequent such words: {top}. A reasoner trained from "
             "scratch on the training families has never seen them; several carry the operation (`gone`, `out`, "
             "`->`, `+`, `rollback`, `ctrl z`).", ""]
    known = set(gap["known"])
    rows = []
    for data in reports:
        for key, records in data["records"].items():
            if key.startswith("unseen/"):
                cells = [fmt(rate(records, lambda r, new=new: has_new_word(r["instruction"], known) == new))
                         for new in (False, True)]
                rows.append(f"| {name_of(data)} | {key.split('/')[1]} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["Exact match on the held-out turns without and with such a word:", "",
                  "| reasoner | family | only known words | a new word |", "|---|---|---|---|", *rows, ""]
    return lines


def markdown(reports: list[dict], gap: dict | None = None) -> str:
    lines = ["# Intent reconstruction: grammar and everyday wording", "",
             "Exact match of the written intent with the gold one, each turn written from the true state before it "
             "(gold images and earlier intents), greedy; [low, high]: 95% bootstrap over sessions. `rule kept`: "
             "turns whose gold intent keeps a session rule; `references`: everyday turns naming their target by a "
             "reference (\"it\", \"the one you just added\", \"the earliest one\", \"the other ...\", \"the shape "
             "from the first edit\"). Held-out session seeds; `unseen` = phrasing families no training path draws "
             "(`editr2.bench.shapes.language.UNSEEN_FAMILIES`).", ""]
    for data in reports:
        config = data["config"]
        lines.append(f"- `{name_of(data)}`: {config['sessions']} sessions x {config['turns']} turns per family, seeds "
                     f"{config['seed']}..{config['seed'] + config['sessions'] - 1}; `{data['command']}`")
    lines += ["", "## Exact match per turn", "", main_table(reports), "",
              "## Per operation", "", breakdown_table(reports, "operation", "operation"), "",
              "## Per phrasing family", "", breakdown_table(reports, "words", "words"), "",
              *(vocabulary_section(gap, reports) if gap else []),
              "## Everyday-wording targets (held-out families, both session families)", ""]
    for data in reports:
        targets = check_targets(data)
        if not targets:
            continue
        lines += [f"`{name_of(data)}`:", "", "| target | value | threshold | status |", "|---|---:|---:|---|"]
        for what, value, threshold, status in targets:
            shown = "–" if value is None else f"{value:.3f}"
            lines.append(f"| {what} | {shown} | >= {threshold:.2f} | **{status}** |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reasoner", default=None, help="a train_reasoner run folder or an exported pipeline folder")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint of the run (default: its finished model)")
    parser.add_argument("--sessions", type=int, default=200, help="sessions per family (default 200)")
    parser.add_argument("--turns", type=int, default=6, help="turns per session (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="first session seed (held out: training uses >= 1e7)")
    parser.add_argument("--phrasings", nargs="+", choices=PHRASINGS, default=list(PHRASINGS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="the records (resumable: finished parts are kept)")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="only write the tables of these evaluations")
    parser.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    parser.add_argument("--vocabulary", action="store_true",
                        help="add the words of the held-out families that no training family uses (no model needed)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        reports = [json.loads(Path(p).read_text()) for p in args.from_json]
    else:
        if args.reasoner is None:
            raise SystemExit("pass --reasoner (a run or a pipeline folder), or --from-json.")
        if args.sessions < 1 or not 1 <= args.turns <= 16:
            raise SystemExit(f"--sessions {args.sessions} --turns {args.turns}: pass >= 1 session of 1-16 turns.")
        if args.seed + args.sessions > 10_000_000:
            raise SystemExit(f"Seeds {args.seed}.. reach the training seeds (>= 10,000,000): pass a smaller --seed.")
        json_path = Path(args.json) if args.json else None
        data = json.loads(json_path.read_text()) if json_path and json_path.is_file() else {}
        reports = [run(args, data, json_path)]
    text = markdown(reports, vocabulary_gap() if args.vocabulary else None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

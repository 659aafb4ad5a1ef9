"""docs/results_carried.md from committed bench runs: the editor trained on its own carried state vs the shipped one.

    python -m recipes.shapes_tiny.carried_results --runs docs/carried --out docs/results_carried.md \
        --notes docs/results_carried_notes.md

`--runs` holds `editr2 bench shapes` output folders (their `results.json`, `session_results.jsonl`,
`bench_config.json`, and `command.txt`: the command that made it; `SETTINGS` below lists the flags), named
`ARM_SETTING` (e.g. `shipped_gold_cm6`: the shipped model, `--prompts gold`, family cm, 6 turns). For every setting
that both arms of a comparison hold, the page shows each arm's per-turn IF / CC / GA with bootstrap intervals and the
paired difference (`editr2 bench compare`: same sessions, paired bootstrap 95% intervals). Nothing is re-run: the page
is rewritten from the folders alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (arm A, arm B, what B is): B - A is reported.
COMPARISONS = (
    ("shipped", "carried", "the editor fine-tuned on its own carried state (configs/editor_carried.yaml) vs the "
                           "shipped editor; the same VAE, reasoner and call defaults"),
    ("control", "carried", "the carried fine-tune vs the same fine-tune without the carried pool (`--carried_schedule "
                           "'[]'`: clean sources only, same steps, batch, learning rate and seed)"),
    ("shipped", "control", "the fine-tune without the carried pool vs the shipped editor (what the small-batch CPU "
                           "fine-tune does by itself)"),
    ("control", "filter", "the carried fine-tune keeping only states the oracle parser reads as the true scene "
                          "(`--carried_filter true`) vs the same fine-tune without the pool"),
    ("carried", "filter", "the carried fine-tune with vs without the parser filter of its states"),
    ("shipped", "default", "the default with the retrained VAE decoder (configs/vae_decoder.yaml continued with "
                           "small_object_weight 15; encoder, latent space, reasoner and editor unchanged) vs the "
                           "default before it (`shipped`)"),
    ("none", "default", "the default model (its reasoner's intent) vs the trained `none` baseline: the default editor "
                        "fine-tuned 800 more steps on the raw instruction alone (configs/editor_carried_none.yaml "
                        "with --carried_schedule '[]', shipped as checkpoints/editr2-shapes-tiny-none-lora, run with "
                        "--reasoning none)"),
    ("history", "default", "the default model vs the trained `history` baseline: the default editor fine-tuned 800 "
                           "more steps on every instruction so far plus up to 2 earlier images "
                           "(configs/editor_carried_history.yaml with --carried_schedule '[]', "
                           "checkpoints/editr2-shapes-tiny-history-lora, --reasoning history)"),
    ("none_full", "none", "the shipped `none` LoRA (rank 64) vs the full fine-tune it was extracted from: what the "
                          "adapter loses"),
    ("default", "v3reasoner", "reasoner v3 (recipes/shapes_tiny/README.md, \"Reasoner v3\": trained on everyday "
                              "phrasing, the image at 64 x 64) writes each turn's intent and the default model's "
                              "editor, with its own encoder, draws it (`python -m recipes.shapes_tiny.reasoner_swap`) "
                              "vs the default model with its own reasoner"),
    ("default", "v3default", "the default with reasoner v3 (shipped at 2865141) as its separate reasoning model ("
                             "`reasoning_model/`, shown the image at 64 x 64; text encoder, editor and VAE unchanged; "
                             "recipes/shapes_tiny/README.md) vs the default before it (its text encoder wrote the "
                             "intents); each folder's command.txt says how it was made"),
    ("none", "v3default", "the default with reasoner v3 (its intents; at 2865141) vs the trained `none` baseline "
                          "(checkpoints/editr2-shapes-tiny-none-lora, --reasoning none; it never runs the reasoner)"),
    ("history", "v3default", "the default with reasoner v3 (its intents; at 2865141) vs the trained `history` baseline "
                             "(checkpoints/editr2-shapes-tiny-history-lora, --reasoning history)"),
    ("default", "keep", "the default model called with `keep_unedited=0.2` (`--pipeline-kwargs "
                        "'{\"keep_unedited\": 0.2}'`: the current latent is copied back wherever a turn changed it "
                        "by at most 0.2 RMS per latent pixel, outside the changed region grown by one latent pixel) "
                        "vs the same model without it; the drift measures per turn are in each folder's results.json"),
    ("v3default", "steps8", "the same model (the default with reasoner v3) called with 8 denoising steps per turn "
                            "instead of its 16 (`--steps 8`)"),
    ("v3default", "steps4", "the same model called with 4 denoising steps per turn instead of 16 (`--steps 4`)"),
    ("steps4", "steps2", "the same model called with 2 denoising steps per turn instead of 4: where fewer steps "
                         "stop paying"),
    ("v3default", "v4default", "the default as shipped now (reasoner v4, trained on sessions of up to 16 turns, as its "
                               "reasoning model; 4 denoising steps and keep_unedited 0.2 in its call defaults; text "
                               "encoder, editor and VAE unchanged) vs the default before it (reasoner v3, 16 steps)"),
    ("steps4", "v4default", "the default as shipped now vs the default before it called with the same 4 denoising "
                            "steps: what reasoner v4 and keep_unedited add"),
    ("steps4", "v4nokeep", "reasoner v4 vs reasoner v3 writing the intents, both at 4 denoising steps and without "
                           "keep_unedited (the same text encoder, editor and VAE): what the reasoner alone adds"),
    ("v4nokeep", "v4default", "keep_unedited 0.2 in the call defaults vs the same model and steps without it (the "
                              "current latent copied back where a turn changed it by at most 0.2 RMS per latent "
                              "pixel, outside the changed region grown by one latent pixel)"),
    ("default", "v4editor", "the editor alone from gold intents with the call defaults shipped now (4 denoising steps, "
                            "keep_unedited 0.2) vs the same editor with the previous ones (16 steps, no keep_unedited); "
                            "the editor, VAE and text encoder are the same files"),
    ("none4", "v4default", "the default as shipped now (reasoner v4's intents) vs the trained `none` baseline "
                           "(checkpoints/editr2-shapes-tiny-none-lora, --reasoning none) over the same folder, so with "
                           "the same call defaults (4 steps, keep_unedited 0.2)"),
    ("history4", "v4default", "the default as shipped now vs the trained `history` baseline "
                              "(checkpoints/editr2-shapes-tiny-history-lora, --reasoning history) over the same folder"),
    ("none_carried", "shipped", "the shipped model vs a `none` baseline fine-tuned with the carried pool "
                                "(configs/editor_carried_none.yaml as is): the recipe that hurt the intent editor "
                                "hurts this one too"),
)
# setting -> (title, bench shapes flags besides --model/--out)
SETTINGS = {
    "gold_cm6": ("the editor alone, cm, 100 x 6 turns", "--prompts gold --family cm --sessions 100 --turns 6"),
    "gold_cu6": ("the editor alone, cu, 100 x 6 turns", "--prompts gold --family cu --sessions 100 --turns 6"),
    "intent_cm3": ("the full model (reasoner + editor), cm, 200 x 3 turns",
                   "--reasoning intent --family cm --sessions 200 --turns 3"),
    "intent_cu3": ("the full model (reasoner + editor), cu, 200 x 3 turns",
                   "--reasoning intent --family cu --sessions 200 --turns 3"),
    "intent_cm6": ("the full model, cm, 100 x 6 turns", "--reasoning intent --family cm --sessions 100 --turns 6"),
    "intent_cu6": ("the full model, cu, 100 x 6 turns", "--reasoning intent --family cu --sessions 100 --turns 6"),
    "mode_cm3": ("each arm in its own mode, cm, 200 x 3 turns", "--family cm --sessions 200 --turns 3"),
    "mode_cu3": ("each arm in its own mode, cu, 200 x 3 turns", "--family cu --sessions 200 --turns 3"),
    "gold_cm16": ("the editor alone, cm, 50 x 16 turns", "--prompts gold --family cm --sessions 50 --turns 16"),
    "gold_cu16": ("the editor alone, cu, 50 x 16 turns", "--prompts gold --family cu --sessions 50 --turns 16"),
    "mode_cm16": ("each arm in its own mode, cm, 30 x 16 turns", "--family cm --sessions 30 --turns 16"),
    "mode_cu16": ("each arm in its own mode, cu, 30 x 16 turns", "--family cu --sessions 30 --turns 16"),
    "long_cm16": ("each arm in its own mode, cm, 100 x 16 turns", "--family cm --sessions 100 --turns 16"),
    "long_cu16": ("each arm in its own mode, cu, 100 x 16 turns", "--family cu --sessions 100 --turns 16"),
    "seen_cm3": ("the full model in the training families' everyday wording, cm, 200 x 3 turns",
                 "--reasoning intent --family cm --sessions 200 --turns 3 --phrasing seen"),
    "seen_cu3": ("the full model in the training families' everyday wording, cu, 200 x 3 turns",
                 "--reasoning intent --family cu --sessions 200 --turns 3 --phrasing seen"),
    "unseen_cm3": ("the full model in held-out everyday wording, cm, 200 x 3 turns",
                   "--reasoning intent --family cm --sessions 200 --turns 3 --phrasing unseen"),
    "unseen_cu3": ("the full model in held-out everyday wording, cu, 200 x 3 turns",
                   "--reasoning intent --family cu --sessions 200 --turns 3 --phrasing unseen"),
}
METRICS = ("IF", "CC", "GA")
# comparisons (arm B) whose page also shows the drift measures per turn (editr2.bench.drift), with the VAE's own floor
DRIFT_ARMS = ("keep",)
DRIFT_KEYS = ("bg_mean", "bg_worst", "color_shift", "position_shift")


def arm_table(results: dict) -> str:
    """Per turn IF / CC / GA with their intervals (`results.json` of a bench run)."""
    lines = ["| turn | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for row in results["per_turn"]:
        cells = [f"{row[m]:.3f} [{row[m + '_ci'][0]:.2f}, {row[m + '_ci'][1]:.2f}]" for m in METRICS]
        lines.append(f"| {row['turn']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drift_table(arms: dict[str, dict]) -> str:
    """Per turn, each arm's drift measures (`results.json` "drift"), then the VAE round trip of the carried source."""
    turns = [row["turn"] for row in next(iter(arms.values()))["drift"]["per_turn"]]
    vae = {row["turn"]: row for results in arms.values() for row in (results["drift"].get("vae") or {}).get(
        "per_turn", [])}  # measured for model editors only
    header = ["turn"] + [f"{arm} {key}" for arm in arms for key in DRIFT_KEYS] + ["VAE round trip bg_mean"] * bool(vae)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for k, turn in enumerate(turns):
        cells = []
        for results in arms.values():
            row = results["drift"]["per_turn"][k]
            cells += ["–" if row.get(key) is None else f"{row[key]:.4f}" for key in DRIFT_KEYS]
        if vae:
            cells.append(f"{vae[turn]['carried_bg_mean']:.4f}")
        lines.append(f"| {turn} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    config = results["config"]
    keys = ("editor", "model", "reasoning", "prompts", "sample_seed")
    return ", ".join(f"{k} `{config[k]}`" for k in keys if config.get(k) is not None)


def section(runs: Path, arm_a: str, arm_b: str, what: str, setting: str) -> str | None:
    """The markdown of one comparison in one setting, or None when a folder is missing."""
    from editr2.bench.compare_cli import compare_markdown, compare_runs

    a, b = runs / f"{arm_a}_{setting}", runs / f"{arm_b}_{setting}"
    if not ((a / "results.json").is_file() and (b / "results.json").is_file()):
        return None
    title, _ = SETTINGS[setting]
    parts = [f"## {arm_b} vs {arm_a}: {title}", "", what + ".", ""]
    for arm, folder in ((arm_a, a), (arm_b, b)):
        results = json.loads((folder / "results.json").read_text())
        parts += [f"**{arm}** ({describe(results)}):", "", arm_table(results), ""]
    table = compare_markdown(compare_runs(a, b)).split("\n", 1)[1].lstrip()  # without its own title
    parts += ["**Paired difference** (B = " + arm_b + ", A = " + arm_a + "):", "", table, ""]
    if arm_b in DRIFT_ARMS:
        arms = {arm: json.loads((folder / "results.json").read_text()) for arm, folder in ((arm_a, a), (arm_b, b))}
        parts += ["**Drift per turn** (`editr2.bench.drift`: background error, worst cell, colour and position shift "
                  "of untouched objects; the last column: the source through the VAE once, the floor):", "",
                  drift_table(arms), ""]
    return "\n".join(parts)


def page(runs: Path, notes: str = "") -> str:
    lines = ["# Editor fine-tunes: its own carried state, trained baselines", "",
             "Written by `python -m recipes.shapes_tiny.carried_results --runs docs/carried --out "
             "docs/results_carried.md --notes docs/results_carried_notes.md` from the committed bench folders in `docs/carried/` (each holds the command "
             "that made it in `command.txt`). Held-out session seeds (training uses seeds >= 10,000,000); intervals "
             "are 95% bootstrap over sessions; differences are paired (the same sessions in both arms).", ""]
    if notes:
        lines += [notes.strip(), ""]
    found = 0
    for arm_a, arm_b, what in COMPARISONS:
        for setting in SETTINGS:
            text = section(runs, arm_a, arm_b, what, setting)
            if text is not None:
                lines.append(text)
                found += 1
    if not found:
        raise ValueError(f"{runs}: no comparison has both of its folders (ARM_SETTING, e.g. shipped_gold_cm6 and "
                         "carried_gold_cm6); run the bench commands in recipes/shapes_tiny/carried_results.py first.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="docs/carried", help="folder of bench shapes output folders")
    parser.add_argument("--out", default="docs/results_carried.md")
    parser.add_argument("--notes", default=None, help="a markdown file whose text goes under the header")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not runs.is_dir():
        raise SystemExit(f"--runs {runs}: no such folder.")
    notes = Path(args.notes).read_text() if args.notes else ""
    try:
        text = page(runs, notes)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The results of a saved model on MICE-Shapes, for docs/results.md: every reasoning mode next to the symbolic editors.

    python -m recipes.shapes_tiny.results --model checkpoints/editr2-shapes-tiny --out docs/results.md

Runs the results grid on held-out session seeds (training uses seeds >= 10,000,000): per family (cm, cu),
`--sessions` x `--turns` and `--long-sessions` x `--long-turns` sessions, each scored by `run_bench` for the symbolic
`literal` and `oracle` editors and for the model in every `--modes` reasoning mode (`load_bench_editor`, the folder's
call defaults). `--phrasings seen unseen` adds the same sessions typed in everyday words (the training phrasing
families, and the families held out from every training path: `editr2.bench.shapes.language`) for the model's modes,
reported in their own tables and side by side with the grammar in "Everyday wording". Every finished cell (family,
turns, editor) is saved at once to `--json`; running the same command again skips the cells it holds, so an
interrupted run continues. Then it writes the markdown (`--out`): a header (model, call defaults, command, dates,
wall time per cell), one table per (family, turns), the turn-3 targets checked against the numbers, and a per-turn
plot next to it (`<out stem>_per_turn.png`). `--from-json` rewrites both from the JSON alone, without the model.
`--merge J1 J2 ...` first adds the cells of other runs of the same model and seeds (e.g. parts of the grid run as
parallel processes, each with its own `--json`) to `--json`, and the page lists every command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SYMBOLIC = ("literal", "oracle")
MODES = ("none", "history", "intent")
FAMILIES = ("cm", "cu")
PHRASINGS = ("grammar", "seen", "unseen")
TABLE_METRICS = ("IF", "CC", "GA")
TARGET_TURN = 3
TOLERANCE = 1e-9  # a value this close under its threshold counts as met (0.70 - 0.55 is 0.1499999...)

# (turn, metric, threshold): intent mode, every family.
ABSOLUTE_TARGETS = ((3, "IF", 0.85), (3, "CC", 0.92), (3, "GA", 0.70), (6, "IF", 0.75), (6, "GA", 0.40))
# (family, metric, threshold): intent minus each other reasoning mode at turn 3.
GAP_TARGETS = (("cm", "GA", 0.15), ("cu", "IF", 0.15))
EDITOR_ORDER = (*SYMBOLIC, *(f"editr2-{mode}" for mode in MODES))


# ---------------------------------------------------------------------------------------------------------------------
# The grid and its JSON
# ---------------------------------------------------------------------------------------------------------------------


def cell_key(family: str, turns: int, editor: str, phrasing: str = "grammar") -> str:
    """The JSON key of one cell, e.g. "cm/3/editr2-intent" (the grammar) or "cm/3/editr2-intent/unseen"."""
    return f"{family}/{turns}/{editor}" + ("" if phrasing == "grammar" else f"/{phrasing}")


def cell_phrasing(cell: dict) -> str:
    """The wording of a stored cell's sessions (cells of the fixed grammar do not record it)."""
    return cell["config"].get("phrasing", "grammar")


def plan_cells(families, modes, sessions: int, turns: int, long_sessions: int, long_turns: int,
               phrasings=("grammar",)) -> list[dict]:
    """Every cell to run, in order: per (sessions, turns) grid, per family, the symbolic editors then the modes in
    the grammar, then the modes in each everyday phrasing (the symbolic editors read only the grammar)."""
    grids = [(sessions, turns)] + ([(long_sessions, long_turns)] if long_sessions > 0 else [])
    if len(grids) == 2 and turns == long_turns:
        raise ValueError(f"--turns and --long-turns are both {turns}: pass different lengths (or --long-sessions 0).")
    for n, t in grids:
        if n < 1 or t < 1:
            raise ValueError(f"{n} sessions x {t} turns: pass at least 1 session of at least 1 turn.")
    unknown = [p for p in phrasings if p not in PHRASINGS]
    if unknown:
        raise ValueError(f"phrasings {unknown}: pass some of {PHRASINGS}.")
    cells = []
    for n, t in grids:
        for family in families:
            if "grammar" in phrasings:
                for name in SYMBOLIC:
                    cells.append({"family": family, "sessions": n, "turns": t, "editor": name, "mode": None,
                                  "phrasing": "grammar"})
            for phrasing in (p for p in PHRASINGS if p in phrasings):
                for mode in modes:
                    cells.append({"family": family, "sessions": n, "turns": t, "editor": f"editr2-{mode}",
                                  "mode": mode, "phrasing": phrasing})
    return cells


def model_fingerprint(path) -> str:
    """sha256 of every file of a model folder but its model card (names and bytes), to tell re-exported models apart."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def is_done(stored: dict | None, cell: dict, seed: int, sample_seed: int) -> bool:
    """Whether a stored cell was run with the settings `cell` asks for (else it is run again and replaced)."""
    if stored is None:
        return False
    config = stored.get("config", {})
    wanted = {"family": cell["family"], "sessions": cell["sessions"], "turns": cell["turns"], "seed": seed}
    same_sampling = cell["mode"] is None or stored.get("sample_seed") == sample_seed
    same_words = config.get("phrasing", "grammar") == cell.get("phrasing", "grammar")
    return same_sampling and same_words and all(config.get(k) == v for k, v in wanted.items())


def load_json(path: Path) -> dict:
    if not path.is_file():
        return {"cells": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise ValueError(f"{path} is not a results file of this script (no 'cells' object): pass another --json.")
    return data


def save_json(data: dict, path: Path) -> None:
    """Write through a temporary file, so an interruption never leaves a half-written JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def cell_folder(sessions_dir: Path, key: str) -> Path:
    """Where a cell keeps its per-session scores: `<sessions_dir>/cm_3_editr2-intent[_unseen]`."""
    return Path(sessions_dir) / key.replace("/", "_")


def run_cell(cell: dict, editor, seed: int, progress: bool, folder: Path | None = None,
             identity: dict | None = None, describe: dict | None = None) -> dict:
    """`run_bench` of one cell, with its wall time, date and (for the model) the share of reasoning fallbacks.

    With `folder`, every finished session's scores go to its `session_results.jsonl` at once (an interrupted cell
    resumes there; `identity`, e.g. the model's fingerprint, is recorded in its `bench_config.json` and must match),
    and the cell's results to its `results.json` (its config with `describe` added, e.g. the model and its call
    arguments): an `editr2 bench shapes` output folder, which `editr2 bench compare` pairs session by session with
    another run on the same sessions."""
    from editr2.bench.resume import open_run, write_text_atomic
    from editr2.bench.shapes import runner
    from editr2.bench.shapes_cli import SESSION_RESULTS

    results_path = None
    if folder is not None:
        config = {"family": cell["family"], "sessions": cell["sessions"], "turns": cell["turns"], "seed": seed,
                  "editor": cell["editor"], "phrasing": cell.get("phrasing", "grammar"), **(identity or {})}
        results_path = open_run(folder, config, outputs=(SESSION_RESULTS, "results.json")) / SESSION_RESULTS
    tick = time.perf_counter()
    result = runner.run_bench(editor, cell["family"], cell["sessions"], cell["turns"], seed, progress=progress,
                              editor_name=cell["editor"], phrasing=cell.get("phrasing", "grammar"),
                              results_path=results_path)
    result["seconds"] = round(time.perf_counter() - tick, 2)
    result["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    records = getattr(editor, "records", None)
    if records:
        fallbacks = [reason for record in records for reason in record["fallback"]]
        result["fallback_rate"] = sum(reason is not None for reason in fallbacks) / max(len(fallbacks), 1)
    if folder is not None:  # as `editr2 bench shapes` records a model run: which model, mode and call arguments
        config = {**result["config"], **(describe or {})}
        write_text_atomic(folder / "results.json", json.dumps({**result, "config": config}, indent=2) + "\n")
    return result


def run_grid(args, data: dict, json_path: Path) -> dict:
    """Run every cell of the grid that `data` lacks, saving `data` to `json_path` after each one."""
    from diffusers_editr2.bench import PipelineEditor, load_bench_editor
    from diffusers_editr2.call_defaults import read_call_defaults
    from editr2.bench.editors import make_editor

    model = Path(args.model)
    if not model.is_dir():
        raise ValueError(f"--model {model} is not a folder: pass a folder saved with EditR2Pipeline.save_pretrained.")
    fingerprint = model_fingerprint(model)
    if data.get("model_sha256") not in (None, fingerprint):
        raise ValueError(f"{json_path} holds the results of another model ({data.get('model')}, sha256 "
                         f"{data['model_sha256'][:12]}): pass another --json, or delete it to start over.")
    data.update(model=str(model), model_sha256=fingerprint,
                call_kwargs=read_call_defaults(model) or {"reference_area": None},
                sample_seed=args.sample_seed, seed=args.seed,
                command="python -m recipes.shapes_tiny.results " + shlex.join(args.argv))
    if "commands" in data and data["command"] not in data["commands"]:  # a merged file run further
        data["commands"].append(data["command"])
    cells = plan_cells(args.families, args.modes, args.sessions, args.turns, args.long_sessions, args.long_turns,
                       args.phrasings)
    pipe = None  # loaded at the first model cell that still has to run
    for cell in cells:
        key = cell_key(cell["family"], cell["turns"], cell["editor"], cell["phrasing"])
        if is_done(data["cells"].get(key), cell, args.seed, args.sample_seed):
            print(f"{key}: done, skipped")
            continue
        if cell["mode"] is None:
            editor = make_editor(cell["editor"])
        elif pipe is None:
            editor = load_bench_editor(model, cell["mode"], args.sample_seed)
            pipe = editor.pipe
        else:
            editor = PipelineEditor(pipe, cell["mode"], args.sample_seed, data["call_kwargs"])
        folder = cell_folder(args.sessions_dir, key) if args.sessions_dir else None
        identity = {"model_sha256": fingerprint, "sample_seed": args.sample_seed} if cell["mode"] else {}
        describe = {"model": str(model), "reasoning": cell["mode"], "sample_seed": args.sample_seed,
                    "call_kwargs": data["call_kwargs"]} if cell["mode"] else {}
        result = run_cell(cell, editor, args.seed, progress=not args.no_progress, folder=folder, identity=identity,
                          describe=describe)
        if cell["mode"] is not None:
            result["sample_seed"] = args.sample_seed
        data["cells"][key] = result
        save_json(data, json_path)
        mean = result["mean"]
        print(f"{key}: IF {mean['IF']:.3f} CC {mean['CC']:.3f} GA {mean['GA']:.3f} reward {mean['reward']:.3f} "
              f"({result['seconds']:.0f} s)")
    save_json(data, json_path)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------------


def turn_value(cells: dict, family: str, turns: int, editor: str, metric: str, turn: int = TARGET_TURN):
    """`metric` at `turn` of a cell, or None where the cell or the turn is missing."""
    cell = cells.get(cell_key(family, turns, editor))
    if cell is None:
        return None
    rows = [row for row in cell["per_turn"] if row["turn"] == turn]
    return rows[0][metric] if rows else None


def target_turns(cells: dict, family: str, turn: int = TARGET_TURN) -> int | None:
    """The session length a target at `turn` of `family` is read from: the shortest one in `cells` with that turn."""
    lengths = sorted({cell["config"]["turns"] for cell in cells.values()
                      if cell["config"]["family"] == family and cell["config"]["turns"] >= turn})
    return lengths[0] if lengths else None


def check_targets(cells: dict, families=FAMILIES) -> list[dict]:
    """The targets against the results: intent reaches IF >= 0.85, CC >= 0.92, GA >= 0.70 at turn 3 and IF >= 0.75,
    GA >= 0.40 at turn 6 (every family), and beats none and history at turn 3 by >= 0.15 GA on cm and >= 0.15 IF on
    cu. Each is read from the shortest sessions that have its turn.

    Args:
        cells (`dict`): the JSON's "cells" (`cell_key` -> `run_bench` result).
        families: the families to check the absolute targets on.

    Returns:
        One dict per target: `name`, `family`, `turns` (the session length read, None if no cell has turn 3),
        `turn`, `value` (None where not measured), `threshold`, `oracle` (the oracle's value, for the absolute targets) and
        `status`: "met", "missed" or "not measured".
    """
    targets = []
    for family in families:
        for turn, metric, threshold in ABSOLUTE_TARGETS:
            turns = target_turns(cells, family, turn)
            value = turn_value(cells, family, turns, "editr2-intent", metric, turn) if turns else None
            oracle = turn_value(cells, family, turns, "oracle", metric, turn) if turns else None
            targets.append({"name": f"{family} {metric} of intent, turn {turn}", "family": family, "turn": turn,
                            "turns": turns, "value": value, "threshold": threshold, "oracle": oracle})
    for family, metric, threshold in GAP_TARGETS:
        turns = target_turns(cells, family)
        intent = turn_value(cells, family, turns, "editr2-intent", metric) if turns else None
        for other in ("none", "history"):
            base = turn_value(cells, family, turns, f"editr2-{other}", metric) if turns else None
            value = None if intent is None or base is None else intent - base
            targets.append({"name": f"{family} {metric} of intent - {other}, turn {TARGET_TURN}", "family": family,
                            "turn": TARGET_TURN, "turns": turns, "value": value, "threshold": threshold, "oracle": None})
    for target in targets:
        value = target["value"]
        target["status"] = ("not measured" if value is None
                            else "met" if value >= target["threshold"] - TOLERANCE else "missed")
    return targets


# ---------------------------------------------------------------------------------------------------------------------
# Markdown and plot
# ---------------------------------------------------------------------------------------------------------------------


def editor_rank(name: str) -> tuple:
    return (EDITOR_ORDER.index(name) if name in EDITOR_ORDER else len(EDITOR_ORDER), name)


def grids(cells: dict, phrasing: str | None = "grammar") -> dict[tuple[str, int], dict[str, dict]]:
    """The cells of one `phrasing` (None: every phrasing, keyed `(family, turns, phrasing)`) grouped per
    (family, turns), families in FAMILIES order, editors in EDITOR_ORDER."""
    groups: dict[tuple, dict[str, dict]] = {}
    for cell in cells.values():
        config, words = cell["config"], cell_phrasing(cell)
        if phrasing is None:
            groups.setdefault((config["family"], config["turns"], words), {})[config["editor"]] = cell
        elif words == phrasing:
            groups.setdefault((config["family"], config["turns"]), {})[config["editor"]] = cell
    family_rank = {f: i for i, f in enumerate(FAMILIES)}
    ordered = sorted(groups, key=lambda g: (g[1], family_rank.get(g[0], len(FAMILIES)), g[0],
                                            *((PHRASINGS.index(g[2]),) if len(g) == 3 else ())))
    return {g: dict(sorted(groups[g].items(), key=lambda item: editor_rank(item[0]))) for g in ordered}


def everyday_section(cells: dict) -> list[str]:
    """Per (family, turns) that has everyday-phrasing cells: each model mode in every phrasing, side by side."""
    groups = grids(cells, None)
    lines = []
    for family, turns in dict.fromkeys((f, t) for f, t, p in groups if p != "grammar"):
        rows = {f"{name}, {p}": cell for (f, t, p), editors in groups.items() if (f, t) == (family, turns)
                for name, cell in editors.items() if name not in SYMBOLIC}
        rows = dict(sorted(rows.items(), key=lambda item: (editor_rank(item[0].split(", ")[0]),
                                                          PHRASINGS.index(item[0].split(", ")[1]))))
        config = next(iter(rows.values()))["config"]
        lines += [f"### {family}, {config['sessions']} sessions x {turns} turns", "", results_table(rows, turns), ""]
    if lines:
        lines = ["## Everyday wording", "",
                 "The same sessions (scenes, operations, rules) typed in the fixed grammar, in the phrasing families "
                 "the reasoner was trained on (`seen`) and in families held out from every training path (`unseen`, "
                 "`editr2.bench.shapes.language`).", "", *lines]
    return lines


def results_table(editors: dict[str, dict], turns: int) -> str:
    """Rows = editors; columns = IF / CC / GA of every turn, then the mean reward over all turns."""
    header = ["editor"] + [f"t{t} {m}" for t in range(1, turns + 1) for m in TABLE_METRICS] + ["mean reward"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, cell in editors.items():
        rows = {row["turn"]: row for row in cell["per_turn"]}
        values = [f"{rows[t][m]:.3f}" if t in rows else "–" for t in range(1, turns + 1) for m in TABLE_METRICS]
        lines.append(f"| {name} | " + " | ".join(values) + f" | {cell['mean']['reward']:.3f} |")
    return "\n".join(lines)


def wall_time_table(groups: dict) -> str:
    """Seconds per cell; `groups` keyed `(family, turns)` or `(family, turns, phrasing)`."""
    columns = list(groups)
    editors = sorted({name for cells in groups.values() for name in cells}, key=editor_rank)
    head = [f"{g[0]} {next(iter(groups[g].values()))['config']['sessions']}x{g[1]}"
            + (f" {g[2]}" if len(g) == 3 and g[2] != "grammar" else "") for g in columns]
    lines = ["| editor | " + " | ".join(head) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name in editors:
        times = [f"{groups[g][name]['seconds']:.0f}" if name in groups[g] else "–" for g in columns]
        lines.append(f"| {name} | " + " | ".join(times) + " |")
    return "\n".join(lines)


def targets_section(targets: list[dict]) -> str:
    lines = ["Intent mode, each target read from the shortest sessions that have its turn; "
             "a gap is intent's value minus the other mode's. `oracle`: what the oracle editor reaches on the same "
             "sessions (the bench's own ceiling).", "",
             "| target | sessions | value | threshold | oracle | status |", "|---|---|---:|---:|---:|---|"]
    for t in targets:
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        oracle = "–" if t["oracle"] is None else f"{t['oracle']:.3f}"
        turns = "–" if t["turns"] is None else f"{t['turns']} turns"
        status = {"met": "**met**", "missed": "**missed**"}.get(t["status"], t["status"])
        lines.append(f"| {t['name']} | {turns} | {value} | >= {t['threshold']:.2f} | {oracle} | {status} |")
    met = sum(t["status"] == "met" for t in targets)
    measured = sum(t["status"] != "not measured" for t in targets)
    lines += ["", f"**{met} of {len(targets)} targets met** ({measured} measured)."]
    return "\n".join(lines)


def markdown(data: dict, plot_name: str) -> str:
    """The whole results page, from the JSON alone (so `--from-json` writes the same text)."""
    cells = data["cells"]
    groups = grids(cells)
    dates = sorted(cell["date"] for cell in cells.values() if "date" in cell)
    model = data.get("model", "?")
    sample_seeds = ", ".join(str(v) for v in sorted({c["sample_seed"] for c in cells.values() if "sample_seed" in c}))
    lines = [f"# MICE-Shapes results: `{Path(model).name}`", "",
             f"- Model: `{model}` (sha256 of its files `{str(data.get('model_sha256', '?'))[:12]}`), "
             f"call defaults `{json.dumps(data.get('call_kwargs', {}))}`, sampling seed {sample_seeds} "
             "(turn k of a session: seed + k); every turn continues from the previous turn's carried latent.",
             "- Sessions: held-out seeds (training uses seeds >= 10,000,000), the same sessions for every editor "
             "of a table.",
             "- Command: " + "; ".join(f"`{c}`" for c in data.get("commands") or [data.get("command", "?")]),
             f"- Run: {dates[0] if dates else '?'} to {dates[-1] if dates else '?'}; raw results in the `--json` file "
             "(this page is rewritten from it with `--from-json`).",
             "- IF: instruction following, CC: content consistency, GA: global awareness (cumulative), reward = "
             "0.3 IF + 0.3 CC + 0.4 GA (docs/metrics.md). `literal` applies each instruction's words alone; `oracle` "
             "paints the ground truth; `editr2-MODE` is the model with reasoning MODE.", "",
             "Wall time per cell (seconds):", "", wall_time_table(grids(cells, None)), ""]
    for (family, turns), editors in groups.items():
        config = next(iter(editors.values()))["config"]
        seeds = f"seeds {config['seed']}..{config['seed'] + config['sessions'] - 1}"
        lines += [f"## {family}, {config['sessions']} sessions x {turns} turns ({seeds})", "",
                  results_table(editors, turns), ""]
        rates = [f"{name} {cell['fallback_rate']:.0%}" for name, cell in editors.items()
                 if cell.get("fallback_rate")]
        if rates:
            lines += ["Turns whose reasoning answer was not used (fallback to the instruction): "
                      + ", ".join(rates) + ".", ""]
    lines += everyday_section(cells)
    lines += [f"![Per-turn IF / CC / GA / reward per editor and family]({plot_name})", "",
              "## Targets", "", targets_section(check_targets(cells)), ""]
    if data.get("notes"):
        lines += [data["notes"].strip(), ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """One row per family, one panel per metric; a line per editor (solid: short sessions, dashed: long ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from editr2.bench.report import METRIC_KEYS

    groups = grids(data["cells"])
    families = list(dict.fromkeys(family for family, _ in groups))
    lengths = sorted({turns for _, turns in groups})
    editors = sorted({name for cells in groups.values() for name in cells}, key=editor_rank)
    colors = {name: f"C{i}" for i, name in enumerate(editors)}
    fig, axes = plt.subplots(len(families), len(METRIC_KEYS), figsize=(3.2 * len(METRIC_KEYS), 2.8 * len(families)),
                             dpi=110, squeeze=False)
    for (family, turns), cells in groups.items():
        style = "-" if turns == lengths[0] else "--"
        for col, metric in enumerate(METRIC_KEYS):
            ax = axes[families.index(family), col]
            for name, cell in cells.items():
                rows = cell["per_turn"]
                ax.plot([r["turn"] for r in rows], [r[metric] for r in rows], style, marker="o", markersize=3,
                        color=colors[name])
            ax.set_title(f"{family}: {metric}", fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("turn", fontsize=8)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[name], marker="o", markersize=3, label=name) for name in editors]
    handles += [Line2D([], [], color="gray", linestyle="-" if turns == lengths[0] else "--", label=f"{turns} turns")
                for turns in lengths]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_outputs(data: dict, out: Path) -> tuple[Path, Path]:
    """Write the markdown `out` and its plot `<out stem>_per_turn.png` next to it; returns both paths."""
    if not data["cells"]:
        raise ValueError("The results hold no cells: run the grid first (without --from-json).")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(f"{out.stem}_per_turn.png")
    out.write_text(markdown(data, png.name))
    plot(data, png)
    return out, png


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/editr2-shapes-tiny", help="an EditR2Pipeline folder")
    parser.add_argument("--out", default="docs/results.md", help="the markdown to write (the PNG goes next to it)")
    parser.add_argument("--json", default="runs/results/results.json", help="raw results; finished cells are skipped")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and plot from --json")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="add the cells of these results files (same model and seeds) to --json, then write the "
                             "page from it (as --from-json)")
    parser.add_argument("--sessions-dir", default=None, metavar="DIR",
                        help="keep each cell's per-session scores in DIR/<cell>/ (an `editr2 bench shapes` folder: "
                             "a cell resumes per session, and `editr2 bench compare` pairs it with other runs)")
    parser.add_argument("--sessions", type=int, default=200, help="sessions per family of the short grid")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--long-sessions", type=int, default=100, help="sessions per family of the long grid (0: none)")
    parser.add_argument("--long-turns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="first session seed (held out: training uses >= 1e7)")
    parser.add_argument("--sample-seed", type=int, default=0, help="turn k of a session is sampled with this + k")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--phrasings", nargs="+", choices=PHRASINGS, default=["grammar"],
                        help="the sessions' wording: the fixed grammar, and everyday phrasing in the training (seen) "
                             "or held-out (unseen) families, for the model's modes (default: grammar)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--notes", default=None, metavar="MD",
                        help="a markdown file appended after the targets (e.g. what limits the model); kept in --json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seed + max(args.sessions, args.long_sessions) > 10_000_000:
        raise ValueError(f"Seeds {args.seed}.. reach the training seeds (>= 10,000,000): pass a smaller --seed.")
    return args


def merge_json(data: dict, paths, json_path: Path) -> dict:
    """`data` with the cells of the results files `paths` added: runs of the same model (fingerprint), session seed
    and sampling seed, holding other cells (a cell in two files with other scores is refused; with the same scores,
    e.g. a symbolic editor both runs scored, it is kept once). Their commands are kept, in order."""
    runs = [(Path(p), load_json(Path(p))) for p in paths]
    if not data.get("cells"):
        (_, data), runs = runs[0], runs[1:]
        data = {**data, "cells": dict(data["cells"]), "commands": [data.get("command", "?")]}
    commands = list(data.get("commands") or [data.get("command", "?")])
    for path, other in runs:
        for key in ("model_sha256", "seed", "sample_seed"):
            if other.get(key) != data.get(key):
                raise ValueError(f"--merge {path}: its {key} is {other.get(key)!r}, {json_path}'s is "
                                 f"{data.get(key)!r}; merge only runs of the same model and seeds.")
        twice = sorted(key for key in set(other["cells"]) & set(data["cells"])
                       if other["cells"][key]["per_turn"] != data["cells"][key]["per_turn"])
        if twice:  # the same cell twice with the same scores (e.g. the symbolic editors of two runs) is kept once
            raise ValueError(f"--merge {path}: cells {twice} are in {json_path} too, with other scores; merge runs of "
                             "different cells.")
        data["cells"].update({k: v for k, v in other["cells"].items() if k not in data["cells"]})
        commands.append(other.get("command", "?"))
    data["commands"] = commands
    return data


def main(argv=None) -> int:
    args = parse_args(argv)
    json_path, out = Path(args.json), Path(args.out)
    data = load_json(json_path)
    if args.merge:
        data = merge_json(data, args.merge, json_path)
        save_json(data, json_path)
        args.from_json = True
    if args.from_json:
        if not json_path.is_file():
            raise ValueError(f"--from-json: {json_path} does not exist; pass the --json of an earlier run.")
    else:
        import torch

        torch.set_num_threads(args.threads)
        data = run_grid(args, data, json_path)
    if args.notes is not None:
        data["notes"] = Path(args.notes).read_text()
        save_json(data, json_path)
    md, png = write_outputs(data, out)
    print(f"wrote {md} and {png} (raw results: {json_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Long sessions (up to 16 turns) of a saved model on MICE-Shapes: IF / CC / GA and the drift measures per turn.

    python -m recipes.shapes_tiny.long_sessions --turns 16 --sessions 4                  # runs/long_sessions/
    python -m recipes.shapes_tiny.long_sessions --sessions 100 --section-into docs/results.md docs/results_notes.md

Per family (cm, cu) and reasoning mode, `--sessions` held-out sessions (seeds `--seed`..; training uses seeds
>= 10,000,000) of `--turns` turns are scored by `run_bench` with the model's call defaults; the drift measures
(`editr2.bench.drift`) come with them, and the VAE-only drift of carrying the latent vs re-encoding each turn
(`diffusers_editr2.drift.vae_drift`) is measured once per family on the same sessions. Each finished session is kept
in `--work` (JSON lines, resumable); every finished cell goes to `--json` at once. Then the markdown section is
written between the `<!-- long-sessions -->` markers of each `--section-into` file (none by default; pass
docs/results.md and docs/results_notes.md, so `recipes.shapes_tiny.results --notes docs/results_notes.md` keeps it,
with a `--json` and `--plot` under docs/ to commit), linking the raw results and the plot relative to each file, and
the drift curves to `--plot`. `--from-json` rewrites the section and the plot from `--json` alone, without the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

FAMILIES = ("cm", "cu")
MODES = ("intent", "none", "history")
BEGIN, END = "<!-- long-sessions:begin -->", "<!-- long-sessions:end -->"
SCORE_TURNS = (1, 4, 8, 12, 16)
# Turn 12: IF >= 0.70 and CC >= 0.85; no turn's CC under 0.80; background drift under the VAE's round-trip error.
TARGET_TURN, TARGET_IF, TARGET_CC, CC_FLOOR = 12, 0.70, 0.85, 0.80


def cell_key(family: str, mode: str) -> str:
    return f"{family}/editr2-{mode}"


def run_cells(args, data: dict, json_path: Path) -> dict:
    """Run every missing (family, mode) cell and the VAE drift per family; save `data` after each."""
    import torch

    from diffusers_editr2.bench import load_bench_editor
    from diffusers_editr2.drift import vae_drift
    from editr2.bench.shapes import generate_session
    from editr2.bench.shapes.runner import run_bench

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data.update(model=args.model, turns=args.turns, sessions=args.sessions, seed=args.seed,
                command="python -m recipes.shapes_tiny.long_sessions " + shlex.join(args.argv))
    data.setdefault("cells", {})
    data.setdefault("vae", {})
    sessions = {family: [generate_session(family, args.turns, args.seed + i) for i in range(args.sessions)]
                for family in args.families}
    for mode in args.modes:  # every family of a mode before the next mode: an early stop still compares families
        for family in args.families:
            key = cell_key(family, mode)
            if key in data["cells"] and data["cells"][key]["config"]["sessions"] == args.sessions:
                continue
            editor = load_bench_editor(args.model, mode, seed=args.sample_seed)
            start, cpu = time.time(), time.process_time()
            results = run_bench(editor, family=family, sessions=sessions[family], num_turns=args.turns,
                                seed=args.seed, progress=not args.no_progress, editor_name=editor.name,
                                results_path=work / f"{family}_{mode}_{args.turns}x{args.seed}.jsonl")
            results["config"].update(call_kwargs=editor.call_kwargs, sample_seed=args.sample_seed)
            results["wall_s"] = round(time.time() - start, 1)
            results["cpu_s"] = round(time.process_time() - cpu, 1)
            results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            data["cells"][key] = results
            save_json(data, json_path)
    for family in args.families:
        if data["vae"].get(family, {}).get("sessions") != args.sessions:
            editor = load_bench_editor(args.model, "none")
            data["vae"][family] = vae_drift(editor.pipe, sessions[family])
            save_json(data, json_path)
    return data


def save_json(data: dict, path: Path) -> None:
    """Write through a temporary file (`editr2.bench.resume.write_text_atomic`): a kill never leaves half a file."""
    from editr2.bench.resume import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(ci, digits: int = 2, turns: int = 16) -> str:
    low, high = ci
    return f"[{_f(low, digits)}, {'> ' + str(turns) if high is None else _f(high, digits)}]"


def _row(results: dict, turn: int) -> dict:
    return next((r for r in results["per_turn"] if r["turn"] == turn), {})


def _drift_row(results: dict, turn: int) -> dict:
    return next((r for r in results["drift"]["per_turn"] if r["turn"] == turn), {})


def family_tables(data: dict, family: str) -> list[str]:
    turns = data["turns"]
    cells = {k.split("/", 1)[1]: v for k, v in data["cells"].items() if k.startswith(family + "/")}
    shown = [t for t in SCORE_TURNS if t <= turns]
    head = ["editor"] + [f"t{t} {m}" for t in shown for m in ("IF", "CC", "GA")]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, res in cells.items():
        lines.append("| " + " | ".join([name] + [_f(_row(res, t).get(m)) for t in shown for m in ("IF", "CC", "GA")])
                     + " |")
    vae = data.get("vae", {}).get(family)
    head = ["editor", "bg mean t1", "t8", f"t{turns}", f"bg worst t{turns}", f"colour shift t{turns}",
            f"position shift t{turns} (px)", f"size change t{turns}", f"missing t{turns}"]
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, res in cells.items():
        last = _drift_row(res, turns)
        lines.append("| " + " | ".join(
            [name, _f(_drift_row(res, 1).get("bg_mean"), 4), _f(_drift_row(res, 8).get("bg_mean"), 4),
             _f(last.get("bg_mean"), 4), _f(last.get("bg_worst"), 4), _f(last.get("color_shift"), 3),
             _f(last.get("position_shift"), 2), _f(last.get("size_change"), 3),
             f"{last.get('missing', 0)}/{last.get('objects', 0)}"]) + " |")
    if vae:
        for label, key in (("VAE only, carried latent", "carried"), ("VAE only, re-encoded each turn", "reencoded")):
            row = {r["turn"]: r for r in vae["per_turn"]}
            lines.append("| " + " | ".join(
                [label, _f(row[1][f"{key}_bg_mean"], 4), _f(row.get(8, {}).get(f"{key}_bg_mean"), 4),
                 _f(row[turns][f"{key}_bg_mean"], 4), _f(row[turns][f"{key}_bg_worst"], 4), "", "", "", ""]) + " |")
    head = ["editor", "IF half-life", "95% CI", "CC slope / turn", "95% CI", "GA half-life", "95% CI",
            "bg mean slope / turn", "95% CI"]
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, res in cells.items():
        s = res["drift"]["summary"]
        half = lambda m: "> " + str(turns) if s[m]["half_life"] is None else _f(s[m]["half_life"])  # noqa: E731
        lines.append("| " + " | ".join(
            [name, half("IF"), _ci(s["IF"]["half_life_ci"], 2, turns), _f(s["CC"]["slope"], 4),
             _ci(s["CC"]["slope_ci"], 4), half("GA"), _ci(s["GA"]["half_life_ci"], 2, turns),
             _f(s["bg_mean"]["slope"], 5), _ci(s["bg_mean"]["slope_ci"], 5)]) + " |")
    return lines


def targets(data: dict, family: str) -> list[str]:
    """The long-session targets, read for intent mode; a note on how far the sample is from deciding them."""
    res = data["cells"].get(cell_key(family, "intent"))
    if res is None or data["turns"] < TARGET_TURN:
        return []
    row = _row(res, TARGET_TURN)
    cc_min = min(r["CC"] for r in res["per_turn"])
    vae = data.get("vae", {}).get(family)
    worse = None
    if vae:
        carried = {r["turn"]: r["carried_bg_mean"] for r in vae["per_turn"]}
        worse = sum(r["bg_mean"] is not None and r["bg_mean"] > carried[r["turn"]] for r in res["drift"]["per_turn"])

    def status(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out = [f"- {family}, intent: turn {TARGET_TURN} IF {row['IF']:.2f} "
           f"(>= {TARGET_IF}: {status(row['IF'] >= TARGET_IF)}), CC {row['CC']:.2f} "
           f"(>= {TARGET_CC}: {status(row['CC'] >= TARGET_CC)}); lowest CC of any turn "
           f"{cc_min:.2f} (>= {CC_FLOOR}: {status(cc_min >= CC_FLOOR)})"]
    if worse is not None:
        out[-1] += (f"; background drift above the VAE's own round-trip error on {worse} of {data['turns']} turns "
                    f"({status(worse == 0)})")
    return [out[-1] + "."]


def section(data: dict, plot_name: str | None, page_dir: Path | None = None) -> str:
    turns, n = data["turns"], data["sessions"]
    walls = [c["wall_s"] for c in data["cells"].values()]
    cpus = [c["cpu_s"] for c in data["cells"].values() if "cpu_s" in c]
    count = max(1, len(walls) * n * turns)
    turn_s = sum(walls) / count
    dates = sorted(c["date"] for c in data["cells"].values())
    full_turns = 100 * turns * len(FAMILIES) * len(MODES)
    if len(cpus) == len(walls):
        cpu_turn = sum(cpus) / count
        speed = f"{turn_s:.1f} s of wall time and {cpu_turn:.1f} s of CPU per turn"
        cost = f"{full_turns * cpu_turn / 3600:.1f} CPU-hours at the CPU time per turn measured here"
    else:
        speed = f"{turn_s:.1f} s of wall time per turn (CPU time not recorded)"
        cost = (f"{full_turns * turn_s / 3600:.0f} hours of wall time at this contended rate; "
                f"{full_turns * 0.2 / 3600:.1f}-{full_turns * 0.4 / 3600:.1f} CPU-hours at the tiny model's "
                "uncontended 0.2-0.4 s per turn of docs/metrics.md")
    json_path = data.get("json", "results.json")  # linked relative to the page (by name without a page)
    json_name = os.path.relpath(json_path, page_dir) if page_dir is not None else Path(json_path).name
    lines = [BEGIN, f"## {turns}-turn sessions: scores and drift per turn", "",
             f"`{data['command']}` ({n} held-out sessions per family, seeds {data['seed']}..{data['seed'] + n - 1}; "
             f"model `{data['model']}` with its call defaults, every turn from the carried latent; run {dates[0]} to "
             f"{dates[-1]}, {sum(walls) / 60:.1f} min of wall time under `nice` on a shared 2-core CPU, {speed}). "
             f"Raw results with every per-turn measure and bootstrap interval: [{json_name}]({json_name}); "
             f"`--from-json` rewrites this section from it.",
             "", f"With {n} sessions per cell the intervals are wide: this is a smoke-size measurement of the "
             "curves, not the 100-session one.", ""]
    for family in FAMILIES:
        if not any(k.startswith(family + "/") for k in data["cells"]):
            continue
        lines += [f"### {family}", ""] + family_tables(data, family) + [""] + targets(data, family) + [""]
    lines += ["Drift measures (docs/metrics.md): bg = mean absolute error of the untouched background against the "
              "source (mean, and its worst 3x3 cell); colour / position / size shift of the source objects no edit "
              "touched; missing = untouched objects no longer found in their cell. 'VAE only' passes the source "
              "through the model's VAE alone: once (what the carried latent costs) or once per turn (what re-encoding "
              "the image each turn, upstream's loop, costs). Half-life: first turn where the mean falls to half its "
              "turn-1 value.", ""]
    if plot_name:
        lines += [f"![IF / CC / GA and drift per turn, {turns}-turn sessions]({plot_name})", ""]
    lines += [f"Not run yet: 100 sessions x {turns} turns per family for the three modes "
              f"({full_turns} turns: {cost}; minutes on one GPU), and the trained baselines (models trained for "
              "the none / history modes, the RL model of results_rl.md) on the same sessions, a third of that "
              "each per reasoning mode benched.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the marked section of `path` with `text` (appended when the file has no markers)."""
    current = path.read_text() if path.is_file() else ""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + text.rstrip("\n") + tail
    else:
        new = current.rstrip("\n") + ("\n\n" if current else "") + text
    path.write_text(new)


def plot(data: dict, path: Path) -> None:
    """IF, CC and background drift per turn: one line per (family, mode), the VAE-only curves dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=110)
    for key, res in data["cells"].items():
        t = [r["turn"] for r in res["per_turn"]]
        for ax, metric in zip(axes[:3], ("IF", "CC", "GA")):
            ax.plot(t, [r[metric] for r in res["per_turn"]], marker="o", ms=3, label=key)
            ax.set_title(metric)
            ax.set_ylim(-0.05, 1.05)
        axes[3].plot(t, [r["bg_mean"] for r in res["drift"]["per_turn"]], marker="o", ms=3, label=key)
    for family, vae in data.get("vae", {}).items():
        t = [r["turn"] for r in vae["per_turn"]]
        axes[3].plot(t, [r["carried_bg_mean"] for r in vae["per_turn"]], ls="--", label=f"{family} VAE carried")
        axes[3].plot(t, [r["reencoded_bg_mean"] for r in vae["per_turn"]], ls=":", label=f"{family} VAE re-encoded")
    axes[3].set_title("background drift (mean abs error, log)")
    axes[3].set_yscale("log")  # the VAE's floor (~0.003) and the jumps (~0.2) on one axis
    for ax in axes:
        ax.set_xlabel("turn")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    axes[3].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/editr2-shapes-tiny", help="an EditR2Pipeline folder")
    parser.add_argument("--turns", type=int, default=16, help="turns per session (default 16)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions per family and mode (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="first session seed (held out: training uses >= 1e7)")
    parser.add_argument("--sample-seed", type=int, default=0, help="turn k of a session is sampled with this + k")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default="runs/long_sessions/results.json", help="raw results; finished cells are skipped")
    parser.add_argument("--work", default="runs/long_sessions", help="per-session results (resumable)")
    parser.add_argument("--section-into", nargs="*", default=[],
                        help="markdown files whose long-sessions section to (re)write (e.g. docs/results.md "
                             "docs/results_notes.md)")
    parser.add_argument("--plot", default="runs/long_sessions/drift.png", help="the curves (PNG)")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the section and plot from --json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.sessions and not args.from_json:
        raise SystemExit(f"--sessions {args.sessions}: pass at least 1.")
    if args.seed + args.sessions > 10_000_000:
        raise SystemExit(f"Seeds {args.seed}.. reach the training seeds (>= 10,000,000): pass a smaller --seed.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    json_path = Path(args.json)
    data = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.from_json:
        if not data:
            raise SystemExit(f"--from-json: {json_path} does not exist; pass the --json of an earlier run.")
    else:
        data = run_cells(args, data, json_path)
    data["json"] = str(json_path)
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        plot(data, plot_path)
    for target in map(Path, args.section_into):
        plot_link = os.path.relpath(plot_path, target.parent) if plot_path is not None else None
        write_section(target, section(data, plot_link, target.parent))
    print(section(data, plot_path.name if plot_path is not None else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writing bench results: results.json, a markdown table (report.md) and a metric-vs-turn plot (per_turn.png); with
drift measures (`editr2.bench.drift`), their tables in report.md and their curves in drift.png."""

from __future__ import annotations

import json
from pathlib import Path

METRIC_KEYS = ("IF", "CC", "GA", "reward")


def markdown_table(results: dict) -> str:
    """The per-turn scores and their mean as a markdown table, under a line naming the configuration."""
    config = results.get("config", {})
    lines = []
    if config:
        lines += ["# MICE-Shapes bench", "", ", ".join(f"{k}: `{v}`" for k, v in config.items()), ""]
    lines += ["| turn | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    for row in results["per_turn"]:
        lines.append(f"| {row['turn']} | " + " | ".join(f"{row[k]:.3f}" for k in METRIC_KEYS) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{results['mean'][k]:.3f}**" for k in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"


def plot_per_turn(results: dict, path: Path) -> None:
    """Line plot of every metric against the turn index (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [row["turn"] for row in results["per_turn"]]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for key in METRIC_KEYS:
        ax.plot(turns, [row[key] for row in results["per_turn"]], marker="o", label=key)
    config = results.get("config", {})
    ax.set_title(f"{config.get('editor', '')} on {config.get('family', '')}".strip())
    ax.set_xlabel("turn")
    ax.set_ylabel("score")
    ax.set_xticks(turns)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict, out_dir) -> dict[str, Path]:
    """Write `results.json`, `report.md` and `per_turn.png` (and `drift.png` when `results` has drift measures) into
    `out_dir` (created if needed); returns their paths."""
    for key in ("per_turn", "mean", "config"):
        if key not in results:
            raise ValueError(f"`results` lacks {key!r}: pass the dict returned by run_bench.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "plot": out / "per_turn.png"}
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    from .drift_report import drift_markdown, plot_drift

    drift_md = drift_markdown(results)
    paths["report"].write_text(markdown_table(results) + ("\n" + drift_md if drift_md else ""))
    plot_per_turn(results, paths["plot"])
    if plot_drift(results, out / "drift.png"):
        paths["drift_plot"] = out / "drift.png"
    return paths

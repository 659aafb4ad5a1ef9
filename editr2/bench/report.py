"""Writing bench reports, for `editr2 bench shapes` and `editr2 bench mice`: the results as JSON, ``report.md`` and a
metric-vs-turn plot (``per_turn.png``); with drift measures (`editr2.bench.drift`), their tables in report.md and their
curves in ``drift.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

METRIC_KEYS = ("IF", "CC", "GA", "reward")
# How the MICE-Shapes plot looks (`editr2 bench shapes`); `editr2 bench mice` passes its own.
SHAPES_PLOT = {"keys": METRIC_KEYS, "ylabel": "score", "legend_loc": "lower left"}


def markdown_table(results: dict) -> str:
    """The per-turn scores and their mean as a markdown table, under a line naming the configuration; each score is
    followed by its 95% bootstrap interval over sessions where `results` has one (``"IF_ci": [low, high]``, as
    `editr2.bench.shapes.runner.run_bench` writes them): ``0.550 [0.450, 0.650]``."""
    config = results.get("config", {})
    lines = []
    if config:
        lines += ["# MICE-Shapes bench", "", ", ".join(f"{k}: `{v}`" for k, v in config.items()), ""]
    lines += ["| turn | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    for row in results["per_turn"]:
        lines.append(f"| {row['turn']} | " + " | ".join(with_interval(row, k) for k in METRIC_KEYS) + " |")
    mean = results["mean"]
    lines.append("| **mean** | " + " | ".join(with_interval(mean, k, bold=True) for k in METRIC_KEYS) + " |")
    if any(f"{k}_ci" in mean for k in METRIC_KEYS):
        from .shapes.runner import CI_LEVEL, CI_RESAMPLES, CI_SEED

        sessions = config.get("sessions")
        over = f"{sessions} sessions" if sessions is not None else "sessions"
        lines += ["", f"[low, high]: {CI_LEVEL:.0%} percentile bootstrap interval over {over} (whole sessions "
                      f"resampled, {CI_RESAMPLES} resamples, seed {CI_SEED})."]
    restores = results.get("restores") or {}
    if restores.get("turns"):
        lines += ["", f"Undo turns: {restores['turns']}, CC against the restored state: {restores['CC']:.3f}"]
    return "\n".join(lines) + "\n"


def with_interval(row: dict, key: str, digits: int = 3, bold: bool = False) -> str:
    """`row[key]` as text, followed by its interval `row[key + "_ci"]` when the row has one: ``0.550 [0.450, 0.650]``
    (the value in bold with `bold`)."""
    value = f"{row[key]:.{digits}f}"
    if bold:
        value = f"**{value}**"
    interval = row.get(f"{key}_ci")
    if interval is None:
        return value
    low, high = interval
    return f"{value} [{low:.{digits}f}, {high:.{digits}f}]"


def plot_per_turn(rows: Sequence[dict], path: Path, *, title: str, keys: Sequence[str] = METRIC_KEYS,
                  ylabel: str = "score", labels: dict | None = None, legend_loc: str = "best") -> Path:
    """Line plot of each of `keys` against the turn index (matplotlib, Agg backend); a missing (None) mean is a gap.

    Args:
        rows: one dict per turn with `"turn"` and a mean (or None) per key.
        path: the PNG to write.
        title, ylabel: the axes' texts; `labels`: legend labels by key (default: the key).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [row["turn"] for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for key in keys:
        values = [float("nan") if row[key] is None else row[key] for row in rows]
        ax.plot(turns, values, marker="o", label=(labels or {}).get(key, key))
    ax.set_title(title)
    ax.set_xlabel("turn")
    ax.set_ylabel(ylabel)
    ax.set_xticks(turns)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir, *, markdown: str | None = None, json_name: str = "results.json",
                 plot: dict | None = None, plot_section: bool = False) -> dict[str, Path]:
    """Write `results` as `json_name`, `markdown` as `report.md` and `results["per_turn"]` as `per_turn.png` into
    `out_dir` (created if needed); returns their paths (`"results"`, `"report"`, `"plot"`, and `"drift_plot"` when
    `results` has drift measures: their tables are added to the default markdown and their curves to `drift.png`).

    Args:
        results: a dict with `"per_turn"` rows (and, for the default markdown, `"mean"` and `"config"`: the dict
            `editr2.bench.shapes.runner.run_bench` returns).
        markdown: the report; defaults to `markdown_table(results)`.
        json_name: the JSON file's name.
        plot: `plot_per_turn` arguments; defaults to the MICE-Shapes plot titled "<editor> on <family>".
        plot_section: add a "Plot" section that shows the plot to the report (or says why it was not drawn, when
            matplotlib is not installed); without it, a missing matplotlib raises.
    """
    required = ("per_turn",) if markdown is not None else ("per_turn", "mean", "config")
    for key in required:
        if key not in results:
            raise ValueError(f"`results` lacks {key!r}: pass the dict returned by run_bench.")
    if plot is None:
        config = results.get("config", {})
        plot = {**SHAPES_PLOT, "title": f"{config.get('editor', '')} on {config.get('family', '')}".strip()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / json_name, "report": out / "report.md", "plot": out / "per_turn.png"}
    if markdown is None:
        from .drift_report import drift_markdown

        drift_md = drift_markdown(results)
        text = markdown_table(results) + ("\n" + drift_md if drift_md else "")
    else:
        text = markdown
    if results["per_turn"]:
        try:
            plot_per_turn(results["per_turn"], paths["plot"], **plot)
            text += "\n## Plot\n\n![per-turn scores](per_turn.png)\n" if plot_section else ""
        except ImportError as err:
            if not plot_section:
                raise
            text += f"\n(per_turn.png not drawn: {err})\n"
    paths["report"].write_text(text, encoding="utf-8")
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    if results.get("drift"):
        from .drift_report import plot_drift

        if plot_drift(results, out / "drift.png"):
            paths["drift_plot"] = out / "drift.png"
    return paths

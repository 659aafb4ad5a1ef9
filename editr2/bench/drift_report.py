"""Drift in bench reports: the per-turn drift table, the decay summary table and the curves (drift.png).

Reads the "drift" entry of a results dict (`editr2.bench.drift.drift_results`, plus "vae" when a model's VAE-only
drift was measured, `diffusers_editr2.drift.vae_drift`).
"""

from __future__ import annotations

from pathlib import Path

from .drift import DRIFT_METRICS, HALF_LIFE_METRICS, SCORE_METRICS

LABELS = {"bg_mean": "bg mean", "bg_worst": "bg worst cell", "color_shift": "colour shift",
          "position_shift": "position shift (px)", "size_change": "size change"}


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(ci, digits: int = 3, open_high: str = "–") -> str:
    low, high = ci
    return f"[{_num(low, digits)}, {open_high if high is None else _num(high, digits)}]"


def drift_markdown(results: dict) -> str:
    """Markdown tables of the drift per turn and of the decay summary; '' when `results` has no drift."""
    drift = results.get("drift")
    if not drift or not drift.get("per_turn"):
        return ""
    scores = {row["turn"]: row for row in results.get("per_turn", [])}
    vae = {row["turn"]: row for row in drift.get("vae", {}).get("per_turn", [])}
    head = ["turn", "IF", "CC", "GA"] + [LABELS[k] for k in DRIFT_METRICS] + ["missing objects"]
    if vae:
        head += ["VAE carried bg mean", "VAE re-encoded bg mean"]
    lines = [f"## Drift per turn ({drift['sessions']} sessions)", "", "| " + " | ".join(head) + " |",
             "|---" * len(head) + "|"]
    for row in drift["per_turn"]:
        t = row["turn"]
        cells = [str(t)] + [_num(scores.get(t, {}).get(k)) for k in ("IF", "CC", "GA")]
        cells += [_num(row[k], 2 if k == "position_shift" else 4 if k.startswith("bg") else 3) for k in DRIFT_METRICS]
        cells.append(f"{row['missing']}/{row['objects']}")
        if vae:
            cells += [_num(vae.get(t, {}).get("carried_bg_mean"), 4), _num(vae.get(t, {}).get("reencoded_bg_mean"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    turns = len(drift["per_turn"])
    lines += ["", f"## Decay summary (95% bootstrap intervals over {drift['sessions']} sessions)", "",
              "| measure | slope per turn | 95% CI | half-life (turns) | 95% CI |", "|---|---:|---:|---:|---:|"]
    for key in SCORE_METRICS + DRIFT_METRICS + (("vae_reencoded_bg_mean",) if "vae" in drift else ()):
        s = drift["summary"].get(key) if key != "vae_reencoded_bg_mean" else drift["vae"].get("summary")
        if not s:
            continue
        digits = 5 if key.startswith(("bg", "vae")) else 4
        cells = [LABELS.get(key, key.replace("_", " ")), _num(s["slope"], digits), _interval(s["slope_ci"], digits)]
        if key in HALF_LIFE_METRICS:
            half = s["half_life"]
            cells += [f"> {turns}" if half is None else _num(half, 2),
                      _interval(s["half_life_ci"], 2, open_high=f"> {turns}")]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Half-life: first turn at which the per-turn mean falls to half its turn-1 value (`> T`: not within "
              "the session). Drift measures: docs/metrics.md, `editr2.bench.drift`."]
    return "\n".join(lines) + "\n"


def plot_drift(results: dict, path: Path) -> bool:
    """Curves per turn: IF / CC / GA, the background and colour drift (with the VAE's, when measured), and the
    position / size drift of untouched objects. Returns False (and writes nothing) without drift."""
    drift = results.get("drift")
    if not drift or not drift.get("per_turn"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = drift["per_turn"]
    turns = [row["turn"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    for key in ("IF", "CC", "GA"):
        axes[0].plot([r["turn"] for r in results["per_turn"]], [r[key] for r in results["per_turn"]], marker="o",
                     label=key)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("score")
    for key in ("bg_mean", "bg_worst", "color_shift"):
        axes[1].plot(turns, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o",
                     label=LABELS[key])
    if "vae" in drift:
        vae = drift["vae"]["per_turn"]
        axes[1].plot([r["turn"] for r in vae], [r["carried_bg_mean"] for r in vae], ls="--", label="VAE carried")
        axes[1].plot([r["turn"] for r in vae], [r["reencoded_bg_mean"] for r in vae], ls="--",
                     label="VAE re-encoded")
    axes[1].set_ylabel("mean abs error / RGB distance")
    axes[2].plot(turns, [r["position_shift"] if r["position_shift"] is not None else float("nan") for r in rows],
                 marker="o", label=LABELS["position_shift"])
    axes[2].plot(turns, [r["size_change"] if r["size_change"] is not None else float("nan") for r in rows],
                 marker="s", label=LABELS["size_change"])
    axes[2].set_ylabel("px / relative")
    config = results.get("config", {})
    fig.suptitle(f"{config.get('editor', '')} on {config.get('family', '')}: drift per turn".strip(), fontsize=10)
    for ax in axes:
        ax.set_xlabel("turn")
        ax.set_xlim(0.5, max(turns) + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

"""docs/results_rl.md and its plot, regenerated only from the committed results of `recipes.shapes_tiny.rl_runs`.

    python -m recipes.shapes_tiny.rl_page                     # docs/rl_runs/ -> docs/results_rl.md + results_rl.png
    python -m recipes.shapes_tiny.rl_page --results DIR --out OUT.md

Reads `RESULTS/ARM/seedN/{run.json, trainer_state.json, bench_t3.json, bench_t6.json}` (any arms, seeds and turn
counts present) and writes:

- per arm, the held-out per-turn IF / CC / GA / reward, the mean over seeds of each seed's mean over all sessions of
  both families, with the range over seeds of the turn-2-3 reward;
- paired differences RL - SFT and RL - RL without filtering, per turn, for the turn-2-3 mean reward and GA at turn 3:
  the mean over sessions of (the session's mean over one arm's seeds - its mean over the other's), with a paired
  bootstrap 95% interval that resamples sessions (pairing by session, pooling seeds; `paired_bootstrap`). Sessions
  are the same held-out ones in every arm and seed (`rl_runs --bench-seed`), so a session's difficulty cancels out;
  the interval does not resample seeds, whose spread the per-seed columns show;
- the targets (RL - SFT >= +0.08 reward over turns 2-3 with its interval above 0, GA at turn 3 >= +0.10) and the
  filter's effect, each with the session-paired interval and a seed-and-session interval
  (`editr2.bench.stats.seed_session_bootstrap_ci`, which resamples each arm's seeds too);
- each trained seed against SFT on its own, and each family on its own;
- the 6-turn sessions in their own tables;
- contamination on the held-out sessions: how often IF = 0 per turn, and how often a turn fails after a failed turn
  vs after a followed one;
- training: steps, seconds per step, reward at the start and end, and filtering statistics from the logs (how often
  IF = 0, what the if_zero filter removed or, without filtering, would have removed);
- the plot: training reward vs step, mean over seeds with a band from the lowest to the highest seed, per arm; and
  the held-out reward per turn.

The output depends on the result files only (no clock, a fixed bootstrap seed): regenerating it from the same files
writes the same page.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from editr2.bench.stats import paired_bootstrap_ci, seed_session_bootstrap_ci

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "docs" / "rl_runs"
DEFAULT_OUT = REPO / "docs" / "results_rl.md"
ARM_ORDER = ("sft", "rl", "rl_nofilter", "rl_noise13")
LABELS = {"sft": "SFT (the RL base)", "rl": "RL (Edit-R2, if_zero filter)", "rl_nofilter": "RL, no filtering",
          "rl_noise13": "RL at SDE noise 1.3"}
COLORS = {"sft": "tab:gray", "rl": "tab:blue", "rl_nofilter": "tab:orange", "rl_noise13": "tab:red"}
COMPARISONS = (("rl", "sft"), ("rl", "rl_nofilter"), ("rl_noise13", "sft"))
OPTIONAL_ARMS = ("rl_noise13",)  # ablations: their rows appear only when their results do
SHIPPED = "shipped"  # bench-only: the shipped default folder, paired with the RL run of the same seed only
METRICS = ("IF", "CC", "GA", "reward")
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MIN_SEEDS = 3  # per arm, for a difference to count as shown
TOLERANCE = 1e-9
# (a, b, turns, column, threshold): the difference a - b on `turns`-turn sessions must reach `threshold` with its
# session-paired interval above 0; None: reported only
TARGETS = (("rl", "sft", 3, "reward turns 2-3", 0.08), ("rl", "sft", 3, "GA t3", 0.10),
           ("rl", "rl_nofilter", 3, "reward turns 2-3", None), ("rl", "rl_nofilter", 6, "reward turns 2-6", None),
           ("rl", "sft", 6, "reward turns 2-6", None))


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_results(root: str | Path) -> dict[str, dict[int, dict]]:
    """`{arm: {seed: {"run": run.json, "state": trainer_state.json or None, "bench": {turns: bench_tT.json},
    "gold": {turns: bench_gold_tT.json}}}}` (gold: the editor alone on gold intents, where benched).

    Raises:
        ValueError: when `root` holds no `ARM/seedN/bench_tT.json` file.
    """
    root = Path(root)
    runs: dict[str, dict[int, dict]] = {}
    for bench_file in sorted(root.glob("*/seed*/bench_t*.json")):
        folder = bench_file.parent
        seed_match, turns_match = re.fullmatch(r"seed(\d+)", folder.name), re.fullmatch(r"bench_t(\d+)\.json",
                                                                                        bench_file.name)
        if not seed_match or not turns_match:
            continue
        arm, seed = folder.parent.name, int(seed_match.group(1))
        entry = runs.setdefault(arm, {}).setdefault(seed, {"run": {}, "state": None, "bench": {}, "gold": {}})
        entry["bench"][int(turns_match.group(1))] = json.loads(bench_file.read_text())
        for gold_file in folder.glob("bench_gold_t*.json"):
            entry["gold"][int(gold_file.stem.rsplit("_t", 1)[1])] = json.loads(gold_file.read_text())
        if not entry["run"] and (folder / "run.json").is_file():
            entry["run"] = json.loads((folder / "run.json").read_text())
        if entry["state"] is None and (folder / "trainer_state.json").is_file():
            entry["state"] = json.loads((folder / "trainer_state.json").read_text())
    if not runs:
        raise ValueError(f"{root} holds no ARM/seedN/bench_tT.json results: write them with "
                         "`python -m recipes.shapes_tiny.rl_runs --arm ARM --seed N`, or pass --results DIR.")
    order = [a for a in ARM_ORDER if a in runs] + sorted(a for a in runs if a not in ARM_ORDER)
    return {arm: dict(sorted(runs[arm].items())) for arm in order}


def session_scores(bench: dict) -> dict[str, np.ndarray]:
    """`{family/session id: (turns, 4) array of IF, CC, GA, reward}` of one bench file."""
    index = [bench.get("metrics", list(METRICS)).index(m) for m in METRICS]
    return {f"{family}/{row['id']}": np.asarray(row["scores"], dtype=np.float64)[:, index]
            for family, result in bench["families"].items() for row in result["sessions"]}


def arm_sessions(runs: dict[int, dict], turns: int) -> dict[str, list[np.ndarray]]:
    """`{session key: [(turns, 4) scores of each seed]}` of one arm at one turn count (seeds that benched it)."""
    pooled: dict[str, list[np.ndarray]] = {}
    for entry in runs.values():
        if turns in entry["bench"]:
            for key, scores in session_scores(entry["bench"][turns]).items():
                pooled.setdefault(key, []).append(scores)
    return pooled


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------


def paired_bootstrap(a: dict[str, list[float]], b: dict[str, list[float]], resamples: int = RESAMPLES,
                     level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> dict:
    """The mean paired difference `a - b` over sessions and its bootstrap interval.

    Each session's value is averaged over its seeds in each arm (pooling seeds), the difference taken per session
    (pairing by session), and the sessions resampled with replacement `resamples` times; the interval is the
    percentile interval of the resampled means (`editr2.bench.stats.paired_bootstrap_ci`).

    Args:
        a, b: `{session key: [value of each seed]}` of two arms; only the sessions in both are compared.
        resamples: bootstrap resamples (>= 1).
        level: the interval's coverage, in (0, 1).
        seed: the resampling seed (fixed, so the same files give the same interval).

    Returns:
        `{"diff", "low", "high", "n"}`: the mean difference, the interval's ends and the number of sessions paired
        (all NaN and n = 0 when no session is in both).
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples={resamples}, level={level}: pass resamples >= 1 and a level in (0, 1).")
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean_a = np.array([np.mean(a[k]) for k in keys], dtype=np.float64)  # (sessions,) seeds pooled
    mean_b = np.array([np.mean(b[k]) for k in keys], dtype=np.float64)
    diffs = mean_a - mean_b
    if not np.isfinite(diffs).all():
        raise ValueError("non-finite scores in the bench files: rerun the bench of the affected arm.")
    low, high = paired_bootstrap_ci(mean_b, mean_a, num_resamples=resamples, level=level, seed=seed)  # a - b
    return {"diff": float(diffs.mean()), "low": float(low), "high": float(high), "n": len(keys)}


def per_seed_means(runs: dict[int, dict], turns: int) -> dict[int, np.ndarray]:
    """`{seed: (turns, 4) mean over all sessions of both families}` of one arm."""
    out = {}
    for seed, entry in runs.items():
        if turns in entry["bench"]:
            scores = list(session_scores(entry["bench"][turns]).values())
            out[seed] = np.mean(np.stack(scores), axis=0)
    return out


def late_reward(scores: np.ndarray) -> float:
    """The mean reward over turns 2-3 (or 2 when there are only 2)."""
    return float(scores[1:3, 3].mean())


def values(sessions: dict[str, list[np.ndarray]], fn) -> dict[str, list[float]]:
    """`{session key: [fn(scores) of each seed]}`."""
    return {key: [fn(s) for s in seeds] for key, seeds in sessions.items()}


def column(name: str):
    """The per-session statistic of a column name: "reward tK", "reward turns 2-K", "GA tK" (any metric)."""
    if name.startswith("reward turns 2-"):
        last = int(name.rsplit("-", 1)[1])
        return lambda s: float(s[1:last, 3].mean())
    metric, turn = name.split(" t")
    return lambda s, i=METRICS.index(metric), t=int(turn) - 1: float(s[t, i])


def seed_matrix(runs: dict[int, dict], turns: int, fn, keys: list[str]) -> np.ndarray:
    """`(seeds, len(keys))`: `fn` of each seed's scores on each session of `keys` (seeds that benched all of them)."""
    rows = []
    for entry in runs.values():
        if turns in entry["bench"]:
            scores = session_scores(entry["bench"][turns])
            if all(k in scores for k in keys):
                rows.append([fn(scores[k]) for k in keys])
    return np.asarray(rows, dtype=np.float64)


def seed_interval(a_runs: dict[int, dict], b_runs: dict[int, dict], turns: int, fn) -> tuple[float, float] | None:
    """The seed-and-session bootstrap interval of a - b (`seed_session_bootstrap_ci`); None without common sessions."""
    keys = sorted(set(arm_sessions(a_runs, turns)) & set(arm_sessions(b_runs, turns)))
    a, b = seed_matrix(a_runs, turns, fn, keys), seed_matrix(b_runs, turns, fn, keys)
    if not keys or not len(a) or not len(b):
        return None
    return seed_session_bootstrap_ci(b, a, num_resamples=RESAMPLES, seed=BOOTSTRAP_SEED)


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def fmt_diff(result: dict, digits: int = 3) -> str:
    """`+0.012 [-0.004, +0.029]` (or n/a)."""
    if result["n"] == 0:
        return "n/a"
    return f"{result['diff']:+.{digits}f} [{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]"


def label(arm: str) -> str:
    return LABELS.get(arm, arm)


def per_turn_table(results: dict, turns: int) -> list[str]:
    """Per arm: seeds, per-turn means over seeds of each metric, turn-2-3 reward (mean and range over seeds)."""
    header = " / ".join(f"t{t}" for t in range(1, turns + 1))
    lines = ["| arm | seeds | " + " | ".join(f"{m} {header}" for m in METRICS) + " | reward turns 2-3 (seed range) |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for arm, runs in results.items():
        seeds = per_seed_means(runs, turns)
        if not seeds:
            continue
        mean = np.mean(np.stack(list(seeds.values())), axis=0)  # (turns, 4)
        late = [float(m[1:3, 3].mean()) for m in seeds.values()]
        cells = [" / ".join(f"{v:.2f}" for v in mean[:, i]) for i in range(len(METRICS))]
        lines.append(f"| {label(arm)} | {', '.join(map(str, seeds))} | " + " | ".join(cells) +
                     f" | {np.mean(late):.3f} ({min(late):.3f} - {max(late):.3f}) |")
    return lines


def family_of(key: str) -> str:
    return key.split("/", 1)[0]


def differences_table(results: dict, turns: int) -> list[str]:
    """Paired differences with bootstrap intervals: per turn reward, turn-2-3 reward, GA at turn 3 (when present);
    both families pooled, then each family alone."""
    columns = [(f"reward t{t + 1}", (lambda s, t=t: float(s[t, 3]))) for t in range(turns)]
    columns.append(("reward turns 2-3", late_reward))
    if turns > 3:
        columns.append((f"reward turns 2-{turns}", lambda s: float(s[1:, 3].mean())))
    if turns >= 3:
        columns.append(("GA t3", lambda s: float(s[2, 2])))
    lines = ["| difference | sessions | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for a, b in COMPARISONS:
        if a in OPTIONAL_ARMS and a not in results:
            continue
        if a not in results or b not in results:
            lines.append(f"| {label(a)} - {label(b)} | n/a (arm missing) |" + " n/a |" * len(columns))
            continue
        sa, sb = arm_sessions(results[a], turns), arm_sessions(results[b], turns)
        families = sorted({family_of(k) for k in sa})
        for family in [None, *families] if len(families) > 1 else [None]:
            fa = {k: v for k, v in sa.items() if family is None or family_of(k) == family}
            cells = [paired_bootstrap(values(fa, fn), values(sb, fn)) for _, fn in columns]
            name = f"{label(a)} - {label(b)}" + (f", {family} only" if family else "")
            lines.append(f"| {name} | {cells[0]['n']} | " + " | ".join(fmt_diff(c) for c in cells) + " |")
    return lines


def check_targets(results: dict) -> list[dict]:
    """`TARGETS` against the results: per row the difference, its session-paired interval, its seed-and-session
    interval, the seeds of each arm and a status ("met", "missed", "reported", or "not measured")."""
    rows = []
    for a, b, turns, name, threshold in TARGETS:
        row = {"a": a, "b": b, "turns": turns, "column": name, "threshold": threshold, "status": "not measured",
               "paired": {"n": 0}, "seeds": None, "seed_counts": (0, 0)}
        if a in results and b in results and per_seed_means(results[a], turns) and per_seed_means(results[b], turns):
            fn = column(name)
            row["paired"] = paired_bootstrap(values(arm_sessions(results[a], turns), fn),
                                             values(arm_sessions(results[b], turns), fn))
            row["seeds"] = seed_interval(results[a], results[b], turns, fn)
            row["seed_counts"] = (len(per_seed_means(results[a], turns)), len(per_seed_means(results[b], turns)))
            if row["paired"]["n"] == 0:
                row["status"] = "not measured"
            elif threshold is None:
                row["status"] = "reported"
            else:
                met = row["paired"]["diff"] >= threshold - TOLERANCE and row["paired"]["low"] > 0
                row["status"] = "met" if met else "missed"
        rows.append(row)
    return rows


def targets_table(rows: list[dict]) -> list[str]:
    lines = ["| difference | sessions | seeds | value [95%, sessions paired] | [95%, seeds and sessions] | target | "
             "status |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = "{} / {}".format(*row["seed_counts"])
        interval = "n/a" if row["seeds"] is None else "[{:+.3f}, {:+.3f}]".format(*row["seeds"])
        target = "reported" if row["threshold"] is None else f">= {row['threshold']:+.2f}, interval above 0"
        status = {"met": "**met**", "missed": "**missed**"}.get(row["status"], row["status"])
        if row["status"] in ("met", "missed") and min(row["seed_counts"]) < MIN_SEEDS:
            status += f" (under {MIN_SEEDS} seeds: provisional)"
        sessions = f"{row['turns']} turns x {row['paired']['n']}" if row["paired"]["n"] else "–"
        lines.append(f"| {label(row['a'])} - {label(row['b'])}: {row['column']} | {sessions} | {seeds} | "
                     f"{fmt_diff(row['paired'])} | {interval} | {target} | {status} |")
    return lines


def per_seed_table(results: dict, turns: int) -> list[str]:
    """Each trained seed against SFT (its seeds pooled) on its own: reward over turns 2-3 and GA at turn 3."""
    if "sft" not in results or turns < 3:
        return []
    names = ["reward turns 2-3", "GA t3"]
    sft = arm_sessions(results["sft"], turns)
    lines = ["| run | " + " | ".join(f"{n} - SFT" for n in names) + " |", "|---|" + "---|" * len(names)]
    for arm, runs in results.items():
        if arm == "sft":
            continue
        for seed, entry in runs.items():
            mine = arm_sessions({seed: entry}, turns)
            if not mine:
                continue
            cells = [fmt_diff(paired_bootstrap(values(mine, column(n)), values(sft, column(n)))) for n in names]
            lines.append(f"| {label(arm)}, seed {seed} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def attribution_table(results: dict, turns: int) -> list[str]:
    """Per arm, pooled over seeds and sessions: how often the intent written is the gold one (the reasoner), and IF
    on the turns whose intent is exact (the editor on its own), per turn; empty when the bench files hold no
    `exact` rows (`rl_runs.session_rows`)."""
    header = " / ".join(f"t{t}" for t in range(1, turns + 1))
    lines = [f"| arm | intent exact, {header} | IF when the intent is exact, {header} |", "|---|---|---|"]
    for arm, runs in results.items():
        exact, scores = [], []
        for entry in runs.values():
            bench = entry["bench"].get(turns)
            rows = [r for res in (bench or {"families": {}})["families"].values() for r in res["sessions"]]
            if rows and all("exact" in r for r in rows):
                exact += [r["exact"] for r in rows]
                scores += [[t[0] for t in r["scores"]] for r in rows]
        if not exact:
            continue
        hit, follow = np.asarray(exact, dtype=bool), np.asarray(scores, dtype=np.float64)  # (sessions x seeds, turns)
        given = [f"{follow[hit[:, t], t].mean():.2f}" if hit[:, t].any() else "n/a" for t in range(turns)]
        lines.append(f"| {label(arm)} | " + " / ".join(f"{v:.2f}" for v in hit.mean(axis=0)) + " | " +
                     " / ".join(given) + " |")
    return lines if len(lines) > 2 else []


def contamination_table(results: dict, turns: int) -> list[str]:
    """Per arm, over the held-out sessions and seeds: the share of IF = 0 per turn, and the chance that a turn fails
    (IF = 0) after a failed turn vs after a followed one (turns 2 and later)."""
    header = " / ".join(f"t{t}" for t in range(1, turns + 1))
    lines = [f"| arm | IF = 0, {header} | IF = 0 after IF = 0 | IF = 0 after IF > 0 |", "|---|---|---|---|"]
    for arm, runs in results.items():
        sessions = [s for seeds in arm_sessions(runs, turns).values() for s in seeds]
        if not sessions:
            continue
        failed = np.stack([s[:, 0] == 0 for s in sessions])  # (sessions x seeds, turns)
        after_fail = failed[:, 1:][failed[:, :-1]]
        after_pass = failed[:, 1:][~failed[:, :-1]]

        def rate(x: np.ndarray) -> str:
            return f"{x.mean():.3f} (of {x.size})" if x.size else "n/a"

        lines.append(f"| {label(arm)} | " + " / ".join(f"{v:.2f}" for v in failed.mean(axis=0)) +
                     f" | {rate(after_fail)} | {rate(after_pass)} |")
    return lines


def log_entries(state: dict | None) -> list[dict]:
    """The per-step entries (those with a reward) of a trainer_state.json."""
    if not state:
        return []
    return [e for e in state.get("log_history", []) if e.get("reward") is not None and "step" in e]


def mean_of(entries: list[dict], key: str) -> float:
    found = [e[key] for e in entries if isinstance(e.get(key), (int, float))]
    return float(np.mean(found)) if found else math.nan


def training_table(results: dict) -> list[str]:
    """Per trained arm: seeds, steps, s / step, reward first / last 10 steps, filter statistics (means over seeds)."""
    lines = ["| arm | seeds | steps | s / step | reward, first 10 steps | reward, last 10 steps | IF = 0 (samples) | "
             "filtered (samples) | if_zero would mask (samples) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        logs = {seed: log_entries(entry["state"]) for seed, entry in runs.items()}
        logs = {seed: entries for seed, entries in logs.items() if entries}
        if not logs:
            continue

        def over_seeds(fn) -> float:
            return float(np.nanmean([fn(entries) for entries in logs.values()]))

        steps = sorted({entries[-1]["step"] for entries in logs.values()})
        lines.append(
            f"| {label(arm)} | {', '.join(map(str, logs))} | {', '.join(map(str, steps))} | "
            f"{fmt(over_seeds(lambda e: mean_of(e, 'timing/step')), 1)} | "
            f"{fmt(over_seeds(lambda e: mean_of(e[:10], 'reward')))} | "
            f"{fmt(over_seeds(lambda e: mean_of(e[-10:], 'reward')))} | "
            f"{fmt(over_seeds(lambda e: mean_of(e, 'filter/frac_if_zero')), 3)} | "
            f"{fmt(over_seeds(lambda e: mean_of(e, 'filter/frac_filtered')), 3)} | "
            f"{fmt(over_seeds(lambda e: mean_of(e, 'filter/frac_if_zero_masks')), 3)} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------------


def smooth(series: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis."""
    out = np.empty_like(series, dtype=np.float64)
    for i in range(series.shape[-1]):
        out[..., i] = series[..., max(0, i - window + 1) : i + 1].mean(axis=-1)
    return out


def reward_curves(runs: dict[int, dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """`(steps, (seeds, steps) reward)` over the steps every seed logged; None when no seed has a log."""
    logs = [{e["step"]: e["reward"] for e in log_entries(entry["state"])} for entry in runs.values()]
    logs = [log for log in logs if log]
    if not logs:
        return None
    steps = sorted(set.intersection(*(set(log) for log in logs)))
    return np.array(steps), np.array([[log[s] for s in steps] for log in logs], dtype=np.float64)


def write_plot(path: Path, results: dict, window: int = 10) -> None:
    """Training reward vs step (mean over seeds, band from the lowest to the highest seed, trailing mean of
    `window` steps) and the held-out 3-turn reward per turn (mean over seeds, bars from the lowest to the highest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, runs in results.items():
        curves = reward_curves(runs)
        if curves is None:
            continue
        steps, rewards = curves
        smoothed = smooth(rewards, window)
        seeds = f"{len(rewards)} seed" + ("s" if len(rewards) != 1 else "")
        left.plot(steps, smoothed.mean(axis=0), color=COLORS.get(arm), label=f"{label(arm)} ({seeds})",
                  marker="." if len(steps) < 30 else None)
        left.fill_between(steps, smoothed.min(axis=0), smoothed.max(axis=0), color=COLORS.get(arm), alpha=0.2)
    left.set(xlabel="step", ylabel="reward")
    left.set_title(f"training reward (mean of {window} steps)\nline: mean over seeds, band: seed range", fontsize=10)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)

    turns = 3 if any(3 in e["bench"] for runs in results.values() for e in runs.values()) else \
        min(t for runs in results.values() for e in runs.values() for t in e["bench"])
    arms = [arm for arm, runs in results.items() if per_seed_means(runs, turns)]
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        seeds = np.stack(list(per_seed_means(results[arm], turns).values()))[:, :, 3]  # (seeds, turns)
        x = np.arange(1, seeds.shape[1] + 1) + (i - (len(arms) - 1) / 2) * width
        mean = seeds.mean(axis=0)
        right.bar(x, mean, width, color=COLORS.get(arm), label=label(arm),
                  yerr=[mean - seeds.min(axis=0), seeds.max(axis=0) - mean], capsize=2)
    right.set(xlabel="turn", ylabel="reward", xticks=list(range(1, turns + 1)))
    right.set_title(f"held-out reward per turn ({turns}-turn sessions)\nmean over seeds, bars: seed range", fontsize=10)
    if arms:
        right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------------------------------


def shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def protocol(results: dict, results_dir: Path, command: str = "python -m recipes.shapes_tiny.rl_page") -> list[str]:
    """What was run: arms, seeds, steps, the training config's key settings, the held-out sessions."""
    benches = [b for runs in results.values() for e in runs.values() for b in e["bench"].values()]
    first = benches[0]
    trained = [e["run"] for arm, runs in sorted(results.items(), key=lambda item: item[0] != "rl") if arm != "sft"
               for e in runs.values() if e["run"]]  # the rl arm's config first: the others differ by their settings
    config = trained[0].get("config", {}) if trained else {}
    overrides = {run["arm"]: run["settings"] for run in trained if run.get("settings")}
    # the base model as each run named it (a folder that was renamed later appears under both names)
    runs_of = {}
    for run in trained:
        runs_of.setdefault(run.get("model", "?"), []).append(f"{run['arm']} seed {run['seed']}")
    if len(runs_of) > 1:
        models = "the base model as each run named it, " + " / ".join(
            f"`{name}` ({', '.join(which)})" for name, which in sorted(runs_of.items())) + ","
    else:
        models = f"`{next(iter(runs_of), '?')}`"
    keys = ("per_device_train_batch_size", "num_generations", "num_turns", "num_inference_steps", "sde_window_size",
            "sde_window_range", "noise_level", "clip_range_image", "clip_range_text", "beta", "global_std",
            "group_key", "lora_r", "text_lora_r", "learning_rate", "max_steps")
    settings = ", ".join(f"{k} {config[k]}" for k in keys if k in config)
    families = sorted({f for b in benches for f in b["families"]})
    turn_counts = sorted({b["turns"] for b in benches})
    lines = [
        f"Regenerated by `{command}` from the committed results in `{shown(results_dir)}` "
        "(each `ARM/seedN/` written by `python -m recipes.shapes_tiny.rl_runs --arm ARM --seed N`).",
        "",
        "- Arms: " + "; ".join(f"{label(arm)}: seeds {', '.join(map(str, runs))}"
                               for arm, runs in results.items()) + ".",
        f"- Training (RL arms): {models} + LoRA on the editor and the "
        f"reasoner, {settings}" + "".join(f"; {label(arm)}: " + ", ".join(f"{k} {v}" for k, v in changed.items())
                                          for arm, changed in overrides.items()) + "." if trained else
        "- No trained arm.",
        f"- Held-out bench: {first['sessions_per_family']} sessions per family ({', '.join(families)}), seeds "
        f"{first['bench_seed']}..{first['bench_seed'] + first['sessions_per_family'] - 1}, the same sessions in every "
        f"arm and seed, {' and '.join(map(str, turn_counts))} turns, {first['size']} px, intent mode, the model "
        "folder's call defaults; the bench's sampling seed is the run's seed (the SFT seeds differ by sampling only).",
        "- Intervals: paired bootstrap 95% over sessions (each session's value averaged over the seeds of each arm, "
        f"{RESAMPLES} resamples, `rl_page.paired_bootstrap`); they leave seed-to-seed spread out (the seed range "
        "column shows it).",
    ]
    return lines


def noise_section(results_dir: Path) -> list[str]:
    """The rollout reward per SDE noise level (`RESULTS/rollout_noise.json` of `recipes.shapes_tiny.rollout_noise`),
    when the results folder has one: why the config's noise level."""
    path = Path(results_dir) / "rollout_noise.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    command = data.get("command") or ("python -m recipes.shapes_tiny.rollout_noise --noise-levels "
                                      + " ".join(data["levels"])
                                      + f" --sessions {data['sessions']} --json {shown(path)}")
    turns = len(next(iter(data["levels"].values()))["reward"])
    header = " / ".join(f"t{t}" for t in range(1, turns + 1))
    lines = ["## The SDE noise level", "",
             f"The trainer's rollouts of {data['sessions']} training sessions at each noise level, the same sessions, "
             f"seeds and reasoning draws at every level (`{command}`); level 0 makes the window's steps ODE steps, "
             "the sampler inference runs. Group std: the mean within-session spread of the reward, what the "
             "advantages are made of.", "",
             f"| noise level | reward {header} | IF {header} | GA {header} | group std {header} |",
             "|---|---|---|---|---|"]
    for level, row in data["levels"].items():
        cells = [" / ".join(f"{v:.2f}" for v in row.get(k, [])) or "n/a" for k in ("reward", "IF", "GA", "group_std")]
        lines.append(f"| {float(level):g} | " + " | ".join(cells) + " |")
    return lines + [""]


def gold_section(results: dict, turns: int = 3) -> list[str]:
    """The editor alone: each arm benched with every turn prompted by its gold intent (`rl_runs --prompts gold`)
    beside its own intents, on the same sessions and seeds (the gold - own difference is what a reasoner that is
    always right would add), and RL against the SFT editor given gold intents. Empty without such benches."""
    names = ["reward turns 2-3", "GA t3"]
    own, gold = {}, {}
    for arm, runs in results.items():
        seeds = {s: e for s, e in runs.items() if turns in e.get("gold", {}) and turns in e["bench"]}
        if seeds:
            own[arm] = arm_sessions(seeds, turns)
            gold[arm] = arm_sessions({s: {"bench": e["gold"]} for s, e in seeds.items()}, turns)
    if not gold:
        return []
    lines = [f"## The editor alone: gold intents ({turns}-turn sessions)", "",
             "Each turn prompted with the session's gold operative intent (reasoning off), the editor still editing "
             "its own carried state: the reward a reasoner that is always right would reach with that editor. Same "
             "sessions and sampling seeds as the intent-mode bench, paired by session.", "",
             "| arm | seeds | " + " | ".join(f"{n}: own intents / gold intents / gold - own" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for arm in gold:
        cells = []
        for name in names:
            a, b = values(gold[arm], column(name)), values(own[arm], column(name))
            mean_b, mean_a = (np.mean([np.mean(v) for v in x.values()]) for x in (b, a))
            cells.append(f"{mean_b:.3f} / {mean_a:.3f} / {fmt_diff(paired_bootstrap(a, b))}")
        seeds = ", ".join(str(s) for s, e in results[arm].items() if turns in e.get("gold", {}))
        lines.append(f"| {label(arm)} | {seeds} | " + " | ".join(cells) + " |")
    if "sft" in gold and "rl" in results and arm_sessions(results["rl"], turns):
        lines += ["", "| difference | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        pairs = [(f"{label('rl')} (all seeds), own intents - {label('sft')}, gold intents",
                  arm_sessions(results["rl"], turns), gold["sft"])]
        if "rl" in gold:
            pairs.insert(0, (f"{label('rl')} - {label('sft')}, both on gold intents (the editor's gain)", gold["rl"],
                             gold["sft"]))
        for name, a, b in pairs:
            cells = [fmt_diff(paired_bootstrap(values(a, column(n)), values(b, column(n)))) for n in names]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def shipped_section(shipped: dict[int, dict], results: dict) -> list[str]:
    """The shipped default folder (`rl_runs --arm shipped --seed S`) against the RL run of seed S with its adapters
    loaded, paired by session with the same sampling seed: what fusing the adapters into half-precision weights
    changes. Empty without a shipped bench."""
    names = ["reward, all turns", "reward turns 2-3", "GA t3", "IF, all turns"]
    fns = [lambda s: float(s[:, 3].mean()), late_reward, column("GA t3"), lambda s: float(s[:, 0].mean())]
    rows = []
    for seed, entry in shipped.items():
        rl = results.get("rl", {}).get(seed)
        for turns, bench in sorted(entry["bench"].items()):
            if rl is None or turns not in rl["bench"]:
                continue
            a, b = session_scores(bench), session_scores(rl["bench"][turns])
            cells = [fmt_diff(paired_bootstrap({k: [fn(v)] for k, v in a.items()}, {k: [fn(v)] for k, v in b.items()}))
                     if turns >= 3 or name not in ("reward turns 2-3", "GA t3") else "n/a"
                     for name, fn in zip(names, fns)]
            keys = sorted(set(a) & set(b))
            differ = sum(not np.array_equal(a[k], b[k]) for k in keys)
            rows.append(f"| {label('rl')}, seed {seed} | {turns} | {len(keys)} | {differ} | " + " | ".join(cells) +
                        " |")
    if not rows:
        return []
    model = next(iter(shipped.values()))["run"].get("model", "the shipped folder")
    return ["## The shipped default", "",
            f"`{model}` benched on the same held-out sessions with the sampling seed of the RL run whose adapters are "
            "fused into it, paired by session against that run with its adapters loaded: what fusing and half "
            "precision change (shipped - adapters).", "",
            "| shipped - | turns | sessions | sessions scored differently | " + " | ".join(names) + " |",
            "|---|---|---|---|" + "---|" * len(names),
            *rows, ""]


def write_page(results_dir: Path, out: Path, notes: Path | None = None,
               command: str = "python -m recipes.shapes_tiny.rl_page") -> None:
    """Write `out` (markdown) and its plot (`out` with `.png`) from the results in `results_dir`, with the markdown
    of `notes` (the reading of the numbers) appended."""
    results = load_results(results_dir)
    shipped = results.pop(SHIPPED, {})
    plot = out.with_suffix(".png")
    turn_counts = sorted({t for runs in results.values() for e in runs.values() for t in e["bench"]})
    lines = ["# RL: SFT vs Edit-R2 RL vs RL without trajectory filtering (MICE-Shapes)", "",
             *protocol(results, results_dir, command), "",
             "## Targets", "",
             f"Paired by session (seeds pooled per session) and, beside it, resampling each arm's seeds as well; a "
             f"target counts as shown with {MIN_SEEDS} or more seeds per arm.", "",
             *targets_table(check_targets(results)), ""]
    for turns in turn_counts:
        lines += [f"## {turns}-turn sessions", "", "Per turn (mean over seeds; both families pooled):", "",
                  *per_turn_table(results, turns), "",
                  "Paired differences (mean over sessions [95% bootstrap interval]):", "",
                  *differences_table(results, turns), ""]
        seeds = per_seed_table(results, turns)
        if seeds:
            lines += ["Each trained seed against SFT (paired by session):", "", *seeds, ""]
        attribution = attribution_table(results, turns)
        if attribution:
            lines += ["The reasoner and the editor apart (all seeds): how often the intent written is the gold one, "
                      "and the editor's IF on the turns whose intent is exact:", "", *attribution, ""]
        lines += ["Contamination (IF = 0 on the held-out sessions, all seeds; a session's own difficulty adds to the "
                  "chance of failing again):", "", *contamination_table(results, turns), ""]
    lines += gold_section(results)
    lines += shipped_section(shipped, results)
    lines += noise_section(results_dir)
    lines += ["## Training and filtering (from each run's trainer_state.json)", "",
              "Means over steps, then over seeds. IF = 0: samples whose IF score was 0; filtered: samples the "
              "trajectory filter removed from the loss; if_zero would mask: what the if_zero filter removes (with "
              "no filtering: would have removed).", "",
              *training_table(results), "",
              f"![training reward vs step and held-out reward per turn]({plot.name})", ""]
    if notes is not None:
        lines += [notes.read_text().strip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    write_plot(plot, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="the committed results folder")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the page (the plot: same stem, .png)")
    parser.add_argument("--notes", default=None, metavar="MD", help="markdown appended to the page (the reading)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    notes = Path(args.notes) if args.notes else None
    if notes is not None and not notes.is_file():
        raise SystemExit(f"--notes {notes}: no such file.")
    command = "python -m recipes.shapes_tiny.rl_page" + "".join(
        f" {flag} {shown(Path(value))}" for flag, value in (("--results", args.results), ("--out", args.out),
                                                             ("--notes", args.notes))
        if value and Path(value).resolve() != {"--results": DEFAULT_RESULTS, "--out": DEFAULT_OUT}.get(flag))
    write_page(Path(args.results), out, notes, command)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

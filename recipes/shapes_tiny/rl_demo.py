"""The RL demonstration: the SFT model vs Edit-R2 RL vs RL without trajectory filtering, on held-out
MICE-Shapes seeds, in one resumable command.

    python -m recipes.shapes_tiny.rl_demo                    # train both arms, bench all three, write the report
    python -m recipes.shapes_tiny.rl_demo --jobs 2           # the two arms side by side (a machine with 2 free cores)
    python -m recipes.shapes_tiny.rl_demo --skip-train       # bench what is there (newest checkpoints) and write the report

1. Bench the SFT model: `--sessions` held-out sessions (seeds `--seed`, `--seed + 1`, ...) x `--turns` turns per
   family (cm, cu), intent mode, the model folder's call defaults (`diffusers_editr2.bench.load_bench_editor`).
2. Train arm `rl` (trajectory_filter if_zero) and arm `rl_nofilter` (trajectory_filter none) with
   `trl_editr2/scripts/editr2.py --config CONFIG --output_dir RUN_DIR/<arm>`, one subprocess per arm. Rerunning the
   command continues an interrupted arm from its newest `checkpoint-N`; a finished arm is skipped.
3. Bench each arm: the same pipeline folder with the arm's saved adapters loaded (`load_lora_weights(dir)` and
   `load_reasoning_lora(dir/reasoning_lora)`, docs/trainer.md), on the same sessions and seeds.
4. Write `--out-md` (per-turn table, the two targets, training summary) and the plot next to it (`.png`): reward vs
   step of both arms from their `trainer_state.json`, and held-out per-turn bars.

Bench results are cached in `RUN_DIR/bench/<arm>.json`, keyed by the model, the adapters (step and file time) and
the protocol, so a rerun benches only what changed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "examples" / "configs" / "shapes_default_rl.yaml"

# arm -> trajectory_filter of its training run; "sft" is the untrained model itself
ARMS = {"rl": "if_zero", "rl_nofilter": "none"}
LABELS = {"sft": "SFT (the RL base)", "rl": "RL (Edit-R2, if_zero filter)", "rl_nofilter": "RL, no filtering"}
FAMILIES = ("cm", "cu")
METRICS = ("IF", "CC", "GA", "reward")
LATE_TURNS = (2, 3)  # the turns the targets are measured on
TARGET_GAIN = 0.05  # RL must beat SFT by this much mean reward over LATE_TURNS
TOLERANCE = 1e-9  # float slack of the target comparisons (0.30 - 0.25 is 0.04999999999999999)
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
REASONING_DIR = "reasoning_lora"


# ---------------------------------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict:
    """The training YAML as a dict (its keys are EditR2ScriptArguments / EditR2Config fields)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping of training arguments.")
    return config


def resolve_model(model: str | None, config: dict) -> Path:
    """The SFT pipeline folder: `--model`, else the config's `model_name_or_path` (relative to the working directory,
    then to the repository)."""
    name = model or config.get("model_name_or_path")
    if not name or name == "tiny":
        raise ValueError("Pass --model PATH (an EditR2Pipeline folder, e.g. checkpoints/editr2-shapes-tiny), or set "
                         "model_name_or_path to one in the config.")
    path = Path(name)
    for candidate in (path, REPO / path):
        if (candidate / "model_index.json").is_file():
            return candidate.resolve()
    raise ValueError(f"{name} is not an EditR2Pipeline folder (no model_index.json): train and export the default "
                     "model first (docs/training.md), or pass --model PATH.")


def call_default_mismatches(model: Path, config: dict) -> list[str]:
    """Where the training rollouts would not sample as the bench (the model's `editr2_call_defaults.json`) does."""
    from diffusers_editr2.call_defaults import read_call_defaults

    calls = (read_call_defaults(model) or {"reference_area": None})
    pairs = [("num_inference_steps", "num_inference_steps"), ("true_cfg_scale", "true_cfg_scale"),
             ("reference_area", "reference_area"), ("condition_area", "condition_area"),
             ("reasoning_condition_area", "reasoning_condition_area"),
             ("height", "shapes_size"), ("width", "shapes_size")]
    notes = [f"the model's {call}={calls[call]!r} but the config's {key}={config[key]!r}"
             for call, key in pairs if call in calls and key in config and calls[call] != config[key]]
    if config.get("reasoning_template") not in (None, calls.get("template")):
        notes.append("the config's reasoning_template differs from the model's request template "
                     "(editr2_call_defaults.json `template`)")
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Training (one subprocess per arm, resumable)
# ---------------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` folder of a Trainer output directory."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=checkpoint_step) if found else None


def finished_steps(output_dir: Path) -> int:
    """Steps of a finished training run in `output_dir` (final adapters and trainer_state.json written), else 0."""
    state = Path(output_dir) / "trainer_state.json"
    if not (state.is_file() and (Path(output_dir) / ADAPTER_FILE).is_file()):
        return 0
    return int(json.loads(state.read_text()).get("global_step", 0))


def train_command(arm: str, config: Path, model: Path, output_dir: Path, max_steps: int | None) -> list[str]:
    """The training script's command line for `arm`, continuing from the newest checkpoint if there is one."""
    from diffusers_editr2.call_defaults import read_call_defaults

    cmd = [sys.executable, "-m", "trl_editr2.scripts.editr2", "--config", str(config),
           "--model_name_or_path", str(model), "--output_dir", str(output_dir),
           "--trajectory_filter", ARMS[arm]]
    template = (read_call_defaults(model) or {"reference_area": None}).get("template")
    if template is not None and read_config(config).get("reasoning_template") is None:
        cmd += ["--reasoning_template", template]  # rollouts ask the reasoner as the model's inference does
    if max_steps is not None:
        cmd += ["--max_steps", str(max_steps)]
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        cmd += ["--resume_from_checkpoint", str(checkpoint)]
    return cmd


def stop_on_sigterm() -> None:
    """Make `kill` (SIGTERM) of this script unwind like Ctrl-C, so `train_arms` stops the training processes it
    started; otherwise they would train on unseen, and a rerun would train the same arm again beside them."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def train_arms(arms: list[str], args, config_path: Path, model: Path, max_steps: int, run_dir: Path) -> None:
    """Train every unfinished arm, `args.jobs` at a time; a finished arm (>= max_steps) is skipped."""
    todo = []
    for arm in arms:
        done = finished_steps(run_dir / arm)
        if done >= max_steps:
            print(f"[{arm}] finished ({done} steps): skipped")
        else:
            todo.append(arm)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for start in range(0, len(todo), args.jobs):
        batch = todo[start:start + args.jobs]
        procs = []
        for arm in batch:
            cmd = train_command(arm, config_path, model, run_dir / arm, args.max_steps)
            resumed = "--resume_from_checkpoint" in cmd
            print(f"[{arm}] {'resuming' if resumed else 'training'}: {' '.join(cmd)}")
            log = None
            if len(batch) > 1:  # side by side: each arm writes its own log
                log = open(run_dir / f"{arm}.log", "a")
                print(f"[{arm}] log: {run_dir / f'{arm}.log'}")
            procs.append((arm, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None),
                          log))
        failed = []
        try:
            for arm, proc, log in procs:
                if proc.wait() != 0:
                    failed.append(f"{arm} (exit {proc.returncode})")
        finally:  # interrupted (Ctrl-C, or `kill`: see stop_on_sigterm): stop the arms too, not leave them training
            for arm, proc, log in procs:
                if proc.poll() is None:
                    print(f"[{arm}] stopping its training process {proc.pid} (rerun to continue from its checkpoints)")
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                if log is not None:
                    log.close()
        if failed:
            raise RuntimeError(f"Training failed: {', '.join(failed)}. Rerun the same command to continue from the "
                               "newest checkpoints.")


# ---------------------------------------------------------------------------------------------------------------------
# Benching (held-out seeds, the SFT folder plus each arm's adapters)
# ---------------------------------------------------------------------------------------------------------------------


def adapters_dir(output_dir: Path) -> Path | None:
    """The adapters to bench for an arm: the newest of the finished run's and the newest checkpoint's (None if
    neither exists)."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None and not (checkpoint / ADAPTER_FILE).is_file():
        checkpoint = None
    final = finished_steps(output_dir)
    if checkpoint is not None and checkpoint_step(checkpoint) > final:
        return checkpoint
    return Path(output_dir) if final > 0 else None


def adapters_step(directory: Path) -> int:
    """The training step the adapters in `directory` were saved at."""
    if directory.name.startswith("checkpoint-"):
        return checkpoint_step(directory)
    return finished_steps(directory)


def load_adapters(pipe, directory: str | os.PathLike) -> list[str]:
    """Load an EditR2Trainer output's adapters onto `pipe` as docs/trainer.md says: the transformer LoRA with
    `pipe.load_lora_weights(dir)`, the reasoning LoRA with `pipe.load_reasoning_lora(dir + "/reasoning_lora")`.

    Returns:
        `list[str]`: what was loaded ("transformer", "reasoning").
    """
    directory = Path(directory)
    loaded = []
    if (directory / ADAPTER_FILE).is_file():
        pipe.load_lora_weights(str(directory))
        loaded.append("transformer")
    if (directory / REASONING_DIR / "adapter_config.json").is_file():
        pipe.load_reasoning_lora(str(directory / REASONING_DIR))
        loaded.append("reasoning")
    if not loaded:
        raise ValueError(f"{directory} holds no adapters ({ADAPTER_FILE} or {REASONING_DIR}/): pass an EditR2Trainer "
                         "output_dir or one of its checkpoint-N folders.")
    return loaded


def load_editor(model: str | os.PathLike, adapters: str | os.PathLike | None = None, reasoning: str = "intent",
                seed: int = 0):
    """`load_bench_editor(model, reasoning, seed)`, with the adapters of `adapters` (an EditR2Trainer output)
    loaded when given: the only difference between the SFT editor and an RL arm's."""
    from diffusers_editr2.bench import load_bench_editor

    editor = load_bench_editor(model, reasoning=reasoning, seed=seed)
    if adapters is not None:
        loaded = load_adapters(editor.pipe, adapters)
        editor.name = f"{editor.name}+{'+'.join(loaded)}-lora"
    return editor


def bench(model: Path, adapters: Path | None, args) -> dict:
    """`{family: run_bench result}` of the SFT folder (with `adapters` loaded, when given)."""
    from editr2.bench.shapes.runner import run_bench

    results = {}
    for family in args.families:
        editor = load_editor(model, adapters, seed=args.seed)  # fresh per family: no state carried across
        results[family] = run_bench(editor, family=family, num_sessions=args.sessions, num_turns=args.turns,
                                    seed=args.seed, size=args.size, progress=not args.no_progress)
    return results


def bench_arm(arm: str, model: Path, args, run_dir: Path) -> dict | None:
    """Bench `arm` ("sft" or a trained arm), reusing `RUN_DIR/bench/<arm>.json` when nothing changed.

    Returns:
        `{"arm", "step", "adapters", "families": {family: run_bench result}}`, or None for an arm with no adapters.
    """
    adapters = None if arm == "sft" else adapters_dir(run_dir / arm)
    if arm != "sft" and adapters is None:
        print(f"[{arm}] no adapters yet: not benched")
        return None
    key = {"model": str(model), "adapters": str(adapters) if adapters else None,
           "step": adapters_step(adapters) if adapters else 0,
           "adapters_mtime": (adapters / ADAPTER_FILE).stat().st_mtime_ns if adapters else None,
           "families": list(args.families), "sessions": args.sessions, "size": args.size, "turns": args.turns,
           "seed": args.seed, "reasoning": "intent"}
    cache = run_dir / "bench" / f"{arm}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            print(f"[{arm}] bench cached: {cache}")
            return saved["result"]
    start = time.perf_counter()
    result = {"arm": arm, "step": key["step"], "adapters": key["adapters"], "families": bench(model, adapters, args)}
    result["seconds"] = time.perf_counter() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    print(f"[{arm}] benched in {result['seconds']:.0f} s")
    return result


def pool_families(families: dict) -> list[dict]:
    """Per-turn rows of several `run_bench` results, averaged over all their sessions (weights: session counts)."""
    pooled: dict[int, dict] = {}
    for result in families.values():
        weight = result["config"]["sessions"]
        for row in result["per_turn"]:
            acc = pooled.setdefault(row["turn"], {"turn": row["turn"], "_w": 0, **{m: 0.0 for m in METRICS}})
            acc["_w"] += weight
            for m in METRICS:
                acc[m] += weight * row[m]
    rows = []
    for turn in sorted(pooled):
        acc = pooled[turn]
        rows.append({"turn": turn, **{m: acc[m] / acc["_w"] for m in METRICS}})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Targets and report
# ---------------------------------------------------------------------------------------------------------------------


def late_reward(per_turn: list[dict], turns=LATE_TURNS) -> float:
    """Mean reward over `turns` (those the rows have; NaN if none)."""
    values = [row["reward"] for row in per_turn if row["turn"] in turns]
    return sum(values) / len(values) if values else float("nan")


def compute_targets(per_turn: dict[str, list[dict]], gain: float = TARGET_GAIN) -> dict:
    """The demonstration's two targets from per-turn rows by arm (`{"sft": [...], "rl": [...], "rl_nofilter": [...]}`).

    Returns:
        `{"late": {arm: mean reward over turns 2-3}, "rl_gain", "rl_gain_met", "filter_margin", "filter_met",
        "rl_wins"}`: `rl_gain = late[rl] - late[sft]` (met when >= `gain`), `filter_margin = late[rl] -
        late[rl_nofilter]` (met when >= 0); a value is None where an arm is missing, and `rl_wins` is True only when
        both targets are met.
    """
    late = {arm: late_reward(rows) for arm, rows in per_turn.items()}

    def diff(a: str, b: str) -> float | None:
        if a not in late or b not in late or math.isnan(late[a]) or math.isnan(late[b]):
            return None
        return late[a] - late[b]

    rl_gain, filter_margin = diff("rl", "sft"), diff("rl", "rl_nofilter")
    rl_gain_met = None if rl_gain is None else rl_gain >= gain - TOLERANCE
    filter_met = None if filter_margin is None else filter_margin >= -TOLERANCE
    return {"late": late, "rl_gain": rl_gain, "rl_gain_met": rl_gain_met, "filter_margin": filter_margin,
            "filter_met": filter_met, "rl_wins": bool(rl_gain_met and filter_met)}


def training_log(output_dir: Path) -> list[dict]:
    """The per-step log entries (those with a `reward`) of an arm: its final trainer_state.json, else the newest
    checkpoint's."""
    candidates = [Path(output_dir) / "trainer_state.json"]
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        candidates.append(checkpoint / "trainer_state.json")
    states = [json.loads(p.read_text()) for p in candidates if p.is_file()]
    if not states:
        return []
    state = max(states, key=lambda s: s.get("global_step", 0))
    return [e for e in state.get("log_history", []) if e.get("reward") is not None and "step" in e]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def write_plot(path: Path, logs: dict[str, list[dict]], per_turn: dict[str, list[dict]]) -> None:
    """Training reward vs step (overall and per turn) for each arm, and held-out per-turn reward and IF bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sft": "tab:gray", "rl": "tab:blue", "rl_nofilter": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    for arm, entries in logs.items():
        steps, rewards = [e["step"] for e in entries], [e["reward"] for e in entries]
        ax.plot(steps, rewards, color=colors.get(arm), alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(rewards, 10), color=colors.get(arm), marker="." if len(steps) < 30 else None,
                label=f"{LABELS.get(arm, arm)} (mean of 10)")
    ax.set(title="training reward (rollouts)", xlabel="step", ylabel="reward")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    for arm, entries in logs.items():
        keys = {k for e in entries for k in e if k.startswith("rewards/turn_")}  # rewards/turn_{k}/mean
        turns = sorted(int(k.split("/")[1].split("_")[1]) for k in keys)
        for turn, style in zip(turns, ("-", "--", ":", "-.")):
            pts = [(e["step"], e[f"rewards/turn_{turn}/mean"]) for e in entries if f"rewards/turn_{turn}/mean" in e]
            if pts:
                ax.plot([p[0] for p in pts], smooth([p[1] for p in pts], 10), style, color=colors.get(arm),
                        marker="." if len(pts) < 30 else None, label=f"{arm} turn {turn}")
    ax.set(title="training reward per turn (mean of 10)", xlabel="step", ylabel="reward")
    ax.legend(fontsize=7, ncol=2)

    for ax, metric in ((axes[1][0], "reward"), (axes[1][1], "IF")):
        arms = list(per_turn)
        turns = sorted({row["turn"] for rows in per_turn.values() for row in rows})
        width = 0.8 / max(1, len(arms))
        for i, arm in enumerate(arms):
            values = {row["turn"]: row[metric] for row in per_turn[arm]}
            ax.bar([t + (i - (len(arms) - 1) / 2) * width for t in turns], [values.get(t, 0.0) for t in turns], width,
                   color=colors.get(arm), label=LABELS.get(arm, arm))
        top = max([row[metric] for rows in per_turn.values() for row in rows] + [0.04])
        ax.set(title=f"held-out {metric} per turn", xlabel="turn", ylabel=metric, xticks=turns, ylim=(0, 1.2 * top))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it."""
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def per_turn_table(rows_by_name: dict[str, list[dict]], names: dict[str, str]) -> list[str]:
    """A markdown table: one row per entry, `t1 / t2 / ...` per metric, and the mean reward over turns 2-3."""
    turns = max((len(rows) for rows in rows_by_name.values()), default=0)
    header = " / ".join(f"t{t}" for t in range(1, turns + 1))
    lines = ["| arm | " + " | ".join(f"{m} {header}" for m in METRICS) + " | reward turns 2-3 |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for key, rows in rows_by_name.items():
        cells = [" / ".join(fmt(row[m], 2) for row in rows) for m in METRICS]
        lines.append(f"| {names[key]} | " + " | ".join(cells) + f" | {fmt(late_reward(rows))} |")
    return lines


def verdict(value: bool | None) -> str:
    return "n/a (arm missing)" if value is None else "**met**" if value else "**not met**"


def write_report(path: Path, benches: dict[str, dict], logs: dict[str, list[dict]], targets: dict, context: dict
                 ) -> None:
    """The demo's report (`--out-md`): protocol, per-turn table (pooled and per family), targets, training
    summary, plot."""
    per_turn = {arm: pool_families(b["families"]) for arm, b in benches.items()}
    plot = path.with_suffix(".png")
    args = context["args"]
    lines = [
        "# RL demonstration: SFT vs Edit-R2 RL vs RL without filtering (MICE-Shapes)",
        "",
        f"Written by `{context['command']}` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- SFT model: `{context['model']}`; RL arms trained from it with `{context['config']}` "
        f"(LoRA on the transformer and the text encoder, KL to the adapter-off SFT model), one subprocess of "
        f"`trl_editr2/scripts/editr2.py` per arm, `trajectory_filter` if_zero (rl) and none (rl_nofilter).",
        f"- Training: MICE-Shapes training seeds from {context['train_seed']:,} ({context['train_family']}); "
        f"held-out bench: seeds {args.seed}..{args.seed + args.sessions - 1}, {args.sessions} sessions x "
        f"{args.turns} turns per family ({', '.join(args.families)}) at {args.size} px, intent mode, the model "
        "folder's call defaults, each turn continuing from the previous turn's carried latent; the RL editors are the "
        "same folder with the arm's adapters loaded (`load_lora_weights(dir)`, "
        "`load_reasoning_lora(dir/reasoning_lora)`).",
        "",
        f"## Per turn ({' + '.join(args.families)} pooled)",
        "",
        *per_turn_table(per_turn, {arm: f"{LABELS.get(arm, arm)} at step {benches[arm]['step']}" if arm != "sft"
                                   else LABELS["sft"] for arm in per_turn}),
        "",
        "## Targets",
        "",
        f"- RL beats SFT by >= {TARGET_GAIN} mean reward over turns 2-3: RL - SFT = {fmt(targets['rl_gain'], 4)} "
        f"({fmt(targets['late'].get('rl'))} vs {fmt(targets['late'].get('sft'))}): {verdict(targets['rl_gain_met'])}",
        f"- Filtering at least as good as no filtering (turns 2-3): RL - RL without filtering = "
        f"{fmt(targets['filter_margin'], 4)} ({fmt(targets['late'].get('rl'))} vs "
        f"{fmt(targets['late'].get('rl_nofilter'))}): {verdict(targets['filter_met'])}",
        "",
        ("RL wins: ship the `rl` arm's adapters (`" + shown(benches["rl"]["adapters"]) + "`) as the default (fuse "
         "them into the SFT folder and re-export)." if targets["rl_wins"] else
         "RL does not win on both targets: the SFT model stays the default."),
        "",
        "## Per family",
        "",
        *per_turn_table({(arm, fam): b["families"][fam]["per_turn"] for arm, b in benches.items()
                         for fam in b["families"]},
                        {(arm, fam): f"{fam}: {LABELS.get(arm, arm)}" for arm, b in benches.items()
                         for fam in b["families"]}),
        "",
        "## Training",
        "",
        "| arm | steps | s / step (mean) | training time | reward, first 10 steps | reward, last 10 steps | "
        "filtered samples (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, entries in logs.items():
        if not entries:
            continue
        seconds = [e.get("timing/step", float("nan")) for e in entries]
        rewards = [e["reward"] for e in entries]
        filtered = [e.get("filter/frac_filtered", float("nan")) for e in entries]
        lines.append(f"| {LABELS.get(arm, arm)} | {entries[-1]['step']} | {fmt(sum(seconds) / len(seconds), 1)} | "
                     f"{fmt(sum(seconds) / 60, 0)} min | {fmt(sum(rewards[:10]) / len(rewards[:10]))} | "
                     f"{fmt(sum(rewards[-10:]) / len(rewards[-10:]))} | {fmt(sum(filtered) / len(filtered), 2)} |")
    lines += ["", f"![reward vs step and per-turn metrics]({plot.name})", ""]
    if context["notes"]:
        lines += ["## Caveats", "", *[f"- {note}" for note in context["notes"]], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    write_plot(plot, logs, per_turn)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SFT pipeline folder (default: the config's model_name_or_path)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training YAML of both arms")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "rl_demo"), help="arms' output_dirs and bench cache")
    parser.add_argument("--sessions", type=int, default=100, help="held-out sessions per family")
    parser.add_argument("--turns", type=int, default=3, help="turns per held-out session")
    parser.add_argument("--seed", type=int, default=0, help="first held-out session seed (and the sampling seed)")
    parser.add_argument("--size", type=int, default=None,
                        help="held-out image size (default: the model's call-default height, else the config's)")
    parser.add_argument("--families", default="cm,cu", help="comma-separated MICE-Shapes families to bench")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to train ({', '.join(ARMS)})")
    parser.add_argument("--jobs", type=int, default=1, help="arms trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest here)")
    parser.add_argument("--out-md", default=str(REPO / "runs" / "rl_demo" / "results_rl.md"),
                        help="report (plot: same stem .png); docs/results_rl.md is the study's page (rl_page)")
    parser.add_argument("--skip-train", action="store_true", help="bench the arms' newest adapters, train nothing")
    parser.add_argument("--no-progress", action="store_true", help="hide the bench progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or args.sessions < 1 or args.turns < 1 or args.jobs < 1 or not set(args.families) <= set(FAMILIES):
        raise ValueError(f"Pass --arms from {list(ARMS)} (got {unknown or arms}), --families from {list(FAMILIES)} "
                         f"(got {args.families}), and --sessions, --turns, --jobs >= 1.")

    import torch

    torch.set_num_threads(args.threads)
    config_path = Path(args.config).resolve()
    config = read_config(config_path)
    model = resolve_model(args.model, config)
    max_steps = args.max_steps if args.max_steps is not None else int(config.get("max_steps", 0))
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps}: set max_steps in {config_path} or pass --max-steps N (N >= 1).")
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    notes = call_default_mismatches(model, config)
    if args.size is None:
        from diffusers_editr2.call_defaults import read_call_defaults

        args.size = int((read_call_defaults(model) or {"reference_area": None}).get("height") or config.get("shapes_size", 64))
    for note in notes:
        print(f"warning: {note}")

    # 1. SFT bench; 2. training; 3. arm benches (each step reuses finished work)
    benches = {"sft": bench_arm("sft", model, args, run_dir)}
    if not args.skip_train:
        stop_on_sigterm()
        train_arms(arms, args, config_path, model, max_steps, run_dir)
    for arm in arms:
        result = bench_arm(arm, model, args, run_dir)
        if result is not None:
            benches[arm] = result
            if result["step"] < max_steps:
                notes.append(f"arm {arm} is benched at step {result['step']} of {max_steps} (training unfinished).")

    # 4. Report
    per_turn = {arm: pool_families(b["families"]) for arm, b in benches.items()}
    targets = compute_targets(per_turn)
    logs = {arm: training_log(run_dir / arm) for arm in arms}
    context = {"command": "python -m recipes.shapes_tiny.rl_demo " + " ".join(argv if argv is not None else sys.argv[1:]),
               "model": shown(model), "config": shown(config_path), "train_seed": int(config.get("shapes_seed", 0)),
               "train_family": config.get("shapes_family", "cm"), "args": args, "notes": notes}
    out_md = Path(args.out_md)
    write_report(out_md, benches, logs, targets, context)
    print(f"wrote {out_md} and {out_md.with_suffix('.png')}")
    print(json.dumps({k: targets[k] for k in ("rl_gain", "rl_gain_met", "filter_margin", "filter_met", "rl_wins")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

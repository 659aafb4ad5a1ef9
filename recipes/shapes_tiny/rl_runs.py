"""One (arm, seed) of the RL study: train it (resumable), bench it on the held-out sessions, and write its small,
committable results.

    python -m recipes.shapes_tiny.rl_runs --arm rl --seed 0            # train (or resume), bench 3 and 6 turns, write
    python -m recipes.shapes_tiny.rl_runs --arm sft --seed 1           # the untrained SFT model: bench only
    python -m recipes.shapes_tiny.rl_runs --arm shipped --seed 1 --turns 3   # the shipped default folder: bench only
    python -m recipes.shapes_tiny.rl_runs --arm rl --seed 1 --turns 3 --prompts gold   # the editor alone, gold intents
    python -m recipes.shapes_tiny.rl_runs --arm rl_nofilter --seed 2 --device cuda   # on a GPU
    python -m recipes.shapes_tiny.rl_page                              # docs/results_rl.md from the committed results

Arms: `sft` (the SFT model the RL runs start from, no training), `rl` (Edit-R2 RL, `trajectory_filter: if_zero`) and
`rl_nofilter` (the same without trajectory filtering), each with seeds 0, 1, 2 (`recipes/shapes_tiny/rl_study.sh`
runs all nine);
`rl_noise13` is `rl` at the paper's SDE noise level 1.3 (`ARM_SETTINGS`), an ablation of the config's level.
`shipped` benches the shipped default folder (`checkpoints/editr2-shapes-tiny`) on the same sessions: with an RL run's
adapters fused into it and the run's seed, the page pairs it with that run to measure what fusing in half precision
changes.

0. Nothing runs when the committed results of (arm, seed) are complete for the command: run.json at the config's
   steps and settings, a bench file per turn count on the same held-out sessions, benched with the committed adapters
   (and with the run folder's, when it holds a finished run). `--check` only says so (exit 0) or names what is
   missing (exit 3). A run whose adapters are committed at the config's steps is not trained again.
1. Train (RL arms): `trl_editr2/scripts/editr2.py --config CONFIG` (`configs/rl/study.yaml`: 8 sessions per step,
   G = 6, 3 turns, the paper's clip / KL / noise / SDE window, global-std advantages, LoRA on the editor and the
   reasoner), with `--seed N`, the arm's `trajectory_filter`, and `--output_dir RUN_DIR/ARM/seedN`. Rerunning the
   same command continues from the newest `checkpoint-N` (every `save_steps`); a finished run is not trained again.
2. Bench: the SFT folder with the run's adapters loaded (`load_lora_weights`, `load_reasoning_lora`), on the same
   held-out sessions for every arm and seed: `--sessions` per family (seeds `--bench-seed`, `--bench-seed + 1`, ...),
   once with 3 turns and once with 6 (`--turns 3,6`), intent mode, the model folder's call defaults; the bench's
   sampling seed is the run's seed (so the three SFT "seeds" differ by sampling noise only). Per-session results go
   to `RUN_DIR/ARM/seedN/bench/...jsonl` as they finish: an interrupted bench resumes; more `--sessions` adds sessions.
3. Write `RESULTS/ARM/seedN/` (`docs/rl_runs/` by default, meant to be committed):
   - `adapters/` (RL arms): the finished run's adapters, a few MB: `pytorch_lora_weights.safetensors`
     (`pipe.load_lora_weights`), `reasoning_lora/` (`pipe.load_reasoning_lora`) and `editr2_config.json`; their sha256
     is in every `bench_t{T}.json`, so the benched weights are the committed ones. `--skip-train` on a clone without
     the run folder benches these again; `python -m recipes.shapes_tiny.export --adapters` fuses them;
   - `bench_t{T}.json`: per family the per-turn means and every session's per-turn IF / CC / GA / reward (4 decimals;
     what the page pairs by session);
   - `trainer_state.json`: the Trainer's state with its per-step log (reward, per-turn reward, filter statistics,
     KL, timings; the other keys left out to keep it small);
   - `run.json`: arm, seed, steps, the training config, the command, training seconds (the logged steps' sum).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.shapes_tiny.rl_demo import (
    ADAPTER_FILE,
    REASONING_DIR,
    finished_steps,
    latest_checkpoint,
    load_adapters,
    read_config,
    resolve_model,
    stop_on_sigterm,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "recipes" / "shapes_tiny" / "configs" / "rl" / "study.yaml"
DEFAULT_RESULTS = REPO / "docs" / "rl_runs"
DEFAULT_RUN_DIR = REPO / "runs" / "rl"

# arm -> trajectory_filter of its training run; None: a bench-only arm ("sft" is the config's model, the RL runs'
# base; "shipped" the shipped default folder, e.g. an RL run's adapters fused into it)
ARMS = {"sft": None, "rl": "if_zero", "rl_nofilter": "none", "rl_noise13": "if_zero", "shipped": None}
SHIPPED_MODEL = "checkpoints/editr2-shapes-tiny"
# arm -> training settings over the config's: rl_noise13 is RL at the paper's noise level (1.3, set for 15 steps)
ARM_SETTINGS = {"rl_noise13": {"noise_level": 1.3}}
FAMILIES = ("cm", "cu")
METRICS = ("IF", "CC", "GA", "reward")
COMMITTED_ADAPTERS = "adapters"  # RESULTS/ARM/seedN/adapters: the finished run's adapters
ADAPTER_EXTRAS = ("editr2_config.json",)  # copied beside the adapters: how they were trained
# the per-step log keys kept in the committed trainer_state.json (exact names, or prefixes ending in "/")
LOG_KEYS = ("step", "epoch", "loss", "reward", "reward_std", "kl", "learning_rate", "grad_norm", "skipped_steps",
            "advantages/std_samples", "frac_reward_zero_std", "rewards/", "filter/", "reasoning/", "clip_ratio/",
            "timing/step", "timing/rollout", "timing/learn", "timing/reward")


# ---------------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------------


def run_folder(root: str | os.PathLike, arm: str, seed: int) -> Path:
    """`ROOT/ARM/seedN`: the training output_dir and bench caches (run dir) or the committed results (results dir)."""
    return Path(root) / arm / f"seed{seed}"


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def template_flags(model: Path, config: Path) -> list[str]:
    """`--reasoning_template T` with the model folder's request template when the config sets none, so the rollouts
    ask the reasoner as the model's inference does."""
    from diffusers_editr2.call_defaults import read_call_defaults

    template = (read_call_defaults(model) or {"reference_area": None}).get("template")
    return ["--reasoning_template", template] if template is not None and \
        read_config(config).get("reasoning_template") is None else []


def train_command(arm: str, seed: int, config: Path, model: Path, output_dir: Path, args) -> list[str]:
    """The training script's command line for (arm, seed), continuing from the newest checkpoint if there is one."""
    cmd = [sys.executable, "-m", "trl_editr2.scripts.editr2", "--config", str(config),
           "--model_name_or_path", str(model), "--output_dir", str(output_dir), "--seed", str(seed),
           "--trajectory_filter", ARMS[arm]]
    for key, value in ARM_SETTINGS.get(arm, {}).items():
        cmd += [f"--{key}", str(value)]
    cmd += template_flags(model, config)
    if args.max_steps is not None:
        cmd += ["--max_steps", str(args.max_steps)]
    if args.sessions_per_step is not None:
        cmd += ["--per_device_train_batch_size", str(args.sessions_per_step)]
    if args.device == "cuda":
        cmd += ["--use_cpu", "false"]
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        cmd += ["--resume_from_checkpoint", str(checkpoint)]
    return cmd


def train(arm: str, seed: int, config_path: Path, model: Path, max_steps: int, run: Path, args) -> float:
    """Train (arm, seed) into `run` unless it is finished; returns the seconds this call trained."""
    done = finished_steps(run)
    if done >= max_steps:
        print(f"[{arm} seed {seed}] finished ({done} steps): not trained again")
        return 0.0
    cmd = train_command(arm, seed, config_path, model, run, args)
    print(f"[{arm} seed {seed}] {'resuming' if '--resume_from_checkpoint' in cmd else 'training'}: {' '.join(cmd)}",
          flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    finally:  # interrupted (Ctrl-C or `kill`): stop the training process too; a rerun continues from its checkpoint
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        raise RuntimeError(f"Training {arm} seed {seed} failed (exit {code}); rerun the same command to continue "
                           "from the newest checkpoint.")
    return time.perf_counter() - start


def final_adapters(run: Path, out: Path | None = None) -> tuple[Path, int]:
    """The finished run's adapters folder and its step. Without a finished run in `run`, the committed copy in
    `out/adapters` (with the step its `run.json` names) when there is one; else an error naming what to do."""
    step = finished_steps(run)
    if step >= 1 and (run / ADAPTER_FILE).is_file():
        return run, step
    committed = committed_step(out) if out is not None else 0
    if committed >= 1:
        return out / COMMITTED_ADAPTERS, committed
    newest = latest_checkpoint(run)
    raise RuntimeError(f"{run} holds no finished training run (newest checkpoint: {newest}) and {out} no committed "
                       "adapters; rerun the command without --skip-train to finish it.")


def committed_step(out: Path) -> int:
    """The step of the adapters committed in `out/adapters` (its `run.json`'s), 0 without them."""
    if not ((out / COMMITTED_ADAPTERS / ADAPTER_FILE).is_file() and (out / "run.json").is_file()):
        return 0
    return int(json.loads((out / "run.json").read_text()).get("step", 0))


def run_config(config: dict, args, max_steps: int) -> dict:
    """The training config a run records in its run.json: the YAML's, the arm's settings and the command's
    overrides (steps only for trained arms)."""
    trained = ARMS[args.arm] is not None
    return {**config, **ARM_SETTINGS.get(args.arm, {}), **({"max_steps": max_steps} if trained else {}),
            **({"per_device_train_batch_size": args.sessions_per_step} if args.sessions_per_step else {})}


def missing_results(out: Path, args, config: dict, max_steps: int, run: Path) -> str:
    """What the committed results in `out` lack for this command (empty when they are complete): run.json at the
    config's steps and settings, a bench file per turn count on the same held-out sessions, benched with the adapters
    that are committed and, when the run folder holds a finished run, with its adapters."""
    if not (out / "run.json").is_file():
        return "no run.json"
    info = json.loads((out / "run.json").read_text())
    trained = ARMS[args.arm] is not None
    if info.get("step") != (max_steps if trained else 0):
        return f"step {info.get('step')} committed, {max_steps if trained else 0} asked"
    ignored = ("model_name_or_path", "output_dir")  # the model is checked by the bench's adapters, the folder moves
    wanted = run_config(config, args, max_steps)
    changed = sorted(k for k in set(wanted) | set(info.get("config", {}))
                     if k not in ignored and info.get("config", {}).get(k) != wanted.get(k))
    if changed:
        return f"config changed since: {', '.join(changed)}"
    local = adapters_fingerprint(run) if trained and finished_steps(run) >= 1 else None
    committed = adapters_fingerprint(out / COMMITTED_ADAPTERS) if (out / COMMITTED_ADAPTERS).is_dir() else None
    if local is not None and committed is None:
        return "the finished run's adapters are not committed"
    for turns in args.turns:
        path = out / bench_name(turns, args.prompts)
        if not path.is_file():
            return f"no {path.name}"
        bench = json.loads(path.read_text())
        if (bench.get("sessions_per_family"), bench.get("bench_seed"), bench.get("size")) != \
                (args.sessions, args.bench_seed, args.size) or not set(args.families) <= set(bench["families"]):
            return f"{path.name} holds other held-out sessions"
        benched = bench.get("adapters_sha256")
        if benched is None and committed is not None:
            return f"{path.name} does not name the adapters it benched"
        if benched is not None and any(f not in (None, benched) for f in (local, committed)):
            return f"{path.name} was benched with other adapters"
    return ""


def commit_adapters(adapters: Path, out: Path) -> Path:
    """Copy a finished run's adapters (the transformer LoRA, `reasoning_lora/`, the training config; no base weights)
    to `out/adapters`, replacing an older copy only once the new one is complete. A no-op when `adapters` is that
    copy already."""
    dest = out / COMMITTED_ADAPTERS
    if adapters.resolve() == dest.resolve():
        return dest
    staging = out / f".{COMMITTED_ADAPTERS}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(adapters / ADAPTER_FILE, staging / ADAPTER_FILE)
    if (adapters / REASONING_DIR).is_dir():
        shutil.copytree(adapters / REASONING_DIR, staging / REASONING_DIR)
    for name in ADAPTER_EXTRAS:
        if (adapters / name).is_file():
            shutil.copy2(adapters / name, staging / name)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# Bench
# ---------------------------------------------------------------------------------------------------------------------


def load_editor(model: Path, adapters: Path | None, seed: int, device: str | None, prompts: str = "instruction"):
    """The bench editor of the SFT folder, with `adapters` (an EditR2Trainer output) loaded when given: intent mode,
    or with `prompts="gold"` the editor alone, prompted with each turn's gold intent (reasoning "none")."""
    from diffusers_editr2.bench import load_bench_editor

    gold = prompts == "gold"
    editor = load_bench_editor(model, reasoning="none" if gold else "intent", seed=seed, device=device,
                               prompts=prompts)
    if adapters is not None:
        loaded = load_adapters(editor.pipe, adapters)
        editor.name = f"{editor.name}+{'+'.join(loaded)}-lora"
    return editor


def adapters_fingerprint(adapters: Path | None) -> str | None:
    """sha256 of the adapters' weight files (the transformer LoRA and `reasoning_lora/`), so a retrained run is benched
    again even at the same step."""
    if adapters is None:
        return None
    from editr2.bench.resume import weights_fingerprint

    return weights_fingerprint([adapters / ADAPTER_FILE, *sorted((adapters / "reasoning_lora").glob("*.safetensors"))])


def session_rows(results_path: Path, family: str, count: int, first: int) -> list[dict]:
    """The compact per-session rows of the asked sessions from a bench results file (`editr2.bench.resume`):
    `{"id", "seed", "scores": [[IF, CC, GA, reward] per turn]}`, plus `"exact": [1 if the intent written equals the
    gold intent else 0, per turn]` when the editor recorded both (intent mode)."""
    from editr2.bench.resume import latest_by_id, read_results
    from editr2.bench.shapes.runner import session_id

    by_id = latest_by_id(read_results(results_path))
    rows = []
    for seed in range(first, first + count):
        record = by_id[session_id(family, seed)]
        row = {"id": record["session_id"], "seed": record["seed"],
               "scores": [[round(float(t[m]), 4) for m in METRICS] for t in record["turns"]]}
        written = (record.get("editor_record") or {}).get("intent")
        gold = (record.get("editor_record") or {}).get("gold_intent")
        if written and gold and len(written) == len(gold) == len(record["turns"]):
            row["exact"] = [int(w == g) for w, g in zip(written, gold)]
        rows.append(row)
    return rows


def bench_name(turns: int, prompts: str = "instruction") -> str:
    """`bench_t{T}.json`, or `bench_gold_t{T}.json` for the editor alone on gold intents."""
    return f"bench_gold_t{turns}.json" if prompts == "gold" else f"bench_t{turns}.json"


def bench_setting(arm: str, seed: int, step: int, turns: int, model: Path, adapters: Path | None, run: Path,
                  args) -> dict:
    """Bench one turn count on every family: `{"families": {family: {"per_turn", "mean", "sessions"}}, ...}`."""
    gold = args.prompts == "gold"
    from editr2.bench.resume import ConfigMismatchError, model_fingerprint, open_run
    from editr2.bench.shapes.runner import run_bench

    families = {}
    for family in args.families:
        config = {"model": model_fingerprint(model), "adapters": adapters_fingerprint(adapters), "step": step,
                  "family": family, "turns": turns, "bench_seed": args.bench_seed, "sampling_seed": seed,
                  "size": args.size, "reasoning": "none" if gold else "intent",
                  **({"prompts": "gold"} if gold else {})}
        folder = run / "bench" / f"step{step}_t{turns}_{family}{'_gold' if gold else ''}"
        try:
            cache = open_run(folder, config)
        except ConfigMismatchError as error:  # e.g. the run was trained again: its old sessions are stale
            print(f"[{arm} seed {seed}] benching {folder} again: {error}")
            cache = open_run(folder, config, force=True)
        editor = load_editor(model, adapters, seed, args.device if args.device == "cuda" else None, args.prompts)
        result = run_bench(editor, family=family, num_sessions=args.sessions, num_turns=turns, seed=args.bench_seed,
                           size=args.size, progress=not args.no_progress, results_path=cache / "results.jsonl")
        families[family] = {"per_turn": result["per_turn"], "mean": result["mean"],
                            "sessions": session_rows(cache / "results.jsonl", family, args.sessions, args.bench_seed)}
    return {"arm": arm, "seed": seed, "step": step, "turns": turns, "sessions_per_family": args.sessions,
            "adapters_sha256": adapters_fingerprint(adapters), "bench_seed": args.bench_seed, "sampling_seed": seed,
            "size": args.size, "reasoning": "none" if gold else "intent", "prompts": args.prompts,
            "metrics": list(METRICS), "families": families}


# ---------------------------------------------------------------------------------------------------------------------
# Committed results
# ---------------------------------------------------------------------------------------------------------------------


COMPACT_LISTS = ("sessions", "log_history")  # their items are written one per line


def dumps(data: dict) -> str:
    """`data` as indented JSON, except that the items of `COMPACT_LISTS` lists are written one per line."""
    rows: dict[str, str] = {}

    def mark(obj, compact: bool = False):
        if compact:
            key = f"@@row{len(rows)}@@"
            rows[key] = json.dumps(obj, separators=(", ", ": "))
            return key
        if isinstance(obj, dict):
            return {k: [mark(v, True) for v in item] if k in COMPACT_LISTS and isinstance(item, list) else mark(item)
                    for k, item in obj.items()}
        if isinstance(obj, list):
            return [mark(v) for v in obj]
        return obj

    text = json.dumps(mark(data), indent=1)
    for key, row in rows.items():
        text = text.replace(f'"{key}"', row, 1)
    return text + "\n"


def write_json(path: Path, data: dict) -> None:
    """Write `data` (`dumps`) atomically."""
    from editr2.bench.resume import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, dumps(data))


def kept_log_entry(entry: dict) -> dict:
    """The `LOG_KEYS` of one `log_history` entry."""
    return {k: v for k, v in entry.items()
            if k in LOG_KEYS or any(k.startswith(p) for p in LOG_KEYS if p.endswith("/"))}


def trimmed_state(run: Path) -> dict:
    """The run's final `trainer_state.json` with each log entry cut to `LOG_KEYS`."""
    state = json.loads((run / "trainer_state.json").read_text())
    state["log_history"] = [kept_log_entry(e) for e in state.get("log_history", [])]
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", required=True, choices=list(ARMS),
                        help="sft or shipped (bench only), rl, rl_nofilter or rl_noise13")
    parser.add_argument("--seed", type=int, required=True, help="training seed (and the bench's sampling seed)")
    parser.add_argument("--model", default=None, help="SFT pipeline folder (default: the config's model_name_or_path)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training YAML")
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="training outputs and bench caches")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="committed results folder")
    parser.add_argument("--sessions", type=int, default=200, help="held-out sessions per family and turn count")
    parser.add_argument("--turns", default="3,6", help="comma-separated turn counts of the held-out sessions")
    parser.add_argument("--families", default="cm,cu", help="comma-separated MICE-Shapes families")
    parser.add_argument("--bench-seed", type=int, default=0, help="first held-out session seed")
    parser.add_argument("--size", type=int, default=None, help="held-out image size (default: the model's)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--sessions-per-step", type=int, default=None,
                        help="override the config's per_device_train_batch_size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train and bench")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-train", action="store_true", help="bench the finished run, train nothing")
    parser.add_argument("--prompts", default="instruction", choices=["instruction", "gold"],
                        help="gold: bench the editor alone, every turn prompted with its gold intent (reasoning "
                             "none), into bench_gold_t{T}.json; run.json is left as the main bench wrote it")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the committed results are complete for these flags (exit 0) or what "
                             "they lack (exit 3); loads no model")
    parser.add_argument("--no-progress", action="store_true", help="hide the bench progress bars")
    return parser


def parse_args(argv: list[str] | None):
    """Parsed flags, checked before any model loads."""
    args = build_parser().parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    try:
        args.turns = [int(t) for t in args.turns.split(",") if t]
    except ValueError:
        raise ValueError(f"--turns {args.turns!r}: pass comma-separated integers, e.g. 3,6") from None
    if not args.families or not set(args.families) <= set(FAMILIES):
        raise ValueError(f"--families: pass a comma-separated subset of {list(FAMILIES)} (got {args.families}).")
    if not args.turns or min(args.turns) < 1 or args.sessions < 1 or args.threads < 1:
        raise ValueError("--turns, --sessions and --threads must be >= 1.")
    if any(value is not None and value < 1 for value in (args.max_steps, args.sessions_per_step)):
        raise ValueError("--max-steps and --sessions-per-step must be >= 1.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    config_path = Path(args.config).resolve()
    config = read_config(config_path)
    trained = ARMS[args.arm] is not None
    model_name = args.model or (SHIPPED_MODEL if args.arm == "shipped" else config.get("model_name_or_path"))
    model = resolve_model(model_name, config)
    if args.size is None:
        from diffusers_editr2.call_defaults import read_call_defaults

        args.size = int((read_call_defaults(model) or {"reference_area": None}).get("height")
                        or config.get("shapes_size", 64))
    max_steps = args.max_steps if args.max_steps is not None else int(config.get("max_steps", 0))
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps}: set max_steps in {config_path} or pass --max-steps N (N >= 1).")
    run = run_folder(args.run_dir, args.arm, args.seed).resolve()
    out = run_folder(args.results, args.arm, args.seed)
    missing = missing_results(out, args, config, max_steps, run)
    if args.check:
        print(f"[{args.arm} seed {args.seed}] {'to do: ' + missing if missing else 'complete'} ({out})")
        return 3 if missing else 0
    if not missing:
        print(f"[{args.arm} seed {args.seed}] the committed results in {out} are complete: nothing to do")
        return 0
    run.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()
    seconds, adapters, step = 0.0, None, 0
    if trained:
        # a run whose adapters are committed at the config's steps is not trained again, its run folder gone or not
        if not args.skip_train and not (committed_step(out) >= max_steps and finished_steps(run) == 0):
            seconds = train(args.arm, args.seed, config_path, model, max_steps, run, args)
        adapters, step = final_adapters(run, out)
        commit_adapters(adapters, out)
    for turns in args.turns:
        start = time.perf_counter()
        bench = bench_setting(args.arm, args.seed, step, turns, model, adapters, run, args)
        write_json(out / bench_name(turns, args.prompts), bench)
        print(f"[{args.arm} seed {args.seed}] bench {turns} turns: {time.perf_counter() - start:.0f} s -> "
              f"{out / bench_name(turns, args.prompts)}", flush=True)
    if args.prompts == "gold":  # an extra bench of the same run: its run.json stays the main bench's
        print(f"wrote {out}")
        return 0
    info = {"arm": args.arm, "seed": args.seed, "step": step, "max_steps": max_steps if trained else 0,
            "trajectory_filter": ARMS[args.arm], "settings": ARM_SETTINGS.get(args.arm, {}),
            "model": str(model_name),
            "config": run_config(config, args, max_steps),
            "command": "python -m recipes.shapes_tiny.rl_runs " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": args.device, "threads": args.threads}
    if not trained:
        state = {"log_history": []}
    else:  # the run's log, or the committed one when the committed adapters were benched
        state = trimmed_state(out if adapters == out / COMMITTED_ADAPTERS else run)
    # the steps' own seconds, summed over every session of work that trained the run (resumes included)
    info["train_seconds"] = round(sum(e.get("timing/step", 0.0) for e in state["log_history"]), 1)
    info["train_seconds_this_call"] = round(seconds, 1)
    write_json(out / "run.json", info)
    if trained:
        write_json(out / "trainer_state.json", state)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

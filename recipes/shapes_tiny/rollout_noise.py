"""How far the RL rollouts are from what inference samples: the trainer's rollout reward per SDE noise level.

    python -m recipes.shapes_tiny.rollout_noise                                   # study config, 16 sessions
    python -m recipes.shapes_tiny.rollout_noise --noise-levels 0 0.3 0.7 1.3 --sessions 32 --json runs/noise.json

Builds the `EditR2Trainer` of an RL config (`configs/rl/study.yaml` by default: its model, sessions, G, T, steps,
SDE window, keep_unedited), and rolls out the same `--sessions` training sessions once per noise level: the same
sessions, rollout seeds and reasoning draws at every level, so the levels are paired. Noise level 0 makes the window's
steps ODE steps (Flow-GRPO's check that the SDE reproduces the sampler), so its reward is what the model reaches
with inference's sampler and the config's reasoning temperature; `--reasoning-temperature 0.01` makes the intents
(nearly) greedy, as inference writes them. Prints the mean reward, IF, CC and GA per turn and how much of the group
spread the noise gives (the mean within-group reward std), and writes them to `--json`.

A noise level whose rollouts score far below level 0 trains the editor on samples inference never produces; the
lever is then a lower `noise_level` (or a shorter `sde_window_size`) for that sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "recipes" / "shapes_tiny" / "configs" / "rl" / "study.yaml"
METRICS = ("reward", "IF", "CC", "GA")


def build_trainer(config: Path, output_dir: str, overrides: list[str]):
    """The study's trainer (its model, reward functions and dataset), with `overrides` as extra command-line flags."""
    from trl import TrlParser

    from trl_editr2 import EditR2Trainer
    from trl_editr2.config import EditR2Config
    from trl_editr2.scripts.editr2 import EditR2ScriptArguments, load_dataset, load_model

    parser = TrlParser((EditR2ScriptArguments, EditR2Config))
    script_args, args = parser.parse_args_and_config(["--config", str(config), "--output_dir", output_dir,
                                                      "--report_to", "none", *overrides])
    dataset = load_dataset(script_args, args.num_turns)
    trainer = EditR2Trainer(model=load_model(script_args), reward_funcs=script_args.reward_funcs, args=args,
                            train_dataset=dataset)
    return trainer, dataset


def model_template_flags(config: Path) -> list[str]:
    """The template flags `rl_runs` trains with (`rl_runs.template_flags`), for the config's model folder."""
    from recipes.shapes_tiny.rl_demo import read_config, resolve_model
    from recipes.shapes_tiny.rl_runs import template_flags

    return template_flags(resolve_model(None, read_config(config)), config)


def per_turn(trainer, rollouts) -> dict[str, list[float]]:
    """Per turn: the mean reward, each reward function's mean (e.g. IF, CC, GA of `shapes_oracle`) and the mean
    within-group reward std, of rollouts scored by the trainer (`EditR2Trainer.score`)."""
    from trl_editr2.rewards import score_samples

    batch = trainer.score(rollouts)
    rewards = batch["rewards"]  # (B, G, T)
    out = {"reward": rewards.nanmean(dim=(0, 1)).tolist(), "group_std": rewards.std(dim=1).nanmean(dim=0).tolist()}
    prompts, images, kwargs = trainer.reward_kwargs(rollouts)
    scores = score_samples(trainer.reward_funcs, prompts, images, trainer.args.reward_retries, {}, **kwargs)[0]
    for name, values in scores.items():
        values = torch.tensor([float("nan") if v is None else v for v in values]).view_as(rewards)
        out[name] = values.nanmean(dim=(0, 1)).tolist()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="RL config (YAML)")
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0, 1.3])
    parser.add_argument("--sessions", type=int, default=16, help="training sessions rolled out per level")
    parser.add_argument("--sessions-per-call", type=int, default=8, help="sessions rolled out together")
    parser.add_argument("--reasoning-temperature", type=float, default=None, help="override the config's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the table's numbers here")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.sessions_per_call < 1 or min(args.noise_levels) < 0:
        raise SystemExit("--sessions and --sessions-per-call must be >= 1 and every noise level >= 0.")
    torch.set_num_threads(args.threads)
    overrides = model_template_flags(Path(args.config))
    if args.reasoning_temperature is not None:
        overrides += ["--reasoning_temperature", str(args.reasoning_temperature)]
    with tempfile.TemporaryDirectory() as tmp:
        trainer, dataset = build_trainer(Path(args.config), tmp, overrides)
        records = [dataset[i] for i in range(min(args.sessions, len(dataset)))]
        results = {}
        for level in dict.fromkeys(args.noise_levels):
            trainer.args.noise_level = level
            scored = []
            for start in range(0, len(records), args.sessions_per_call):
                scored.append(per_turn(trainer, trainer.rollout(records[start:start + args.sessions_per_call])))
            results[str(level)] = {k: [sum(s[k][t] for s in scored) / len(scored) for t in range(len(scored[0][k]))]
                                   for k in scored[0]}
            row = results[str(level)]
            print(f"noise {level:>4}: " + "  ".join(f"{k} " + "/".join(f"{v:.3f}" for v in row[k]) for k in row),
                  flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        command = "python -m recipes.shapes_tiny.rollout_noise " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.json).write_text(json.dumps({"command": command, "config": str(args.config),
                                               "sessions": len(records), "levels": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

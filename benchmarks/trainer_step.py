"""Where the time of one Edit-R2 RL step goes, on the tiny pipeline (CPU).

    python benchmarks/trainer_step.py                      # G=2, T=2, 4 steps, 8 reasoning tokens, 32 px, 1 thread
    python benchmarks/trainer_step.py --generations 6 --turns 3 --steps 15 --size 64 --tokens 32

Runs `--warmup` + `--measure` optimizer steps of `EditR2Trainer` (MICE-Shapes sessions, oracle rewards) and prints,
per step (median over the measured steps): the rollout split into reasoning (sampling the intents + the teacher-forced
old log-probs), encode (prompt + reference conditioning), sampling (the SDE/ODE denoising loop), decode (VAE) and
rollout bookkeeping; the rewards; the learning phase (re-scoring the turns, backward); and "other": the rest of the
step's wall time (optimizer, logging, data loading, the trainer's bookkeeping). Also samples (turns) per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=2, help="rollouts per session (G)")
    parser.add_argument("--turns", type=int, default=2, help="turns per session (T)")
    parser.add_argument("--sessions", type=int, default=1, help="sessions per step")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per turn")
    parser.add_argument("--tokens", type=int, default=8, help="max reasoning tokens")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (1 = off)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models are fastest on 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_editr2.data import ShapesSessionDataset
    from trl_editr2.testing import tiny_trainer

    torch.set_num_threads(args.threads)
    total_steps = args.warmup + args.measure
    starts: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            starts.append(time.perf_counter())

        def on_train_end(self, *_, **__):
            starts.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        dataset = ShapesSessionDataset(64, "cm", args.turns, 0, args.size)
        trainer = tiny_trainer(
            tmp, dataset=dataset, num_generations=args.generations, num_turns=args.turns,
            num_inference_steps=args.steps, sde_window_range=[0, max(1, args.steps - 1)],
            max_reasoning_tokens=args.tokens, condition_area=args.size * args.size, true_cfg_scale=args.cfg,
            per_device_train_batch_size=args.sessions, max_steps=total_steps, logging_steps=1,
        )
        trainer.remove_callback(PrinterCallback)  # keep the table readable
        trainer.add_callback(StepClock())
        trainer.train()
        logs = [h for h in trainer.state.log_history if "timing/step" in h]

    measured = range(args.warmup, total_steps)
    wall = [starts[k + 1] - starts[k] for k in measured]
    rows = {}
    for key in ("reasoning", "encode", "sampling", "decode"):
        rows[f"rollout: {key}"] = [logs[k].get(f"timing/rollout/{key}", 0.0) for k in measured]
    rollout = [logs[k]["timing/rollout"] for k in measured]
    stages = [sum(rows[f"rollout: {key}"][i] for key in ("reasoning", "encode", "sampling", "decode"))
              for i in range(len(wall))]
    rows["rollout: bookkeeping"] = [r - s for r, s in zip(rollout, stages)]
    rows["rewards"] = [logs[k]["timing/reward"] for k in measured]
    rows["learning"] = [logs[k]["timing/learn"] for k in measured]
    accounted = [r + logs[k]["timing/reward"] + logs[k]["timing/learn"] for r, k in zip(rollout, measured)]
    rows["other"] = [w - a for w, a in zip(wall, accounted)]

    step = statistics.median(wall)
    samples = args.sessions * args.generations * args.turns
    print(f"EditR2Trainer step on the tiny pipeline: {args.sessions} session(s) x G={args.generations} x "
          f"T={args.turns} = {samples} samples, {args.steps} denoising steps, {args.tokens} reasoning tokens, "
          f"{args.size}px, CFG {args.cfg}, {args.threads} thread(s); median of {args.measure} steps")
    print(f"{'part':<24}{'seconds':>10}{'share':>9}")
    for name, values in rows.items():
        value = statistics.median(values)
        print(f"{name:<24}{value:>10.3f}{value / step:>9.1%}")
    print(f"{'step (wall)':<24}{step:>10.3f}{1:>9.0%}")
    print(f"samples/second: {samples / step:.2f}   sessions/second: {args.sessions / step:.3f}")


if __name__ == "__main__":
    main()

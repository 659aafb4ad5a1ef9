"""Where the time of one Edit-R2 RL step goes, on the tiny pipeline or the shipped model (CPU).

    python benchmarks/trainer_step.py                      # G=2, T=2, 4 steps, 8 reasoning tokens, 32 px, 1 thread
    python benchmarks/trainer_step.py --generations 6 --turns 3 --steps 15 --size 64 --tokens 32
    python benchmarks/trainer_step.py --compare 1 4 8      # unbatched vs batched rollouts at 1, 4, 8 sessions per step
    python benchmarks/trainer_step.py --compare 8 --reasoning --generations 6 --turns 3   # reasoning: per session vs
                                                           # one generate call for all sessions (both batched rollouts)
    python benchmarks/trainer_step.py --compare 1 4 8 --reasoning --forwards --generations 6   # the reasoning call
                                                           # alone, per session vs one call, timed interleaved
    python benchmarks/trainer_step.py --model checkpoints/editr2-shapes-tiny --compare 1 4 8 \\
        --generations 6 --turns 3 --steps 16 --size 64 --tokens 96 --measure 1   # the RL demo's shapes

Runs `--warmup` + `--measure` optimizer steps of `EditR2Trainer` (MICE-Shapes sessions, oracle rewards) and prints,
per step (median over the measured steps): the rollout split into reasoning (sampling the intents + the teacher-forced
old log-probs), encode (prompt + reference conditioning), sampling (the SDE/ODE denoising loop: the transformer's
forwards), decode (VAE) and rollout bookkeeping; the rewards; the learning phase (re-scoring the turns, backward); and
"other": the rest of the step's wall time (optimizer, logging, data loading, the trainer's bookkeeping). Also samples
(turns) per second.

With `--compare B1 B2 ...`, runs each sessions-per-step count twice, with the sessions rolled out one by one
(`batch_sessions=False`) and together (`batch_sessions=True`: one transformer batch of B x G rollouts per denoising
step), and prints one table: seconds per step and per part, with the batched / unbatched ratio of each, and the
sampling time per sample-forward (one rollout through the transformer once). With `--reasoning` as well, both runs
batch the transformer and the table compares the reasoning written session by session (one `generate` call per
session and turn, as before reasoning was batched) with one `generate` call for all sessions per turn.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

PARTS = ("rollout: reasoning", "rollout: encode", "rollout: sampling", "rollout: decode", "rollout: bookkeeping",
         "rewards", "learning", "other", "step (wall)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an EditR2Pipeline folder (default: the tiny random pipeline)")
    parser.add_argument("--generations", type=int, default=2, help="rollouts per session (G)")
    parser.add_argument("--turns", type=int, default=2, help="turns per session (T)")
    parser.add_argument("--sessions", type=int, default=1, help="sessions per step")
    parser.add_argument("--compare", type=int, nargs="+", default=None, metavar="B",
                        help="sessions per step to run unbatched and batched (one table)")
    parser.add_argument("--forwards", action="store_true",
                        help="with --compare: only time the transformer forward at G and B x G rows (with "
                             "--reasoning: only the reasoning's generate calls)")
    parser.add_argument("--reasoning", action="store_true",
                        help="with --compare: reasoning per session vs one generate call for all sessions")
    parser.add_argument("--unbatched", action="store_true", help="roll the sessions out one by one")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per turn")
    parser.add_argument("--tokens", type=int, default=8, help="max reasoning tokens")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (1 = off)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models are fastest on 1)")
    args = parser.parse_args()
    if min([args.generations, args.turns, args.sessions, args.steps, args.measure] + (args.compare or [1])) < 1:
        parser.error("pass --generations, --turns, --sessions, --compare, --steps and --measure >= 1")
    return args


def make_trainer(args, output_dir: str, sessions: int, batch: bool):
    """An `EditR2Trainer` on `args.model` (or the tiny pipeline) with the benchmark's shapes."""
    from trl_editr2.data import ShapesSessionDataset
    from trl_editr2.testing import tiny_config, tiny_trainer

    total_steps = args.warmup + args.measure
    dataset = ShapesSessionDataset(max(64, sessions * total_steps), "cm", args.turns, 0, args.size)
    settings = dict(
        num_generations=args.generations, num_turns=args.turns, num_inference_steps=args.steps,
        sde_window_range=[0, max(1, args.steps - 1)], max_reasoning_tokens=args.tokens,
        condition_area=min(args.size * args.size, 1024), true_cfg_scale=args.cfg,
        per_device_train_batch_size=sessions, max_steps=total_steps, logging_steps=1, batch_sessions=batch,
    )
    if args.model is None:
        return tiny_trainer(output_dir, dataset=dataset, **settings)
    from trl_editr2.trainer import EditR2Trainer

    # the RL demo's adapters (examples/configs/shapes_default_rl.yaml)
    settings.update(lora_r=16, lora_alpha=32, text_lora_r=8, text_lora_alpha=16, beta=0.01, noise_level=1.3)
    return EditR2Trainer(args.model, ["shapes_oracle"], args=tiny_config(output_dir, **settings), train_dataset=dataset)


def reasoning_per_session():
    """A context in which `rollout_sessions` writes each session's reasoning with its own `generate` call."""
    import contextlib

    import trl_editr2.rollout as rollout

    @contextlib.contextmanager
    def patched():
        original = rollout.write_intents_batched
        rollout.write_intents_batched = lambda policy, requests, args: [
            original(policy, [request], args)[0] for request in requests]
        try:
            yield
        finally:
            rollout.write_intents_batched = original

    return patched()


def measure(args, sessions: int, batch: bool, batch_reasoning: bool = True) -> dict[str, float]:
    """Median seconds per part of `args.measure` steps (after `args.warmup`) at `sessions` sessions per step
    (`batch_reasoning=False`: each session's reasoning in its own `generate` call)."""
    import contextlib

    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(args.threads)
    total_steps = args.warmup + args.measure
    starts: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            starts.append(time.perf_counter())

        def on_train_end(self, *_, **__):
            starts.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp, (contextlib.nullcontext() if batch_reasoning
                                                else reasoning_per_session()):
        trainer = make_trainer(args, tmp, sessions, batch)
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
    rows["step (wall)"] = wall
    return {name: statistics.median(values) for name, values in rows.items()}


def describe(args, sessions: str) -> str:
    model = args.model or "the tiny pipeline"
    return (f"EditR2Trainer step on {model}: {sessions} session(s) x G={args.generations} x T={args.turns}, "
            f"{args.steps} denoising steps, {args.tokens} reasoning tokens, {args.size}px, CFG {args.cfg}, "
            f"{args.threads} thread(s); median of {args.measure} steps after {args.warmup}")


def print_single(args) -> None:
    row = measure(args, args.sessions, not args.unbatched)
    step = row["step (wall)"]
    samples = args.sessions * args.generations * args.turns
    print(describe(args, str(args.sessions)) + ("" if args.unbatched or args.sessions == 1 else ", batched"))
    print(f"{'part':<24}{'seconds':>10}{'share':>9}")
    for name in PARTS:
        print(f"{name:<24}{row[name]:>10.3f}{row[name] / step:>9.1%}")
    print(f"samples/second: {samples / step:.2f}   sessions/second: {args.sessions / step:.3f}")


def print_compare(args) -> None:
    """One markdown table: per sessions-per-step count, unbatched and batched seconds, batched / unbatched."""
    results = {}
    names = ("reasoning per session", "reasoning batched") if args.reasoning else ("unbatched", "batched")
    for sessions in args.compare:
        for batch in (False, True):
            if args.reasoning:  # both batch the transformer; only the reasoning differs
                results[sessions, batch] = measure(args, sessions, True, batch_reasoning=batch)
            else:
                results[sessions, batch] = measure(args, sessions, batch)
            print(f"  measured {sessions} session(s), {names[batch]}: "
                  f"{results[sessions, batch]['step (wall)']:.2f} s/step", flush=True)
    print(describe(args, "/".join(str(s) for s in args.compare)))
    header = "| part |" + "".join(f" {s} {names[0]} | {s} {names[1]} | ratio |" for s in args.compare)
    print(header)
    print("|---|" + "---|---|---|" * len(args.compare))
    for name in PARTS:
        cells = []
        for sessions in args.compare:
            a, b = results[sessions, False][name], results[sessions, True][name]
            ratio = f"{b / a:.2f}" if abs(a) > 1e-3 else "-"
            cells.append(f" {a:.3f} | {b:.3f} | {ratio} |")
        print(f"| {name} |" + "".join(cells))
    cells = []
    for sessions in args.compare:
        forwards = sessions * args.generations * args.turns * args.steps
        a, b = (results[sessions, batch]["rollout: sampling"] / forwards * 1e3 for batch in (False, True))
        cells.append(f" {a:.2f} | {b:.2f} | {b / a:.2f} |")
    print("| sampling, ms per sample-forward |" + "".join(cells))
    cells = []
    for sessions in args.compare:
        samples = sessions * args.generations * args.turns
        a, b = (samples / results[sessions, batch]["step (wall)"] for batch in (False, True))
        cells.append(f" {a:.2f} | {b:.2f} | {b / a:.2f} |")
    print("| samples (turns) per second |" + "".join(cells))


@contextlib.contextmanager
def compare_trainer(args):
    """`(policy, config, records)` of a trainer over the largest `--compare` session count (policy in eval mode), in
    a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, tmp, max(args.compare), True)
        trainer.policy.eval()
        yield trainer.policy, trainer.args, [trainer.train_dataset[i] for i in range(max(args.compare))]


def forward_times(args, repeats: int = 5) -> None:
    """Milliseconds per sample-forward of the transformer at G rows (one session) and B x G rows (every session of
    `--compare`), timed interleaved (best of `repeats`), so that a loaded machine slows both alike."""
    import torch

    from trl_editr2.rollout import _plan_turn, _start_sessions, batch_conditioning

    torch.set_num_threads(args.threads)
    with compare_trainer(args) as (policy, config, records):
        with torch.no_grad():
            plans = [_plan_turn(policy, _start_sessions(policy.pipeline, r, config), r["instruction"][0], 0, config,
                                (k,)) for k, r in enumerate(records)]
            best = {}
            for _ in range(repeats):
                for sessions in sorted(set([1, *args.compare])):
                    cond = batch_conditioning([c for p in plans[:sessions] for c in p.conditionings])
                    x = torch.cat([p.latents for p in plans[:sessions]])
                    t = plans[0].timesteps[0].expand(x.shape[0]).to(x.dtype)
                    start = time.perf_counter()
                    policy.velocity(x, t, cond)
                    seconds = time.perf_counter() - start
                    best[sessions] = min(best.get(sessions, seconds), seconds)
    print("| sessions batched | rows | ms per forward | ms per sample-forward | vs 1 session |")
    print("|---|---|---|---|---|")
    for sessions, seconds in sorted(best.items()):
        rows = sessions * args.generations
        per = seconds / rows * 1e3
        print(f"| {sessions} | {rows} | {seconds * 1e3:.1f} | {per:.2f} | {per / (best[1] / args.generations * 1e3):.2f} |")


def reasoning_times(args, repeats: int = 3) -> None:
    """Seconds to write one turn's reasoning answers of B sessions x G rollouts: one `generate` call per session vs
    one for all B sessions, timed interleaved (best of `repeats`), so that a loaded machine slows both alike."""
    import torch

    from trl_editr2.rollout import _start_sessions, generate_answers_batched, reasoning_generators

    torch.set_num_threads(args.threads)
    with compare_trainer(args) as (policy, config, records):
        requests = [(_start_sessions(policy.pipeline, r, config), r["instruction"][0]) for r in records]
        best: dict[tuple[int, bool], float] = {}
        tokens: dict[tuple[int, bool], int] = {}
        with torch.no_grad():
            for _ in range(repeats):
                for sessions in args.compare:
                    for together in (False, True):
                        batch = [(s, i, reasoning_generators((k, 0), len(s)))
                                 for k, (s, i) in enumerate(requests[:sessions])]
                        start = time.perf_counter()
                        if together:
                            out = generate_answers_batched(policy.pipeline, batch, config)
                        else:
                            out = [generate_answers_batched(policy.pipeline, [b], config)[0] for b in batch]
                        seconds = time.perf_counter() - start
                        best[sessions, together] = min(best.get((sessions, together), seconds), seconds)
                        tokens[sessions, together] = sum(int(o[3].sum()) for o in out)
    print("| sessions | rows | one call per session (s) | one call for all (s) | ratio | answer tokens (same in both) |")
    print("|---|---|---|---|---|---|")
    for sessions in args.compare:
        a, b = best[sessions, False], best[sessions, True]
        same = "yes" if tokens[sessions, False] == tokens[sessions, True] else "no"
        print(f"| {sessions} | {sessions * args.generations} | {a:.3f} | {b:.3f} | {b / a:.2f} | "
              f"{tokens[sessions, True]} ({same}) |")


def main() -> None:
    args = parse_args()
    if args.forwards and args.reasoning:
        reasoning_times(args)
    elif args.forwards:
        forward_times(args)
    elif args.compare:
        print_compare(args)
    else:
        print_single(args)


if __name__ == "__main__":
    main()

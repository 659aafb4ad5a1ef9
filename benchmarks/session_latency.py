"""Per-turn latency of an 8-turn editing session: EditR2Pipeline per reasoning mode vs a plain diffusers loop.

    python benchmarks/session_latency.py                                  # tiny components, CPU, 32/64/128 px
    python benchmarks/session_latency.py --transformer wide --sizes 128   # a wider transformer (4 x 512)

Variants, all on the same tiny components and seeds:

- `none`, `history`, `intent`: `EditR2Pipeline` with that `reasoning=`; each turn's latent is carried to the next turn.
  `intent` writes `--max-new-tokens` tokens per turn (the random tiny VLM never stops early) with the reasoning
  prefix cache; `intent-nocache` is the same without it.
- `plain`: a loop over diffusers' `QwenImageEditPlusPipeline` that passes each turn's output image to the next turn,
  which resizes and VAE-encodes it again (its reference sizes are set to the working size, as ours).

All variants of a size run in one process, interleaved (repeat r of every variant, then r + 1; one warm-up round
first), so that load changes on a shared machine hit them alike; every time is the median over the repeats.

Columns: turn 1 / turn 8 / mean wall time per turn; reasoning time per turn (shown separately); `editor t8/t1` =
turn 8 / turn 1 of the time without reasoning; `vs plain` = mean turn time over the plain loop's (total, and without
reasoning); `outside fwd` = share of the time without reasoning spent outside the transformer's forward passes (text
encoding, VAE, scheduler, pipeline bookkeeping); peak memory = growth of the peak RSS over one session after a
warm-up one, in a separate process per variant (CPU), or `torch.cuda.max_memory_allocated` (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "make the sign yellow",
    "now make it black",
    "add a red ball on the left",
    "make the ball larger",
    "from now on keep the background white, now add a blue cup",
    "move it to the right",
    "undo that",
    "make the cup green",
]
VARIANTS = ("plain", "none", "history", "intent", "intent-nocache")


def _sync(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _wide_transformer():
    from diffusers import QwenImageTransformer2DModel

    from diffusers_editr2.testing import TINY_TEXT_HIDDEN

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=8,
        joint_attention_dim=TINY_TEXT_HIDDEN, guidance_embeds=False, axes_dims_rope=(16, 24, 24),
    ).eval()  # fmt: skip


def _forward_timer(module, device: str) -> dict:
    """Accumulate the wall time of `module`'s forward passes in `timer["seconds"]`."""
    timer = {"seconds": 0.0, "start": 0.0}
    module.register_forward_pre_hook(lambda m, a: timer.__setitem__("start", _sync(device)))
    module.register_forward_hook(
        lambda m, a, o: timer.__setitem__("seconds", timer["seconds"] + _sync(device) - timer["start"])
    )
    return timer


def _build(variant: str, args: argparse.Namespace, components: dict | None = None):
    import torch
    from diffusers import QwenImageEditPlusPipeline

    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
    from diffusers_editr2.testing import tiny_components

    if components is None:
        with torch.random.fork_rng():
            components = tiny_components(seed=0)
            if args.transformer == "wide":
                torch.manual_seed(0)
                components["transformer"] = _wide_transformer()
    pipe_class = QwenImageEditPlusPipeline if variant == "plain" else EditR2Pipeline
    pipe = pipe_class(**components).to(args.device, getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _session(pipe, variant: str, size: int, args: argparse.Namespace, timer: dict) -> list[dict]:
    """One 8-turn session; per turn: wall time, reasoning time, transformer forward time (seconds)."""
    import torch
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as upstream

    from diffusers_editr2.testing import tiny_image

    upstream.VAE_IMAGE_SIZE, upstream.CONDITION_IMAGE_SIZE = size * size, args.condition_area
    common = dict(height=size, width=size, num_inference_steps=args.steps, true_cfg_scale=1.0)
    source = tiny_image(0, size=(size, size))
    turns, state, image = [], None, source
    for k, prompt in enumerate(PROMPTS):
        generator = torch.Generator().manual_seed(k)
        timer["seconds"] = 0.0
        start = _sync(args.device)
        if variant == "plain":  # the previous output goes back in as an image: resized and VAE-encoded again
            image = pipe(image=image, prompt=prompt, generator=generator, **common).images[0]
            reasoning = 0.0
        else:
            if variant == "intent-nocache":
                pipe.reasoning_prefix_cache.clear()
            out = pipe(image=source if state is None else None, prompt=prompt, session=state,
                       reasoning=variant.split("-")[0], generator=generator, reference_area=None,
                       condition_area=args.condition_area, max_new_tokens=args.max_new_tokens,
                       max_history_images=2, **common)  # fmt: skip
            state = out.session
            reasoning = state.turns[-1].timings["reasoning"]
        total = _sync(args.device) - start
        turns.append({"total": total, "reasoning": reasoning, "transformer": timer["seconds"]})
        if variant.startswith("intent"):  # the reasoning prompt's length and how much of it the prefix cache served
            prompt = pipe.prepare_reasoning_inputs(state.truncate(k), prompt, condition_area=args.condition_area)
            turns[-1]["prompt_tokens"] = prompt["input_ids"].shape[1]
            turns[-1]["reused_tokens"] = pipe.reasoning_prefix_cache.last_reused
    return turns


def measure(size: int, args: argparse.Namespace) -> dict:
    """All variants at `size` in this process, interleaved (repeat r of every variant, then r + 1), so that load
    changes on a shared machine hit every variant alike. Returns per-variant per-turn medians."""
    import torch

    torch.set_num_threads(args.threads)
    plain = _build("plain", args)
    pipes = {v: plain if v == "plain" else _build(v, args, plain.components) for v in ("plain", *args.variants)}
    timer = _forward_timer(plain.transformer, args.device)  # every pipeline shares these components
    runs = {v: [] for v in pipes}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        for variant, pipe in pipes.items():
            turns = _session(pipe, variant, size, args, timer)
            if repeat > 0:
                runs[variant].append(turns)
    medians = {}
    for variant, variant_runs in runs.items():
        medians[variant] = [
            {key: statistics.median(run[k][key] for run in variant_runs) for key in variant_runs[0][k]}
            for k in range(len(PROMPTS))
        ]
    return medians


def peak_memory(variant: str, size: int, args: argparse.Namespace) -> float:
    """MB: peak RSS growth over one session after a warm-up one (CPU), or `max_memory_allocated` (GPU)."""
    import torch

    torch.set_num_threads(args.threads)
    pipe = _build(variant, args)
    timer = _forward_timer(pipe.transformer, args.device)
    _session(pipe, variant, size, args, timer)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _session(pipe, variant, size, args, timer)
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # ru_maxrss: KiB on Linux


def _row(size: int, variant: str, turns: list[dict], plain: list[dict], peak_mb: float) -> str:
    total = [t["total"] for t in turns]
    editor = [t["total"] - t["reasoning"] for t in turns]
    reasoning = statistics.mean(t["reasoning"] for t in turns)
    outside = 1 - sum(t["transformer"] for t in turns) / sum(editor)
    plain_mean = statistics.mean(t["total"] for t in plain)
    return (
        f"| {size} | {variant} | {1e3 * total[0]:.1f} | {1e3 * total[-1]:.1f} | {1e3 * statistics.mean(total):.1f} | "
        f"{1e3 * reasoning:.1f} | {editor[-1] / editor[0]:.2f} | {statistics.mean(total) / plain_mean:.2f} | "
        f"{statistics.mean(editor) / plain_mean:.2f} | {100 * outside:.0f}% | {peak_mb:.0f} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="working sizes (pixels, square)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS[1:])
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per turn")
    parser.add_argument("--repeats", type=int, default=3, help="sessions per variant (medians are over these)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reasoning tokens per turn (intent)")
    parser.add_argument("--condition-area", type=int, default=32 * 32, help="pixels of the VLM's view")
    parser.add_argument("--transformer", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    parser.add_argument("--memory-worker", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        print(json.dumps(peak_memory(args.memory_worker[0], int(args.memory_worker[1]), args)))
        return

    passthrough = list(argv if argv is not None else sys.argv[1:])
    print(f"8-turn session, {args.steps} steps/turn, {args.repeats} repeats (medians), transformer={args.transformer}, "
          f"device={args.device}, dtype={args.dtype}, threads={args.threads}\n")  # fmt: skip
    print("| size | variant | turn 1 (ms) | turn 8 (ms) | mean/turn (ms) | reasoning/turn (ms) | editor t8/t1 | "
          "vs plain | vs plain (no reasoning) | outside fwd | peak mem (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    per_turn = {}
    for size in args.sizes:
        results = measure(size, args)
        for variant, turns in results.items():
            peak = float("nan")
            if not args.no_memory:
                cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--memory-worker", variant, str(size)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode != 0:
                    raise RuntimeError(f"memory worker {variant} @ {size} failed:\n{proc.stderr[-3000:]}")
                peak = json.loads(proc.stdout.strip().splitlines()[-1])
            print(_row(size, variant, turns, results["plain"], peak), flush=True)
        per_turn[size] = results
    for size, results in per_turn.items():
        print(f"\nper-turn wall time at {size}px (ms, median of {args.repeats}; reasoning in brackets)\n")
        print("| variant | " + " | ".join(f"t{k}" for k in range(1, len(PROMPTS) + 1)) + " |")
        print("|---|" + "---|" * len(PROMPTS))
        for variant, turns in results.items():
            cells = [f"{1e3 * t['total']:.0f}" + (f" ({1e3 * t['reasoning']:.0f})" if t["reasoning"] else "")
                     for t in turns]  # fmt: skip
            print(f"| {variant} | " + " | ".join(cells) + " |")
        for variant in ("intent", "intent-nocache"):
            if variant in results:
                cells = [f"{t['prompt_tokens']:.0f} / {t['prompt_tokens'] - t['reused_tokens']:.0f}"
                         for t in results[variant]]  # fmt: skip
                print(f"| {variant}: prompt / prefilled tokens | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

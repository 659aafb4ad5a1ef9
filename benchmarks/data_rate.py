"""Examples per second of the editor stage's batch path: PIL rendering in data workers vs the batched torch renderer.

    nice .venv/bin/python benchmarks/data_rate.py                       # shipped checkpoint's processors, CPU (+CUDA)
    nice .venv/bin/python benchmarks/data_rate.py --workers 14 --steps 20 --batch-size 256

Two tables, each timed over `--steps` batches of `--batch-size` examples (`recipes/shapes_tiny/train_editor.py`,
the GPU config's settings: `batch_text_encoding`, 64 px images, 32 px condition view):

- **batch path**: everything `make_batch` needs before the VAE and text encoder run: drawing the turns (session
  generation), rendering reference and target, the VAE's input pixels and the text encoder's inputs (processor).
  `pil` is `example_batch` with `render: pil`, in this process (`workers 0`) or in `--workers` forked data workers
  (`common.step_batches`, as training runs them); `torch` is `render: torch`: the turns drawn and the texts tokenized
  in this process or in the workers, then `render_examples` renders the VAE's pixels and makes the text encoder's
  condition view and image patches on the device (`editr2.tensor_processor`).
- **render only**: reference + target pixels of already drawn turns: `render` + `VaeImageProcessor.preprocess` per
  scene (PIL) vs `torch_render.render_batch` on the CPU and on CUDA (synchronised).

Ratios are against the PIL single-process row of the same table and run. `cpu s` is the CPU time of this process
and its reaped worker processes, so a shared machine's wall time can be read against it. A CUDA row says `n/a`
without CUDA.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.shapes_tiny import common, train_editor  # noqa: E402

CHECKPOINT = ROOT / "checkpoints" / "editr2-shapes-tiny"


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, sync: bool = False) -> tuple[float, float]:
    """`(wall seconds, cpu seconds)` of `fn()`."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def load_pipe(tiny: bool):
    if tiny or not (CHECKPOINT / "model_index.json").is_file():
        from diffusers_editr2.testing import tiny_pipeline

        return tiny_pipeline(), "tiny test pipeline"
    from diffusers_editr2 import EditR2Pipeline

    return EditR2Pipeline.from_pretrained(str(CHECKPOINT), dtype=torch.float32), str(CHECKPOINT.relative_to(ROOT))


def batch_path(pipe, cfg, steps: int, workers: int, device: str) -> tuple[float, float]:
    """Time `steps` batches of the path `cfg.render` selects (the first batch, a warm-up, not counted)."""
    pipe.vae.to(device)

    def consume(start: int):
        batches = common.step_batches(lambda s: train_editor.example_batch(pipe, cfg, s), start, start + steps,
                                      workers)
        for ex in batches:
            if cfg.render == "torch":
                ex = train_editor.render_examples(pipe, cfg, ex)
        del batches

    train_editor.render_examples(pipe, cfg, train_editor.example_batch(pipe, cfg, 0)) if cfg.render == "torch" \
        else train_editor.example_batch(pipe, cfg, 0)
    return timed(lambda: consume(1), sync=device == "cuda")


def render_only(pipe, cfg, steps: int, how: str) -> tuple[float, float]:
    from editr2.bench.shapes.render import render
    from editr2.bench.shapes.torch_render import render_batch

    rng = common.step_rng(cfg.seed, 10**6)
    batches = [[train_editor.draw_turn(rng, cfg) for _ in range(cfg.batch_size)] for _ in range(steps)]
    size = cfg.image_size

    def run():
        for turns in batches:
            for k in (0, 1):
                scenes = [t[k] for t in turns]
                if how == "pil":
                    train_editor.preprocess_images(pipe, [render(s, size) for s in scenes], size)
                else:
                    (render_batch(scenes, size, how) * 2.0 - 1.0).unsqueeze(2)

    if how != "pil":
        render_batch([t[0] for t in batches[0]], size, how)  # warm-up (templates, kernels)
    return timed(run, sync=how == "cuda")


def table(title: str, rows: list[tuple[str, tuple[float, float] | None]], examples: int) -> None:
    print(f"\n{title}\n")
    print("| path | examples/s | x PIL 1 proc | wall s | cpu s |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, result in rows:
        if result is None:
            print(f"| {name} | n/a | n/a | n/a | n/a |")
            continue
        wall, cpu = result
        rate = examples / wall
        base = rate if base is None else base
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {wall:.2f} | {cpu:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per row")
    parser.add_argument("--workers", type=int, default=2, help="data workers of the N-worker rows")
    parser.add_argument("--tiny", action="store_true", help="tiny test processors instead of the shipped ones")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.workers < 1:
        raise ValueError("Pass --batch-size, --steps and --workers >= 1.")
    torch.set_num_threads(1)
    pipe, source = load_pipe(args.tiny)
    cuda = torch.cuda.is_available()
    kw = dict(batch_size=args.batch_size, batch_text_encoding=True, image_size=64, condition_size=32,
              curriculum=())  # any scene: the late-training mix
    pil, tch = train_editor.EditorConfig(**kw), train_editor.EditorConfig(**kw, render="torch")
    n, w = args.batch_size * args.steps, args.workers
    print(f"processors: {source}; batch {args.batch_size} x {args.steps} steps; torch threads 1; "
          f"CUDA: {torch.cuda.get_device_name() if cuda else 'none'}")
    table("batch path (draw + render + VAE pixels + text encoder inputs)", [
        ("pil, 0 workers", batch_path(pipe, pil, args.steps, 0, "cpu")),
        (f"pil, {w} workers", batch_path(pipe, pil, args.steps, w, "cpu")),
        ("torch cpu, 0 workers", batch_path(pipe, tch, args.steps, 0, "cpu")),
        (f"torch cpu, {w} workers", batch_path(pipe, tch, args.steps, w, "cpu")),
        ("torch cuda, 0 workers", batch_path(pipe, tch, args.steps, 0, "cuda") if cuda else None),
        (f"torch cuda, {w} workers", batch_path(pipe, tch, args.steps, w, "cuda") if cuda else None),
    ], n)
    table("render only (reference + target pixels of drawn turns)", [
        ("pil render + preprocess", render_only(pipe, pil, args.steps, "pil")),
        ("torch render_batch cpu", render_only(pipe, pil, args.steps, "cpu")),
        ("torch render_batch cuda", render_only(pipe, pil, args.steps, "cuda") if cuda else None),
    ], n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a reasoner training step's time goes: drawing and tokenising the batch vs the forward/backward pass, and how
much of the batch is padding.

    python -m recipes.shapes_tiny.profile_reasoner --config recipes/shapes_tiny/configs/reasoner_v2.yaml --steps 20

Builds the stage's model from the config (a fresh tokenizer in a temporary folder unless `--run_dir` holds one),
then times `steps` steps of the stage's own `make_batches` and of forward + backward on the same examples with the
full-vocabulary loss or `answer_logits`, in one padded batch or in `length_buckets`, on the CPU with the config's
`threads`. Prints one JSON object (median seconds per step of each part, tokens per row, the padded fraction of the
config's own batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recipes.shapes_tiny import common, train_reasoner


VARIANTS = {"model loss, one padded batch": {"answer_logits": False, "length_buckets": 1},
            "answer logits, one padded batch": {"answer_logits": True, "length_buckets": 1},
            "answer logits, 2 length buckets": {"answer_logits": True, "length_buckets": 2},
            "answer logits, 4 length buckets": {"answer_logits": True, "length_buckets": 4}}


def _rows(batch) -> list[dict]:
    return batch if isinstance(batch, list) else [batch]


def profile(cfg: train_reasoner.ReasonerConfig, run_dir: Path, steps: int, start: int = 0) -> dict:
    """Time `steps` steps of `cfg` (from step `start`): the stage's `make_batches`, and forward + backward of the same
    examples under each of `VARIANTS` (interleaved step by step, so a busy machine slows them alike; medians)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: pass at least 1.")
    torch.set_num_threads(cfg.threads)
    pipe = train_reasoner.build(cfg, run_dir)
    model = pipe.text_encoder.train()
    configs = {name: dataclasses.replace(cfg, **fields) for name, fields in VARIANTS.items()}
    data, times = [], {name: [] for name in VARIANTS}
    real = padded = answer = 0
    for step in range(start, start + steps):
        tick = time.perf_counter()
        batch, copies = train_reasoner.make_batches(pipe, cfg, step)
        data.append(time.perf_counter() - tick)
        for b in _rows(batch):
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
            answer += int((b["labels"] != -100).sum())
        for name, variant in configs.items():
            variant_batch = train_reasoner.make_batch(pipe, variant, step)
            tick = time.perf_counter()
            loss = train_reasoner.step_loss(model, variant_batch, variant)
            if copies is not None:
                loss = loss + train_reasoner.step_loss(model, copies, variant)
            model.zero_grad(set_to_none=True)
            loss.backward()
            times[name].append(time.perf_counter() - tick)
    rows = steps * cfg.batch_size
    return {"steps": steps, "start": start, "batch_size": cfg.batch_size, "threads": cfg.threads,
            "parameters": sum(p.numel() for p in model.parameters()),
            "data_s_per_step": statistics.median(data),
            "forward_backward_s_per_step": {name: statistics.median(v) for name, v in times.items()},
            "tokens_per_row": real / rows, "answer_tokens_per_row": answer / rows,
            "padded_fraction": 1.0 - real / padded}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--start", type=int, default=0, help="first step (schedules depend on it)")
    parser.add_argument("--run_dir", default="", help="a run folder whose tokenizer to reuse")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    overrides = [x for kv in args.set for x in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    cfg, _ = common.parse_args(train_reasoner.ReasonerConfig, "reasoner_short.yaml",
                               ["--config", args.config, "--run_dir", "unused", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        result = profile(cfg, Path(args.run_dir or tmp), args.steps, args.start)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

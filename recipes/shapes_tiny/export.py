"""Assemble the three stages into a diffusers folder (`checkpoints/editr2-shapes-tiny/`), half precision, and bench it.

    python -m recipes.shapes_tiny.export --vae runs/vae --reasoner runs/reasoner --editor runs/editor \
        --out checkpoints/editr2-shapes-tiny --bench-sessions 50

The folder is what `EditR2Pipeline.from_pretrained` loads: `model_index.json`, `scheduler/`, `vae/`, `text_encoder/`,
`tokenizer/`, `processor/`, `transformer/` (fp16 safetensors), plus `editr2_call_defaults.json` (the `__call__`
arguments the model was trained for) and a model card `README.md` with the measured metrics of every stage and, with
`--bench-sessions`, a MICE-Shapes bench of the exported folder itself (reloaded in fp32) per reasoning mode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from diffusers_editr2.call_defaults import CALL_DEFAULTS_FILE  # the file `editr2 demo` reads its call arguments from
from recipes.shapes_tiny import common

MAX_BYTES = 40 * 1024 * 1024


def assemble(vae_dir: Path, reasoner_dir: Path, editor_dir: Path):
    """The fp32 `EditR2Pipeline` of the three stages' outputs."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from diffusers_editr2 import EditR2Pipeline
    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor
    from diffusers_editr2.testing import qwen_image_scheduler_config

    pipe = EditR2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(qwen_image_scheduler_config()),
        vae=AutoencoderKLQwenImage.from_pretrained(vae_dir / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(reasoner_dir / "text_encoder"),
        tokenizer=Qwen2Tokenizer.from_pretrained(reasoner_dir / "tokenizer"),
        processor=Qwen2VLImageOnlyProcessor.from_pretrained(reasoner_dir / "processor"),
        transformer=QwenImageTransformer2DModel.from_pretrained(editor_dir / "transformer"),
    )
    check_prompt_template(pipe)
    return pipe


def check_prompt_template(pipe) -> None:
    """`encode_prompt` drops the first `prompt_template_encode_start_idx` (64) tokens, the template's system part;
    the tokenizer must split that part into exactly that many tokens, or the conditioning would lose or keep text."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n = len(pipe.tokenizer(prefix)["input_ids"])
    if n != pipe.prompt_template_encode_start_idx:
        raise ValueError(f"The tokenizer splits the encode template's system part into {n} tokens, but the pipeline "
                         f"drops {pipe.prompt_template_encode_start_idx}: retrain the tokenizer.")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def call_defaults(reasoner_dir: Path) -> dict:
    """The `__call__` arguments the exported model was trained for: `common.CALL_KWARGS`, with what the reasoner
    was trained and evaluated with: its view of the image (`condition_area = condition_size ** 2`), its reasoning
    budget (`max_new_tokens`, never below the default) and the short request template when it was trained on it
    (`template: short`), so the pipeline asks as in training.

    `reasoner_dir` is a stage-2 run folder, or an exported pipeline folder (e.g. the shipped checkpoint, when only
    the editor was retrained): then its own `editr2_call_defaults.json` reasoning settings are kept."""
    from recipes.shapes_tiny.train_reasoner import ReasonerConfig, request_template

    kwargs = dict(common.CALL_KWARGS)
    exported = reasoner_dir / CALL_DEFAULTS_FILE
    if exported.is_file():
        saved = json.loads(exported.read_text())
        kwargs.update({k: saved[k] for k in ("template", "condition_area", "max_new_tokens") if k in saved})
        return kwargs
    config_file = reasoner_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    kwargs["condition_area"] = int(config.get("condition_size", 32)) ** 2
    kwargs["max_new_tokens"] = max(kwargs["max_new_tokens"], int(config.get("max_new_tokens", 0)))
    request = request_template(ReasonerConfig(template=config.get("template", "default")))
    if request is not None:
        kwargs["template"] = request
    return kwargs


def save(pipe, out: Path, dtype: torch.dtype = torch.float16, call_kwargs: dict | None = None) -> int:
    """Save `pipe` in `dtype` to `out` (replaced atomically) with its call defaults (`call_kwargs`, default
    `common.CALL_KWARGS`); returns the folder's size in bytes."""
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.to(dtype)
    pipe.save_pretrained(staging, safe_serialization=True)
    pipe.to(torch.float32)
    kwargs = common.CALL_KWARGS if call_kwargs is None else call_kwargs
    (staging / CALL_DEFAULTS_FILE).write_text(json.dumps(kwargs, indent=2) + "\n")
    if out.exists():
        readme = out / "README.md"
        if readme.exists():
            shutil.copy(readme, staging / "README.md")
        shutil.rmtree(out)
    staging.rename(out)
    size = folder_bytes(out)
    if size > MAX_BYTES:
        raise ValueError(f"{out} is {size / 2**20:.1f} MiB, above the {MAX_BYTES / 2**20:.0f} MiB budget.")
    return size


def load(out: Path):
    from diffusers_editr2 import EditR2Pipeline

    pipe = EditR2Pipeline.from_pretrained(str(out), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench(pipe, num_sessions: int, num_turns: int = 3, seed: int = 0, modes=("intent", "history", "none"),
          progress: bool = True) -> dict:
    """`run_bench` of the pipeline per reasoning mode and of the literal / oracle symbolic editors, per family."""
    from editr2.bench.editors import make_editor
    from editr2.bench.shapes.runner import run_bench

    results: dict = {}
    for family in ("cm", "cu"):
        for name in ("oracle", "literal"):
            results[f"{family}/{name}"] = run_bench(make_editor(name), family, num_sessions, num_turns, seed,
                                                    progress=False, editor_name=name)
        for mode in modes:
            tick = time.perf_counter()
            editor = common.PipelineEditor(pipe, mode)
            results[f"{family}/{mode}"] = run_bench(editor, family, num_sessions, num_turns, seed, progress=progress)
            results[f"{family}/{mode}"]["seconds"] = time.perf_counter() - tick
    return results


def bench_table(results: dict) -> str:
    lines = ["| family | editor | turn | IF | CC | GA | reward |", "|---|---|---|---|---|---|---|"]
    for key, res in results.items():
        family, name = key.split("/")
        for row in res["per_turn"]:
            lines.append(f"| {family} | {name} | {row['turn']} | {row['IF']:.3f} | {row['CC']:.3f} | {row['GA']:.3f} "
                         f"| {row['reward']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="runs/vae", help="stage-1 run folder")
    parser.add_argument("--reasoner", default="runs/reasoner", help="stage-2 run folder")
    parser.add_argument("--editor", default="runs/editor", help="stage-3 run folder")
    parser.add_argument("--out", default="checkpoints/editr2-shapes-tiny", help="the folder to write")
    parser.add_argument("--bench-sessions", type=int, default=0, help="bench sessions per family (0: no bench)")
    parser.add_argument("--bench-turns", type=int, default=3)
    parser.add_argument("--report", default="export_report.json",
                        help="file name of the report, written in the editor run folder (next to --out when --editor "
                             "is a model folder, which stays as it is)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {name: Path(getattr(args, name)) for name in ("vae", "reasoner", "editor")}
    out = Path(args.out)
    pipe = assemble(runs["vae"], runs["reasoner"], runs["editor"])
    size = save(pipe, out, call_kwargs=call_defaults(runs["reasoner"]))
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    report = {"size_bytes": size, "stages": {}}
    for name, run in runs.items():
        metrics = run / "metrics.json"
        report["stages"][name] = json.loads(metrics.read_text()) if metrics.exists() else None
    if args.bench_sessions:
        results = bench(load(out), args.bench_sessions, args.bench_turns, progress=not args.no_progress)
        report["bench"] = results
        print(bench_table(results))
    where = runs["editor"] / args.report
    if (runs["editor"] / "model_index.json").is_file():  # a model folder (e.g. the shipped one): leave it unchanged
        where = out.parent / f"{out.name}.{args.report}"
    common.write_json(where, report)
    print(f"wrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

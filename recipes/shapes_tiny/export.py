"""Assemble the three stages into a diffusers folder (`checkpoints/editr2-shapes-tiny/`), half precision, and bench it.

    python -m recipes.shapes_tiny.export --vae runs/vae --reasoner runs/reasoner --editor runs/editor \
        --out checkpoints/editr2-shapes-tiny --bench-sessions 50

The folder is what `EditR2Pipeline.from_pretrained` loads: `model_index.json`, `scheduler/`, `vae/`, `text_encoder/`,
`tokenizer/`, `processor/`, `transformer/` (fp16 safetensors), plus `editr2_call_defaults.json` (the `__call__`
arguments the model was trained for) and a model card `README.md` with the measured metrics of every stage and, with
`--bench-sessions`, a MICE-Shapes bench of the exported folder itself (reloaded in fp32) per reasoning mode.

`--reasoning-model RUN` adds a separately trained reasoner (a `train_reasoner` run, e.g. one retrained on more
phrasings at another image size) as the pipeline's `reasoning_model/` + `reasoning_processor/`: it writes the
intents, while `--reasoner`'s text encoder keeps encoding the prompts the editor was trained on. Any stage may be an
exported folder, so a shipped model gains a new reasoner without retraining anything else:

    python -m recipes.shapes_tiny.export --vae checkpoints/editr2-shapes-tiny \
        --reasoner checkpoints/editr2-shapes-tiny --editor checkpoints/editr2-shapes-tiny \
        --reasoning-model runs/reasoner_v3 --out checkpoints/editr2-shapes-tiny

`--model FOLDER --adapters RUN` starts from an exported folder instead of the stages and fuses an `EditR2Trainer`
output's adapters into it (the transformer LoRA with `fuse_lora`, the reasoning LoRA with `fuse_reasoning_lora`), so an
RL-trained model ships as plain weights; the report gives how much of the adapters' change the half-precision folder
keeps (`fuse_adapters`):

    python -m recipes.shapes_tiny.export --model checkpoints/editr2-shapes-tiny --adapters runs/rl/rl/seed0 \
        --out checkpoints/editr2-shapes-tiny
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


def assemble(vae_dir: Path, reasoner_dir: Path, editor_dir: Path, reasoning_dir: Path | None = None):
    """The fp32 `EditR2Pipeline` of the three stages' outputs (and of a separate reasoner, `reasoning_dir`)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from diffusers_editr2 import EditR2Pipeline
    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor
    from diffusers_editr2.testing import qwen_image_scheduler_config

    reasoning = {}
    if reasoning_dir is not None:
        reasoning = {"reasoning_model": Qwen2_5_VLForConditionalGeneration.from_pretrained(
                         reasoning_dir / "text_encoder", dtype=torch.float32),
                     "reasoning_processor": Qwen2VLImageOnlyProcessor.from_pretrained(reasoning_dir / "processor")}
    pipe = EditR2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(qwen_image_scheduler_config()),
        vae=AutoencoderKLQwenImage.from_pretrained(vae_dir / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(reasoner_dir / "text_encoder",
                                                                        dtype=torch.float32),
        tokenizer=Qwen2Tokenizer.from_pretrained(reasoner_dir / "tokenizer"),
        processor=Qwen2VLImageOnlyProcessor.from_pretrained(reasoner_dir / "processor"),
        transformer=QwenImageTransformer2DModel.from_pretrained(editor_dir / "transformer"),
        **reasoning,
    )
    check_prompt_template(pipe)
    return pipe


def fuse_adapters(pipe, adapters: Path, dtype: torch.dtype = torch.float16) -> dict:
    """Fuse the adapters of an `EditR2Trainer` output (`adapters`: its output_dir or a checkpoint-N) into `pipe`'s
    weights, and measure what saving in `dtype` keeps of the change.

    Returns:
        `{component: {"loaded", "params_changed", "delta_norm", "rounding_norm", "kept"}}` per fused component
        ("transformer", "reasoning_model"): `delta_norm` = ||W_fused - W_base|| over the changed weights (fp32),
        `rounding_norm` = ||dtype(W_fused) - W_fused||, and `kept` = 1 - rounding / delta (how much of the change
        survives storage when the base weights are already exact in `dtype`, as in a half-precision folder).
    """
    from recipes.shapes_tiny.rl_demo import load_adapters

    parts = {"transformer": pipe.transformer, "reasoning_model": pipe.reasoner}
    before = {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in parts.items()}
    loaded = load_adapters(pipe, adapters)
    if "transformer" in loaded:
        pipe.fuse_lora(safe_fusing=True)  # safe_fusing refuses non-finite weights
        pipe.unload_lora_weights()
    if "reasoning" in loaded:
        pipe.fuse_reasoning_lora()
    report = {}
    for name, module in parts.items():
        after = module.state_dict()
        changed = [k for k, v in after.items() if k in before[name] and not torch.equal(v, before[name][k])]
        delta = sum(float((after[k].float() - before[name][k].float()).pow(2).sum()) for k in changed) ** 0.5
        rounding = sum(float((after[k].to(dtype).float() - after[k].float()).pow(2).sum()) for k in changed) ** 0.5
        report[name] = {"loaded": bool(changed), "params_changed": len(changed), "delta_norm": delta,
                        "rounding_norm": rounding, "kept": 1.0 - rounding / delta if delta > 0 else None}
    return report


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


def call_defaults(reasoner_dir: Path, reasoning_dir: Path | None = None) -> dict:
    """The `__call__` arguments the exported model was trained for: `common.CALL_KWARGS`, with what the reasoner
    was trained and evaluated with: its view of the image (`condition_area = condition_size ** 2`), its reasoning
    budget (`max_new_tokens`, never below the default) and the short request template when it was trained on it
    (`template: short`), so the pipeline asks as in training.

    `reasoner_dir` is a stage-2 run folder, or an exported pipeline folder (e.g. the shipped checkpoint, when only
    the editor was retrained): then its own `editr2_call_defaults.json` reasoning settings are kept.

    With a separate reasoner (`reasoning_dir`, a stage-2 run) the request settings are that reasoner's, and its view
    of the image is `reasoning_condition_area`; `condition_area` stays the text encoder's (the editor's conditioning).
    """
    kwargs = dict(common.CALL_KWARGS)
    kwargs.update(reasoner_defaults(reasoner_dir))
    if reasoning_dir is not None:
        asked = reasoner_defaults(reasoning_dir)
        kwargs.pop("template", None)
        kwargs.update({k: v for k, v in asked.items() if k != "condition_area"})
        kwargs["reasoning_condition_area"] = asked["condition_area"]
    return kwargs


def override_call_kwargs(text: str | None) -> dict:
    """`--call-kwargs` parsed and checked: a JSON object of `EditR2Pipeline.__call__` arguments (not the per-call
    ones: prompt, images, session, reasoning, generator, latents, output_type, return_dict, callbacks)."""
    import inspect

    from diffusers_editr2 import EditR2Pipeline

    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--call-kwargs is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--call-kwargs must be a JSON object, got {type(kwargs).__name__}.")
    per_call = {"prompt", "image", "session", "reasoning", "generator", "latents", "output_type", "return_dict",
                "callback_on_step_end", "callback_on_step_end_tensor_inputs", "attention_kwargs", "negative_prompt"}
    allowed = set(inspect.signature(EditR2Pipeline.__call__).parameters) - {"self"} - per_call
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise SystemExit(f"--call-kwargs: {unknown} are not call defaults a model folder can carry; pass some of "
                         f"{sorted(allowed)}.")
    return kwargs


def reasoner_defaults(reasoner_dir: Path) -> dict:
    """How a reasoner asks: `condition_area`, `max_new_tokens` (never below the default) and, when it was trained on
    one, the request `template`; from a stage-2 run's `config.json`, or an exported folder's call defaults."""
    from recipes.shapes_tiny.train_reasoner import ReasonerConfig, request_template

    exported = reasoner_dir / CALL_DEFAULTS_FILE
    if exported.is_file():
        saved = json.loads(exported.read_text())
        return {k: saved[k] for k in ("template", "condition_area", "max_new_tokens") if k in saved}
    config_file = reasoner_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    kwargs = {"condition_area": int(config.get("condition_size", 32)) ** 2,
              "max_new_tokens": max(common.CALL_KWARGS["max_new_tokens"], int(config.get("max_new_tokens", 0)))}
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
    reset_load_flags(staging)
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


def reset_load_flags(folder: Path) -> None:
    """Reset `local_files_only` in the saved tokenizer configs: transformers records it from the process that loaded
    the tokenizers (true when exporting offline), and it describes that process, not the model."""
    for path in sorted(folder.rglob("tokenizer_config.json")):
        config = json.loads(path.read_text())
        if config.get("local_files_only"):
            config["local_files_only"] = False
            path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


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
    parser.add_argument("--model", default=None,
                        help="start from this exported folder instead of the stage runs (--vae/--reasoner/--editor)")
    parser.add_argument("--adapters", default=None,
                        help="an EditR2Trainer output (or checkpoint-N) whose LoRAs are fused into the weights")
    parser.add_argument("--vae", default="runs/vae", help="stage-1 run folder")
    parser.add_argument("--reasoner", default="runs/reasoner", help="stage-2 run folder")
    parser.add_argument("--editor", default="runs/editor", help="stage-3 run folder")
    parser.add_argument("--reasoning-model", default=None,
                        help="a separate reasoner (stage-2 run folder) that writes the intents; --reasoner's text "
                             "encoder then only encodes prompts")
    parser.add_argument("--call-kwargs", default=None, metavar="JSON",
                        help="call defaults to set or override in editr2_call_defaults.json, e.g. "
                             "'{\"num_inference_steps\": 8}' (each must be an EditR2Pipeline.__call__ argument)")
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
    if args.model is not None:
        return export_model(args)
    if args.adapters is not None:
        raise SystemExit("--adapters goes with --model FOLDER (an exported folder to fuse them into).")
    runs = {name: Path(getattr(args, name)) for name in ("vae", "reasoner", "editor")}
    reasoning = Path(args.reasoning_model) if args.reasoning_model else None
    if reasoning is not None:
        if not (reasoning / "text_encoder").is_dir():
            raise SystemExit(f"--reasoning-model {reasoning}: no text_encoder/ there; pass a finished train_reasoner "
                             "run.")
        runs["reasoning_model"] = reasoning
    kwargs = call_defaults(runs["reasoner"], reasoning)
    kwargs.update(override_call_kwargs(args.call_kwargs))  # checked before the (slow) assembly
    out = Path(args.out)
    pipe = assemble(runs["vae"], runs["reasoner"], runs["editor"], reasoning)
    size = save(pipe, out, call_kwargs=kwargs)
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    report = {"size_bytes": size, "stages": {}}
    for name, run in runs.items():
        metrics = run / "metrics.json"
        report["stages"][name] = json.loads(metrics.read_text()) if metrics.exists() else None
    where = runs["editor"] / args.report
    if (runs["editor"] / "model_index.json").is_file():  # a model folder (e.g. the shipped one): leave it unchanged
        where = out.parent / f"{out.name}.{args.report}"
    return bench_and_report(args, out, report, where)


def bench_and_report(args, out: Path, report: dict, where: Path) -> int:
    """Bench the written folder when `--bench-sessions` asks (into `report["bench"]`), then write `report` to `where`."""
    if args.bench_sessions:
        report["bench"] = bench(load(out), args.bench_sessions, args.bench_turns, progress=not args.no_progress)
        print(bench_table(report["bench"]))
    common.write_json(where, report)
    print(f"wrote {where}")
    return 0


def export_model(args) -> int:
    """`--model FOLDER [--adapters RUN]`: the folder re-exported, with the adapters fused and its call defaults kept
    (updated by `--call-kwargs`); the report (next to `--out`) gives the fusing's measures and the bench."""
    model, out = Path(args.model), Path(args.out)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"--model {model}: not an exported pipeline folder (no model_index.json).")
    if args.reasoning_model is not None:
        raise SystemExit("--reasoning-model goes with the stage runs, not with --model.")
    from diffusers_editr2.call_defaults import read_call_defaults

    kwargs = {**(read_call_defaults(model) or {}), **override_call_kwargs(args.call_kwargs)}
    adapters = Path(args.adapters) if args.adapters else None
    if adapters is not None and not adapters.is_dir():
        raise SystemExit(f"--adapters {adapters}: no such folder; pass an EditR2Trainer output_dir or checkpoint-N.")
    pipe = load(model)
    report: dict = {"model": str(model), "adapters": str(adapters) if adapters else None}
    if adapters is not None:
        report["fused"] = fuse_adapters(pipe, adapters)
        for name, measure in report["fused"].items():
            if measure["loaded"]:
                print(f"fused {name}: {measure['params_changed']} tensors, change kept in fp16 {measure['kept']:.4f}")
    report["size_bytes"] = save(pipe, out, call_kwargs=kwargs)
    print(f"wrote {out} ({report['size_bytes'] / 2**20:.1f} MiB)")
    return bench_and_report(args, out, report, out.parent / f"{out.name}.{args.report}")


if __name__ == "__main__":
    sys.exit(main())

"""Score an editor on generated MICE-Shapes sessions (IF / CC / GA / reward per turn): a symbolic one or a model.

    editr2 bench shapes --editor literal --family cm --sessions 200 --turns 3 --out runs/literal_cm
    editr2 bench shapes --model checkpoints/editr2-shapes-tiny --reasoning intent --family cm --out runs/intent_cm
    editr2 bench shapes --model checkpoints/editr2-shapes-tiny --prompts gold --family cm --turns 6 --out runs/gold_cm

Writes OUT/results.json ({"per_turn", "mean", "restores", "config", "drift"}; every per-turn and mean score with its
95% percentile bootstrap interval over sessions, "IF_ci": [low, high]), OUT/report.md, OUT/per_turn.png and
OUT/drift.png (drift measures per turn and their decay summary, `editr2.bench.drift`); with --model also
OUT/intents.jsonl (per session: instructions, gold intents, the model's operative intents, reasoning fallbacks) and the
VAE-only drift of the model (carried latent vs re-encoding each turn, on the first sessions: `diffusers_editr2.drift`).

--prompts gold scores the model as an editor alone: every turn is prompted with the session's gold intent (the
self-contained operative instruction) with reasoning "none", each turn still editing the carried state of the
previous one, so the per-turn curve shows what the editor's own carried state costs (editor name "editr2-gold").

Resumable like `editr2 bench mice`: each finished session's scores are appended to OUT/session_results.jsonl at once,
and OUT/bench_config.json records the editor, model fingerprint, reasoning mode, sample seed, call settings, family,
turns, first seed and size (and the prompt source with --prompts gold). The same command started again skips the
sessions already recorded, and its report equals an uninterrupted run's; a larger --sessions extends a run. Another
configuration into the same --out stops with the differences named, before the model is loaded: pass --force to
start over, or another --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editr2.bench.shapes.runner import PROMPT_SOURCES
from editr2.intent import REASONING_MODES

EDITOR_NAMES = ("oracle", "identity", "literal")
SESSION_RESULTS = "session_results.jsonl"
# What a run writes into --out (what `--force` deletes).
OUTPUTS = (SESSION_RESULTS, "results.json", "report.md", "per_turn.png", "drift.png", "intents.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    editor = parser.add_mutually_exclusive_group()
    editor.add_argument("--editor", choices=EDITOR_NAMES, default=None,
                        help="which symbolic editor to score (default oracle)")
    editor.add_argument("--model", default=None, metavar="PATH",
                        help="score an EditR2Pipeline folder instead (needs the diffusers extra)")
    parser.add_argument("--family", choices=("cm", "cu"), default="cm",
                        help="cm: persistent rule in turn 1; cu: back-references and undo")
    parser.add_argument("--sessions", type=int, default=100, help="number of sessions (default 100)")
    parser.add_argument("--turns", type=int, default=3, help="turns per session, 1-16 (default 3)")
    parser.add_argument("--phrasing", choices=("seen", "unseen", "all"), default=None,
                        help="write the sessions in everyday phrasing: the training phrasing families (seen), the "
                             "held-out ones (unseen) or both (all); default: the fixed grammar the recorded numbers "
                             "use (reported as 'grammar')")
    parser.add_argument("--seed", type=int, default=0, help="first session seed (default 0)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--force", action="store_true",
                        help="start over: delete the results in --out (needed when --out holds results made with "
                             "another editor, model or settings)")
    model = parser.add_argument_group("--model options")
    model.add_argument("--reasoning", choices=REASONING_MODES, default=None,
                       help="how the history reaches the model (default intent)")
    model.add_argument("--prompts", choices=PROMPT_SOURCES, default=None,
                       help="each turn's prompt: the session's instruction (default), or its gold intent (gold: the "
                            "editor alone on its carried state, with reasoning none)")
    model.add_argument("--steps", type=int, default=None,
                       help="denoising steps per turn (default: the model folder's call defaults)")
    model.add_argument("--sample-seed", type=int, default=None,
                       help="turn k of every session is sampled with seed S + k (default 0)")
    model.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default 1: a tiny model runs fastest on one, and far slower on a "
                            "busy machine with more)")
    model.add_argument("--lora", default=None, metavar="PATH",
                       help="a transformer LoRA (diffusers format, folder or .safetensors file) loaded over the model "
                            "and fused, e.g. a trained baseline: checkpoints/editr2-shapes-tiny-none-lora with "
                            "--reasoning none")
    model.add_argument("--pipeline-kwargs", default=None, metavar="JSON",
                       help='extra EditR2Pipeline arguments for every turn, e.g. \'{"true_cfg_scale": 2.0}\'')


def run(args: argparse.Namespace) -> int:
    from editr2.bench.report import markdown_table, write_report
    from editr2.bench.resume import ConfigMismatchError, open_run, read_results
    from editr2.bench.shapes.runner import run_bench, session_id

    from editr2.bench.shapes.sessions import MAX_TURNS

    if not 1 <= args.turns <= MAX_TURNS:
        raise SystemExit(f"--turns {args.turns}: pass a value in 1..{MAX_TURNS}.")
    if args.sessions < 1:
        raise SystemExit(f"--sessions {args.sessions}: pass at least 1.")
    if args.model is None:
        given = [flag for flag, value in (("--reasoning", args.reasoning), ("--prompts", args.prompts),
                                          ("--steps", args.steps),
                                          ("--sample-seed", args.sample_seed), ("--threads", args.threads),
                                          ("--lora", args.lora), ("--pipeline-kwargs", args.pipeline_kwargs))
                 if value is not None]
        if given:
            raise SystemExit(f"{', '.join(given)} only apply to a model: pass --model PATH as well.")
        from editr2.bench.editors import make_editor

        name = args.editor or "oracle"
        config = {"editor": name}
    else:
        reasoning = _reasoning(args)
        options = _model_options(args)
        config = _model_config(args, options, reasoning)
    config = {"bench": "shapes", **config, "family": args.family, "turns": args.turns, "seed": args.seed,
              "size": args.size}
    if args.phrasing is not None:  # runs recorded before --phrasing existed resume unchanged
        config["phrasing"] = args.phrasing
    try:  # before loading a model: a wrong --out costs nothing
        out = open_run(args.out, config, outputs=OUTPUTS, force=args.force, force_hint="--force",
                       accept=legacy_fingerprint(args))
    except (ConfigMismatchError, ValueError) as err:
        raise SystemExit(f"--out: {err}") from None
    if args.model is None:
        editor = make_editor(name)
    else:
        extra = {"prompts": args.prompts} if args.prompts is not None else {}
        if args.lora is not None:
            extra["lora"] = args.lora
        editor = options["loader"](args.model, reasoning, seed=args.sample_seed or 0,
                                   call_kwargs=options["call_kwargs"], threads=options["threads"], **extra)
        name = editor.name
    results = run_bench(editor, family=args.family, num_sessions=args.sessions, num_turns=args.turns, seed=args.seed,
                        size=args.size, progress=not args.no_progress, editor_name=name,
                        results_path=out / SESSION_RESULTS, phrasing=args.phrasing or "grammar")
    if args.model is not None:
        results["config"].update(model=str(args.model), reasoning=editor.reasoning, sample_seed=editor.seed,
                                 call_kwargs=editor.call_kwargs)
        if args.lora is not None:
            results["config"]["lora"] = str(args.lora)
        if args.prompts == "gold":
            results["config"]["prompts"] = "gold"
        vae = _vae_drift(args, editor)
        if vae is not None:
            results["drift"]["vae"] = vae
    paths = write_report(results, args.out)
    print(markdown_table(results))
    written = ", ".join(str(path) for path in paths.values())
    if args.model is not None:
        recorded = {r["session_id"]: r for r in read_results(out / SESSION_RESULTS)}
        wanted = [recorded[session_id(args.family, args.seed + i)] for i in range(args.sessions)]
        intents = out / "intents.jsonl"
        intents.write_text("".join(json.dumps(r.get("editor_record")) + "\n" for r in wanted))
        written += f", {intents}"
    print(f"wrote {written}")
    return 0


def _reasoning(args: argparse.Namespace) -> str:
    """The reasoning mode of a --model run: --reasoning (default intent); with --prompts gold "none", and any other
    --reasoning refused (the gold intent already says what the history does)."""
    if args.prompts == "gold":
        if args.reasoning not in (None, "none"):
            raise SystemExit(f"--prompts gold with --reasoning {args.reasoning}: each turn's gold intent is already "
                             "the operative instruction, so the model runs with reasoning none; pass --reasoning none "
                             "or leave it out.")
        return "none"
    return args.reasoning or "intent"


def _model_options(args: argparse.Namespace) -> dict:
    """Check the --model options (before anything is written or loaded): the call arguments and thread count."""
    if not (Path(args.model) / "model_index.json").is_file():
        raise SystemExit(f"--model {args.model}: no model_index.json there; pass a folder saved with "
                         "EditR2Pipeline.save_pretrained (e.g. checkpoints/editr2-shapes-tiny).")
    from editr2.bench.runner import model_call_kwargs

    call_kwargs = model_call_kwargs(args.pipeline_kwargs, args.steps)
    threads = 1 if args.threads is None else args.threads
    if threads < 1:
        raise SystemExit(f"--threads {threads}: pass at least 1.")
    if args.lora is not None and not (Path(args.lora).is_file() and args.lora.endswith(".safetensors")
                                      or Path(args.lora).is_dir() and any(Path(args.lora).glob("*.safetensors"))):
        raise SystemExit(f"--lora {args.lora}: pass a folder saved with save_lora_weights or its .safetensors file.")
    from editr2.cli import model_loader  # the diffusers integration's loader; checked before anything is written

    return {"call_kwargs": call_kwargs, "threads": threads, "loader": model_loader()}


def legacy_fingerprint(args: argparse.Namespace) -> dict | None:
    """The model fingerprint as runs recorded it before model cards were left out of it (accepted on resume)."""
    from editr2.bench.resume import model_fingerprint

    if getattr(args, "model", None) is None:
        return None
    return {"model_fingerprint": [model_fingerprint(args.model, documentation=True)]}


def _model_config(args: argparse.Namespace, options: dict, reasoning: str) -> dict:
    """What a --model run's results depend on: the model folder's fingerprint (its call defaults included), reasoning
    mode, sample seed, the call arguments given (thread count excluded: it changes the speed, not the images) and, with
    --prompts gold, the prompt source (left out for instructions: runs recorded before --prompts resume unchanged) and,
    with --lora, the adapter's fingerprint."""
    from editr2.bench.resume import model_fingerprint

    gold = args.prompts == "gold"
    config = {"editor": "editr2-gold" if gold else f"editr2-{reasoning}",
              "model_fingerprint": model_fingerprint(args.model), "reasoning": reasoning,
              "sample_seed": args.sample_seed or 0, "call_kwargs": options["call_kwargs"]}
    if gold:
        config["prompts"] = "gold"
    if args.lora is not None:
        config["lora_fingerprint"] = lora_fingerprint(args.lora)
    return config


def lora_fingerprint(path) -> str:
    """sha256 of a LoRA's weights: the `.safetensors` file, or every one in the folder (its model card and reports
    do not change the images, so editing them does not make a run another configuration)."""
    from editr2.bench.resume import weights_fingerprint

    path = Path(path)
    return weights_fingerprint([path] if path.is_file() else sorted(path.glob("*.safetensors")))


VAE_DRIFT_SESSIONS = 8  # a model's VAE-only drift is measured on this many of the run's first sessions


def _vae_drift(args: argparse.Namespace, editor) -> dict | None:
    """The model VAE's own drift, carried latent vs re-encoding each turn, on the run's first sessions: the editor's
    `vae_drift(sessions)` (`diffusers_editr2.bench.PipelineEditor`; the core imports no integration), or None for an
    editor without one."""
    from editr2.bench.shapes import generate_session

    measure = getattr(editor, "vae_drift", None)
    if not callable(measure):
        return None
    count = min(args.sessions, VAE_DRIFT_SESSIONS)
    phrasing = args.phrasing or "grammar"
    return measure([generate_session(args.family, args.turns, args.seed + i, args.size, phrasing)
                    for i in range(count)])


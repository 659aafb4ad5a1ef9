"""Bench a model whose intents come from another reasoner: that reasoner writes each turn's operative intent, the
model's editor (with its own conditioning encoder) draws it.

    python -m recipes.shapes_tiny.reasoner_swap --reasoner runs/reasoner_v3 --model checkpoints/editr2-shapes-tiny \
        --family cu --sessions 200 --turns 3 --out docs/carried/v3reasoner_mode_cu3 [--phrasing unseen]

The frozen reasoner of a shapes model is also its editor's conditioning encoder, so a retrained reasoner (its own
tokenizer, its own image size) cannot replace it as the text encoder without retraining the editor; it can sit beside
it as the pipeline's separate `reasoning_model` (`export --reasoning-model`). This script benches a reasoner run that
way without exporting a folder: its intents keep the grammar's format, which the editor was trained on, and the
`--reasoner` (a `train_reasoner` run folder, asked as it was trained: its template, image size and budget) writes the
intent from the session so far (the user's instructions and the images the editor drew), and the `--model` pipeline
draws it with `reasoning="none"` (the intent as the prompt, its encoder and call defaults), or restores an earlier
state exactly when the intent names one.
Turn k is sampled with seed k, as `editr2 bench shapes` does, so runs pair with the model's own benches on the same
sessions (`editr2 bench compare`). Output: `session_results.jsonl` (resumable), `results.json` and `intents.jsonl`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch


class SwappedReasonerEditor:
    """A bench editor (`editr2.bench.shapes.runner`): `reasoner` writes the intents, `pipe` draws them."""

    def __init__(self, pipe, call_kwargs: dict, reasoner, reasoner_cfg, name: str = "editr2-intent+reasoner"):
        from recipes.shapes_tiny import train_reasoner as tr

        self.pipe, self.call_kwargs, self.reasoner, self.name = pipe, call_kwargs, reasoner, name
        self.ask = dict(max_new_tokens=reasoner_cfg.max_new_tokens, condition_area=reasoner_cfg.condition_size ** 2,
                        template=tr.request_template(reasoner_cfg))
        self.records: list[dict] = []

    @torch.no_grad()
    def edit_session(self, source, instructions, session=None):
        width, height = self.call_kwargs.get("width"), self.call_kwargs.get("height")
        state, images, intents = None, [], []
        for turn, instruction in enumerate(instructions):
            view = state if state is not None else self.pipe.start_session(source, height, width, None)
            intent = self.reasoner.reason(view, instruction, **self.ask)
            intents.append(intent.text)
            if intent.restore is not None and state is not None:
                state = self.pipe.restore_turn(state, instruction, intent)
            else:
                start = {"image": source} if state is None else {"session": state}
                out = self.pipe(prompt=intent.text, reasoning="none", generator=torch.Generator().manual_seed(turn),
                                **start, **self.call_kwargs)
                last = out.session.turns[-1]  # the turn keeps the user's words; its intent is the reasoner's
                state = replace(out.session, turns=(*out.session.turns[:-1],
                                                    replace(last, instruction=instruction, intent=intent.text)))
            images.append(state.turns[-1].image)
        self.records.append({"family": getattr(session, "family", None), "seed": getattr(session, "seed", None),
                             "instruction": list(instructions), "gold_intent": list(getattr(session, "gold_intent",
                                                                                            [])),
                             "intent": intents})
        return images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reasoner", required=True, help="a train_reasoner run folder (finished: text_encoder/)")
    parser.add_argument("--model", default="checkpoints/editr2-shapes-tiny", help="the pipeline folder that draws")
    parser.add_argument("--family", choices=("cm", "cu"), default="cm")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first session seed (held out: training uses >= 1e7)")
    parser.add_argument("--phrasing", choices=("grammar", "seen", "unseen"), default="grammar")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "model_index.json").is_file():
        raise SystemExit(f"--model {args.model}: no model_index.json there; pass a pipeline folder.")
    if not (Path(args.reasoner) / "text_encoder").is_dir():
        raise SystemExit(f"--reasoner {args.reasoner}: no text_encoder/ there; pass a finished train_reasoner run.")

    from diffusers_editr2 import EditR2Pipeline
    from diffusers_editr2.call_defaults import read_call_defaults
    from editr2.bench.shapes.runner import run_bench
    from recipes.shapes_tiny.reasoner_report import load_reasoner

    torch.set_num_threads(args.threads)
    pipe = EditR2Pipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    calls = {k: v for k, v in (read_call_defaults(args.model) or {}).items() if k not in ("template", "max_new_tokens")}
    reasoner, cfg = load_reasoner(Path(args.reasoner))
    reasoner.reasoner.eval()
    editor = SwappedReasonerEditor(pipe, calls, reasoner, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_bench(editor, args.family, args.sessions, args.turns, args.seed, progress=False,
                        results_path=out / "session_results.jsonl", phrasing=args.phrasing)
    results["config"].update(reasoner=str(args.reasoner), model=str(args.model), call_kwargs=calls)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "intents.jsonl", "a") as f:  # the sessions this invocation ran
        f.write("".join(json.dumps(r) + "\n" for r in editor.records))
    mean = results["mean"]
    print(f"{out}: IF {mean['IF']:.3f} CC {mean['CC']:.3f} GA {mean['GA']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

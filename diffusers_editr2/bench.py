"""`EditR2Pipeline` as a MICE-Shapes bench editor (for `editr2.bench.shapes.runner.run_bench`).

    from diffusers_editr2.bench import load_bench_editor
    from editr2.bench.shapes.runner import run_bench

    editor = load_bench_editor("checkpoints/editr2-shapes-tiny", reasoning="intent")
    results = run_bench(editor, family="cm", num_sessions=200, num_turns=3, seed=1000)

`editr2 bench shapes --model PATH --reasoning MODE` does the same from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from editr2.demo import CALL_DEFAULTS_FILE

from .pipeline_editr2 import REASONING_MODES, EditR2Pipeline

# Without a model's own call defaults, at least work at the image's size, not upstream's 1-megapixel default.
FALLBACK_CALL_KWARGS = {"reference_area": None}


def load_call_defaults(path, fallback: dict = FALLBACK_CALL_KWARGS) -> dict:
    """The `__call__` arguments a model folder was trained for: its `editr2_call_defaults.json` (size, steps, CFG, ...),
    or a copy of `fallback` when the folder has none.

    Args:
        path (`str` or `os.PathLike`): the pipeline folder.
        fallback (`dict`, defaults to `FALLBACK_CALL_KWARGS`): what a folder without the file gets; `{}` keeps the
            pipeline's own (upstream) defaults, as for real Qwen-Image-Edit folders.
    """
    file = Path(path) / CALL_DEFAULTS_FILE
    if not file.is_file():
        return dict(fallback)
    defaults = json.loads(file.read_text())
    if not isinstance(defaults, dict):
        raise ValueError(f"{file} holds {type(defaults).__name__}: it must be a JSON object of `__call__` arguments, "
                         f'e.g. {{"height": 64, "width": 64, "num_inference_steps": 16}}.')
    return defaults


class PipelineEditor:
    """`editor(images, history, instruction) -> PIL image` backed by `EditR2Pipeline`, one pipeline session per bench
    session (so each turn continues from the carried latent of the previous one, as in real use).

    Args:
        pipe ([`EditR2Pipeline`]): the pipeline.
        reasoning (`str`): "intent", "history" or "none".
        seed (`int`): turn k of a session is sampled with seed `seed + k`.
        call_kwargs (`dict`, *optional*): `__call__` arguments for every turn; defaults to the call defaults of the
            folder `pipe` was loaded from (`load_call_defaults`).

    After a session, `session` holds its pipeline session, `intents` its operative intents and `fallbacks` why each
    turn's reasoning answer was not used (None where it was); `records` keeps one dict per bench session (`family`,
    `seed`, `instruction`, `gold_intent`, `intent`, `fallback`).
    """

    def __init__(self, pipe, reasoning: str = "intent", seed: int = 0, call_kwargs: dict | None = None):
        if reasoning not in REASONING_MODES:
            raise ValueError(f"reasoning={reasoning!r}: pass one of {', '.join(REASONING_MODES)}.")
        if call_kwargs is None:
            source = getattr(pipe.config, "_name_or_path", None)
            call_kwargs = load_call_defaults(source) if source else dict(FALLBACK_CALL_KWARGS)
        self.pipe, self.reasoning, self.seed = pipe, reasoning, seed
        self.call_kwargs = dict(call_kwargs)
        self.name = f"editr2-{reasoning}"
        self.session = None
        self.intents: list[str] = []
        self.fallbacks: list[str | None] = []
        self.records: list[dict] = []

    def bind(self, session) -> "PipelineEditor":
        """Start a new bench session (the runner calls this once per session); the editor keeps the last one's
        pipeline session in `self.session` afterwards."""
        self.session, self.intents, self.fallbacks = None, [], []
        self.records.append({"family": getattr(session, "family", None), "seed": getattr(session, "seed", None),
                             "instruction": list(getattr(session, "instruction", [])),
                             "gold_intent": list(getattr(session, "gold_intent", [])),
                             "intent": self.intents, "fallback": self.fallbacks})
        return self

    def vae_drift(self, sessions) -> dict:
        """The VAE-only drift of this editor's pipeline on MICE-Shapes `sessions` (`diffusers_editr2.drift.vae_drift`):
        what carrying the latent costs vs re-encoding the image each turn; `editr2 bench shapes --model` reports it."""
        from .drift import vae_drift

        return vae_drift(self.pipe, sessions)

    @torch.no_grad()
    def __call__(self, images, history, instruction):
        turn = len(images) - 1
        start = {"image": images[0]} if turn == 0 or self.session is None else {"session": self.session}
        out = self.pipe(prompt=instruction, reasoning=self.reasoning,
                        generator=torch.Generator().manual_seed(self.seed + turn), **start, **self.call_kwargs)
        self.session = out.session
        self.intents.append(out.intents[0])
        self.fallbacks.append(out.session.turns[-1].fallback_reason)
        return out.images[0]


def load_bench_editor(path, reasoning: str = "intent", seed: int = 0,
                      call_kwargs: dict | None = None) -> PipelineEditor:
    """Load the pipeline folder `path` in float32 (progress bar off) as a `PipelineEditor`.

    Args:
        path (`str` or `os.PathLike`): a folder saved with `EditR2Pipeline.save_pretrained`.
        reasoning (`str`): "intent", "history" or "none".
        seed (`int`): turn k of a session is sampled with seed `seed + k`.
        call_kwargs (`dict`, *optional*): `__call__` arguments that override the folder's call defaults
            (`load_call_defaults`), e.g. `{"num_inference_steps": 8}`.
    """
    if reasoning not in REASONING_MODES:
        raise ValueError(f"reasoning={reasoning!r}: pass one of {', '.join(REASONING_MODES)}.")
    pipe = EditR2Pipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return PipelineEditor(pipe, reasoning, seed, {**load_call_defaults(path), **(call_kwargs or {})})

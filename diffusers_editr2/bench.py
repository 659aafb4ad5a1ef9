"""`EditR2Pipeline` as a bench editor (`editr2.bench.editors.Editor`), for `editr2 bench shapes`, `editr2 bench mice`
and `editr2 demo`.

    from diffusers_editr2.bench import load_bench_editor
    from editr2.bench.shapes.runner import run_bench

    editor = load_bench_editor("checkpoints/editr2-shapes-tiny", reasoning="intent")
    results = run_bench(editor, family="cm", num_sessions=200, num_turns=3, seed=1000)

`editr2 bench shapes --model PATH --reasoning MODE` does the same from the command line.

With `prompts="gold"` (`editr2 bench shapes --model PATH --prompts gold`) the editor is scored alone: every turn's
prompt is the session's gold intent (`session.gold_intent[t]`, the self-contained operative instruction) instead of its
instruction, with `reasoning="none"`, each turn still editing the carried latent of the previous one. Whether one-turn
IF stays flat over the turns then depends on the editor and its own carried state only, not on reading the history.
A gold intent that names an earlier state (an undo: `editr2.intent.parse_restore`) restores it exactly, as
`reasoning="intent"` does with such an intent (`EditR2Pipeline.restore_turn`); no model runs on that turn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editr2.bench.shapes.runner import PROMPT_SOURCES
from editr2.intent import REASONING_MODES, Intent, parse_restore

from .pipeline_editr2 import EditR2Pipeline

# What a MICE-Shapes run uses for a pipeline without call defaults: the image's own size, not upstream's 1 megapixel.
IMAGE_SIZE_CALL_KWARGS = {"reference_area": None}


class PipelineEditor:
    """An `Editor` backed by `EditR2Pipeline`: one pipeline session per bench session, each turn continuing from the
    carried latent of the previous one (as in real use).

    Args:
        pipe ([`EditR2Pipeline`]): the pipeline.
        reasoning (`str`): "intent", "history" or "none".
        seed (`int`): with `turn_seeds`, turn k of a session is sampled with seed `seed + k`; without, one generator
            seeded with `seed` serves a session's turns in order.
        call_kwargs (`dict`, *optional*): `__call__` arguments for every turn; defaults to the pipeline's
            `call_defaults` (its folder's `editr2_call_defaults.json`), or `IMAGE_SIZE_CALL_KWARGS` when it has none.
        name (`str`, *optional*): the editor's name in results; defaults to `"editr2-<reasoning>"`, or
            `"editr2-gold"` with `prompts="gold"`.
        turn_seeds (`bool`, defaults to `True`): see `seed`.
        prompts (`str`, defaults to `"instruction"`): the prompt of turn t: the instruction passed to `edit_session`
            ("instruction"), or the bench session's gold intent `session.gold_intent[t]` ("gold": the editor alone,
            on its own carried state; needs `reasoning="none"`, since a gold intent already holds what the history
            says, and a session with one gold intent per turn).

    After a session, `session` holds its pipeline session, `intents` its operative intents and `fallbacks` why each
    turn's reasoning answer was not used (None where it was); `records` keeps one dict per bench session (`family`,
    `seed`, `instruction`, `gold_intent`, `intent`, `fallback`).
    """

    def __init__(self, pipe, reasoning: str = "intent", seed: int = 0, call_kwargs: dict | None = None, *,
                 name: str | None = None, turn_seeds: bool = True, prompts: str = "instruction"):
        if reasoning not in REASONING_MODES:
            raise ValueError(f"reasoning={reasoning!r}: pass one of {', '.join(REASONING_MODES)}.")
        if prompts not in PROMPT_SOURCES:
            raise ValueError(f"prompts={prompts!r}: pass one of {', '.join(PROMPT_SOURCES)}.")
        if prompts == "gold" and reasoning != "none":
            raise ValueError(f"prompts='gold' with reasoning={reasoning!r}: a gold intent is already the operative "
                             "instruction, pass reasoning='none'.")
        if call_kwargs is None:
            call_kwargs = getattr(pipe, "call_defaults", None) or IMAGE_SIZE_CALL_KWARGS
        self.pipe, self.reasoning, self.seed, self.turn_seeds = pipe, reasoning, seed, turn_seeds
        self.call_kwargs = dict(call_kwargs)
        self.prompts = prompts
        self.name = name or ("editr2-gold" if prompts == "gold" else f"editr2-{reasoning}")
        self.session = None
        self.intents: list[str] = []
        self.fallbacks: list[str | None] = []
        self.records: list[dict] = []

    def vae_drift(self, sessions) -> dict:
        """The VAE-only drift of this editor's pipeline on MICE-Shapes `sessions` (`diffusers_editr2.drift.vae_drift`):
        what carrying the latent costs vs re-encoding the image each turn; `editr2 bench shapes --model` reports it."""
        from .drift import vae_drift

        return vae_drift(self.pipe, sessions)

    def turn_prompts(self, instructions, session=None) -> list[str]:
        """The prompt of each turn: `instructions`, or with `prompts="gold"` the bench session's gold intents (one per
        instruction; a `ValueError` names what to pass when `session` has none)."""
        instructions = list(instructions)
        if self.prompts == "instruction":
            return instructions
        gold = getattr(session, "gold_intent", None)
        if gold is None:
            raise ValueError("prompts='gold' needs the bench session: pass edit_session(source, instructions, session) "
                             "with a session that has `gold_intent` (e.g. a MICE-Shapes session).")
        gold = list(gold)
        if len(gold) != len(instructions):
            raise ValueError(f"prompts='gold': the session has {len(gold)} gold intents for {len(instructions)} "
                             "instructions; pass a session with one gold intent per turn.")
        return gold

    @torch.no_grad()
    def edit_session(self, source, instructions, session=None):
        prompts = self.turn_prompts(instructions, session)  # before any turn runs
        self.session, self.intents, self.fallbacks = None, [], []
        record = {"family": getattr(session, "family", None), "seed": getattr(session, "seed", None),
                  "instruction": list(getattr(session, "instruction", [])),
                  "gold_intent": list(getattr(session, "gold_intent", [])), "intent": self.intents,
                  "fallback": self.fallbacks}
        self.records.append(record)
        shared = None if self.turn_seeds else torch.Generator(device="cpu").manual_seed(self.seed)
        images = []
        for turn, prompt in enumerate(prompts):
            restore = parse_restore(prompt, turn) if self.prompts == "gold" else None
            if restore is not None:  # a gold undo: the pipeline's exact restore, as the intent mode does
                self.session = self.pipe.restore_turn(self.session, instructions[turn], Intent(prompt, restore=restore))
                self.intents.append(prompt)
                self.fallbacks.append(None)
                images.append(self.session.turns[-1].image)
                continue
            start = {"image": source} if turn == 0 else {"session": self.session}
            generator = torch.Generator().manual_seed(self.seed + turn) if shared is None else shared
            out = self.pipe(prompt=prompt, reasoning=self.reasoning, generator=generator, **start,
                            **self.call_kwargs)
            self.session = out.session
            self.intents.append(out.intents[0])
            self.fallbacks.append(out.session.turns[-1].fallback_reason)
            images.append(out.images[0])
        return images


def load_bench_editor(path, reasoning: str = "intent", seed: int = 0, call_kwargs: dict | None = None, *,
                      dtype: torch.dtype | None = torch.float32, device: str | None = None,
                      fallback: dict = IMAGE_SIZE_CALL_KWARGS, threads: int | None = None,
                      lora: str | None = None, **editor_kwargs) -> PipelineEditor:
    """Load the pipeline folder `path` (progress bar off) as a `PipelineEditor`.

    Args:
        path (`str` or `os.PathLike`): a folder saved with `EditR2Pipeline.save_pretrained`.
        reasoning (`str`): "intent", "history" or "none".
        seed (`int`): see `PipelineEditor`.
        call_kwargs (`dict`, *optional*): `__call__` arguments over the folder's call defaults (`pipe.call_defaults`,
            or `fallback` when it has none), e.g. `{"num_inference_steps": 8}`.
        dtype (`torch.dtype`, *optional*, defaults to float32): passed to `from_pretrained` (None: its default).
        device (`str`, *optional*): where to move the pipeline.
        fallback (`dict`): the call defaults of a folder without any; `{}` keeps upstream's (real Qwen folders).
        threads (`int`, *optional*): torch CPU threads to use.
        lora (`str` or `os.PathLike`, *optional*): a transformer LoRA (diffusers format: a folder or a
            `.safetensors` file) loaded with `load_lora_weights` and fused into the weights (no extra matmuls per
            step); the editor's name gets a `+lora` suffix.
        editor_kwargs: `name`, `turn_seeds`, `prompts` (see `PipelineEditor`).
    """
    if reasoning not in REASONING_MODES:
        raise ValueError(f"reasoning={reasoning!r}: pass one of {', '.join(REASONING_MODES)}.")
    if threads is not None:
        torch.set_num_threads(threads)
    pipe = EditR2Pipeline.from_pretrained(str(path), **({} if dtype is None else {"dtype": dtype}))
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        lora = Path(lora)
        if lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    call_kwargs = {**(pipe.call_defaults or fallback), **(call_kwargs or {})}
    editor = PipelineEditor(pipe, reasoning, seed, call_kwargs, **editor_kwargs)
    if lora is not None:
        editor.name = f"{editor.name}+lora"
    return editor

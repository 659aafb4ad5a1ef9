"""The MICE-Bench judges as TRL-style reward functions: ``fn(prompts, images, **kwargs) -> list[float | None]``.

One call scores a batch of turns (one sample = one turn of one rollout). Samples are judged concurrently up to what
the back-end allows (an HTTP judge: its ``max_concurrency``; a local model: one at a time). A sample whose judgement is
missing or not applicable gets None, which the trainer excludes; no default score is made up.

Per-sample keyword arguments (lists as long as `images`; TRL passes dataset columns this way):

- ``input_images``: the image this turn edited (IF). Default: the last of ``history_images``.
- ``source_images``: the session's original image (CC). Default: the first of ``history_images``, else ``input_images``.
- ``history_images``: images before this turn's output, ``[source, out_1, ..., out_{t-1}]`` (GA).
- ``history_prompts``: the raw instructions of the earlier turns (GA).
- ``task_type``, ``formatted_instruction``, ``unchanged_objects``, ``all_objects``, ``bg_consistency``: this turn's
  MICE fields; or ``sessions`` (`MiceSession` per sample) with ``turn`` (0-based) to take them from the session.
- ``turn``: 0-based turn index. Other keyword arguments (``completions``, ``trainer_state``, ...) are ignored.

These are the columns `trl_editr2.EditR2Trainer.reward_kwargs` passes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .protocol import Judge, TurnRequest

# Weights of the paper's reward, in the order `mice_reward_functions` returns the functions.
REWARD_WEIGHTS = {"IF": 0.3, "CC": 0.3, "GA": 0.4}


def to_pil(image: Any) -> Image.Image:
    """PIL image, ``(C, H, W)`` tensor in [0, 1] or ``(H, W, C)`` uint8 array -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    raise TypeError(f"expected a PIL image, a (C, H, W) tensor or an (H, W, C) array, got {type(image).__name__}")


def prompt_text(prompt: Any) -> str:
    """A plain prompt string, or the last user message's text of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content", "")
                if isinstance(content, str):
                    return content
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict)).strip()
    raise TypeError(f"cannot read an instruction out of a prompt of type {type(prompt).__name__}")


def build_requests(prompts: Sequence[Any], images: Sequence[Any], **kwargs: Any) -> list[TurnRequest]:
    """Turn TRL-style batch arguments into `TurnRequest`s (see the module docstring for the keyword arguments)."""
    count = len(images)
    if len(prompts) != count:
        raise ValueError(f"got {len(prompts)} prompts for {count} images; pass one prompt per image")
    for key, value in kwargs.items():
        if isinstance(value, (list, tuple)) and len(value) != count:
            raise ValueError(f"keyword {key!r} has {len(value)} entries for {count} images; pass one per image")
    sessions, turns = kwargs.get("sessions"), kwargs.get("turn")
    if sessions is not None and turns is None:
        raise ValueError("with `sessions`, also pass `turn` (0-based turn index per sample)")

    def column(name: str, index: int, default: Any = None) -> Any:
        if kwargs.get(name) is not None:
            return kwargs[name][index]
        if sessions is not None:
            session, turn = sessions[index], int(turns[index])
            return getattr(session, name)[turn] if getattr(session, name) else default
        return default

    requests = []
    for i in range(count):
        history = [to_pil(im) for im in (kwargs["history_images"][i] if kwargs.get("history_images") else [])]
        if kwargs.get("input_images") is not None:
            input_image = to_pil(kwargs["input_images"][i])
        elif history:
            input_image = history[-1]
        else:
            raise ValueError("pass `input_images` (the image each turn edited) or `history_images`")
        if kwargs.get("source_images") is not None:
            source_image = to_pil(kwargs["source_images"][i])
        else:
            source_image = history[0] if history else input_image
        history_prompts = kwargs["history_prompts"][i] if kwargs.get("history_prompts") else []
        if sessions is not None and not history_prompts:
            history_prompts = list(sessions[i].instruction[: int(turns[i])])
        requests.append(TurnRequest(
            turn=int(turns[i]) if turns is not None else len(history_prompts),
            instruction=prompt_text(prompts[i]),
            task_type=column("task_type", i, ""),
            formatted_instruction=column("formatted_instruction", i, "") or prompt_text(prompts[i]),
            source_image=source_image,
            input_image=input_image,
            output_image=to_pil(images[i]),
            unchanged_objects=tuple(column("unchanged_objects", i, ()) or ()),
            all_objects=tuple(column("all_objects", i, ()) or ()),
            bg_consistency=bool(column("bg_consistency", i, False)),
            history_images=tuple(history) if history else (input_image,),
            history_instructions=tuple(history_prompts),
        ))
    return requests


class JudgeReward:
    """A judge as a TRL reward function.

    Its `__name__` ("IF", "CC" or "GA", the judge's name by default) is the name the trainer logs and weights it under,
    so `EditR2Config`'s default ``reward_weights = {"IF": 0.3, "CC": 0.3, "GA": 0.4}`` applies as is.
    """

    def __init__(self, judge: Judge, name: str | None = None):
        self.judge = judge
        self.__name__ = name or judge.name
        self.last_judgements: list = []

    def __call__(self, prompts: Sequence[Any], images: Sequence[Any], **kwargs: Any) -> list[float | None]:
        requests = build_requests(prompts, images, **kwargs)
        self.last_judgements = self.judge.judge_many(requests)
        return [judgement.score for judgement in self.last_judgements]


def mice_reward_functions(judges) -> tuple[list[JudgeReward], list[float]]:
    """Reward functions for the metrics a `JudgeSet` has, and their paper weights (0.3 IF, 0.3 CC, 0.4 GA).

    Pass them as ``reward_funcs`` and ``reward_weights`` to the trainer.
    """
    functions, weights = [], []
    for name, judge in (("IF", judges.if_judge), ("CC", judges.cc_judge), ("GA", judges.ga_judge)):
        if judge is not None:
            functions.append(JudgeReward(judge))
            weights.append(REWARD_WEIGHTS[name])
    return functions, weights

"""GA (global awareness): are turns 1..t all satisfied, in order, with every persistent rule respected?

One VLM call reads the whole ordered image sequence ``[source, out_1, ..., out_T]`` with all instructions so far and
gives a verdict per turn, stopping at the first failure. The score is cumulative: the first failed turn and every
later turn score 0, whatever the model says afterwards. Each vote yields such a 0/1 vector; the score of turn t is the
mean of the successful votes' entry t (the paper: 4 votes at temperature 0.6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from .backends import VLM
from .protocol import (
    JudgeBase,
    Judgement,
    JudgeInputError,
    JudgeParseError,
    RetryPolicy,
    TurnRequest,
    aggregate_votes,
    check_vote_counts,
    describe_error,
    judge_with_retries,
    map_bounded,
)

GA_PROMPT = """You are judging a multi-turn image editing session: {num_images} images in order and {num_turns} \
editing instruction(s). Image 1 is the original. For turn i, image i is the input and image i+1 is the result of \
instruction i.

A turn succeeds only if both hold:
1. The result carries out instruction i.
2. Every persistent rule stated in an earlier or the current instruction (for example "from now on, anything you add \
or change must be red") is respected. Such a rule applies only to the object edited in this turn, not to the rest of \
the image; tinting the whole image does not satisfy it. A turn that removes an object is exempt from such rules.

Judge turn 1, then turn 2, and so on. For each turn write <turn_i>yes</turn_i> or <turn_i>no</turn_i>, with i the \
turn number. At the first "no", stop: do not judge later turns. End with <final>yes</final> if every turn \
succeeded, otherwise <final>no</final>. Write nothing else.

Instructions:
{instructions}"""

_TURN_TAG = re.compile(r"<(?:answer_)?turn_?(\d+)>\s*(yes|no)\b", re.IGNORECASE)
_FINAL_TAG = re.compile(r"<(?:answer_)?final>\s*(yes|no)\b", re.IGNORECASE)


@dataclass
class GAConfig:
    """GA judge settings.

    Attributes:
        num_votes: VLM calls per session (the paper uses 4).
        temperature: sampling temperature of each vote (the paper uses 0.6).
        min_valid_votes: successful votes a score needs.
        max_tokens: answer length budget (None: the back-end's default).
    """

    num_votes: int = 4
    temperature: float = 0.6
    min_valid_votes: int = 1
    max_tokens: int | None = None

    def __post_init__(self):
        check_vote_counts(self.num_votes, self.min_valid_votes)


def build_ga_prompt(instructions: Sequence[str]) -> str:
    lines = "\n".join(f"Turn {i}: {text}" for i, text in enumerate(instructions, start=1))
    return GA_PROMPT.format(num_images=len(instructions) + 1, num_turns=len(instructions), instructions=lines)


def parse_ga_answer(text: str, num_turns: int) -> list[float]:
    """Per-turn cumulative 0/1 scores from a GA answer.

    Turns are read in order; the first "no" scores 0 for that turn and every later one (later verdicts are ignored).
    An answer with no per-turn tags but ``<final>yes</final>`` scores every turn 1.

    Raises:
        JudgeParseError: a turn before the first "no" has no verdict, or the final verdict contradicts the turns.
    """
    verdicts: dict[int, bool] = {}
    for match in _TURN_TAG.finditer(text):
        verdicts.setdefault(int(match.group(1)), match.group(2).lower() == "yes")
    final_match = _FINAL_TAG.search(text)
    final = None if final_match is None else final_match.group(1).lower() == "yes"

    if not verdicts:
        if final is True:
            return [1.0] * num_turns
        if final is False and num_turns == 1:
            return [0.0]
        raise JudgeParseError(f"no per-turn verdicts in the answer: {text.strip()[:120]!r}")
    scores: list[float] = []
    for turn in range(1, num_turns + 1):
        if turn not in verdicts:
            raise JudgeParseError(f"no verdict for turn {turn} (and no earlier 'no'): {text.strip()[:120]!r}")
        if not verdicts[turn]:
            scores += [0.0] * (num_turns - turn + 1)
            break
        scores.append(1.0)
    if final is False and all(scores):
        raise JudgeParseError("every turn says yes but the final verdict is no")
    return scores


class GAJudge(JudgeBase):
    """Cumulative global-awareness judge over the whole image sequence.

    Args:
        vlm: the VLM back-end.
        config: `GAConfig`.
        retry: retry policy per vote (unparsable answers).
    """

    name = "GA"

    def __init__(self, vlm: VLM, config: GAConfig | None = None, retry: RetryPolicy | None = None):
        self.vlm = vlm
        self.config = config or GAConfig()
        self.retry = retry or RetryPolicy()
        self.max_workers = max(1, int(getattr(vlm, "max_concurrency", 1)))

    def judge(self, request: TurnRequest) -> Judgement:
        """GA of turn ``request.turn``: the session prefix up to this turn, judged as a whole."""
        images = list(request.history_images) + [request.output_image]
        instructions = list(request.history_instructions) + [request.instruction]
        return self.judge_session(images, instructions)[-1]

    def judge_session(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[Judgement]:
        """One judgement per turn for ``images = [source, out_1, ..., out_T]`` and T instructions."""
        num_turns = len(instructions)
        if num_turns == 0 or len(images) != num_turns + 1:
            error = JudgeInputError(f"GA needs T + 1 images for T instructions, got {len(images)} images and "
                                    f"{num_turns} instructions")
            return [Judgement.missing(describe_error(error))] * max(num_turns, 1)
        prompt = build_ga_prompt(instructions)

        def one_vote(_: int) -> tuple[list[float] | None, str | None]:
            holder: list[list[float]] = []

            def attempt() -> Judgement:
                answer = self.vlm.ask(list(images), prompt, temperature=self.config.temperature,
                                      max_tokens=self.config.max_tokens)
                holder[:] = [parse_ga_answer(answer, num_turns)]
                return Judgement(1.0)

            result = judge_with_retries(attempt, self.retry)
            return (holder[0], None) if result.status == "ok" else (None, result.reason)

        outcomes = map_bounded(one_vote, list(range(self.config.num_votes)), self.max_workers)
        votes = [vector for vector, _ in outcomes]
        failures = [reason for _, reason in outcomes if reason]
        judgements = []
        for turn in range(num_turns):
            per_vote = [None if v is None else v[turn] for v in votes]
            judgement = aggregate_votes(per_vote, min_valid=self.config.min_valid_votes,
                                        reason=f"cumulative over turns 1..{turn + 1}")
            if judgement.is_missing and failures:
                judgement = Judgement.missing(f"{judgement.reason}; failures: {' | '.join(sorted(set(failures)))}",
                                              per_vote)
            judgements.append(judgement)
        return judgements

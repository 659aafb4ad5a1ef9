"""The small protocol every MICE-Bench judge follows: requests, judgements, votes, retries, answer parsing.

A judgement is a score, or *missing* with the reason, or *skipped* (the metric does not apply to this turn). A judge
never invents a score: a failed call is retried, and when the retries run out the judgement is missing and the caller
excludes it (the paper's reward servers return 0.5 instead; this project does not).
"""

from __future__ import annotations

import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TypeVar, runtime_checkable

from PIL import Image

if TYPE_CHECKING:
    from ..mice import MiceSession

logger = logging.getLogger(__name__)
T = TypeVar("T")

OK, MISSING, SKIPPED = "ok", "missing", "skipped"


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


class JudgeError(Exception):
    """A judge call failed in a way that is worth retrying (an answer that does not parse, a flaky model)."""


class JudgeParseError(JudgeError):
    """The model answered, but not in the form asked for."""


class BackendError(JudgeError):
    """A back-end gave up after its own retries (HTTP timeouts, 5xx, garbage bodies). Not retried again."""


class JudgeInputError(ValueError):
    """The request itself is unusable (wrong number of images, empty instruction). Never retried."""


# ---------------------------------------------------------------------------------------------------------------------
# Requests and judgements
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """The verdict of one judge on one turn.

    Attributes:
        score: the score (IF and GA in [0, 1]; CC a DINO similarity), or None when missing or skipped.
        status: "ok", "missing" (the judge failed after retries: excluded, and counted) or "skipped" (not applicable).
        reason: a short human-readable explanation (why it failed, or what was checked).
        votes: per-vote scores (None for a vote that failed), when the judge votes.
    """

    score: float | None
    status: str = OK
    reason: str = ""
    votes: tuple[float | None, ...] = ()

    def __post_init__(self):
        if self.status not in (OK, MISSING, SKIPPED):
            raise ValueError(f"status must be 'ok', 'missing' or 'skipped', got {self.status!r}")
        if (self.status == OK) != (self.score is not None):
            raise ValueError(f"a judgement has a score exactly when its status is 'ok' (got {self.status}, "
                             f"score={self.score})")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"a judgement score must be finite, got {self.score}")

    @classmethod
    def missing(cls, reason: str, votes: Sequence[float | None] = ()) -> "Judgement":
        return cls(None, MISSING, reason, tuple(votes))

    @classmethod
    def skipped(cls, reason: str) -> "Judgement":
        return cls(None, SKIPPED, reason)

    @property
    def is_missing(self) -> bool:
        return self.status == MISSING

    def to_dict(self) -> dict:
        return {"score": self.score, "status": self.status, "reason": self.reason, "votes": list(self.votes)}


@dataclass(frozen=True)
class TurnRequest:
    """Everything a judge may look at for one turn t (0-based).

    Attributes:
        turn: 0-based turn index.
        instruction: turn t's raw instruction.
        task_type: turn t's task type.
        formatted_instruction: turn t's self-contained instruction with [bracketed] objects.
        source_image: the ORIGINAL image (turn 0's input): CC compares against it.
        input_image: the image turn t edited (IF compares input -> output).
        output_image: the image turn t produced.
        unchanged_objects: objects that must be unchanged at turn t.
        all_objects: all objects mentioned so far (their boxes are masked out of the background for CC).
        bg_consistency: whether the background must be unchanged at turn t.
        history_images: images before the output, in order: [source, out_1, ..., out_{t-1}] (GA).
        history_instructions: the raw instructions of turns 0..t-1 (GA).
    """

    turn: int
    instruction: str
    task_type: str
    formatted_instruction: str
    source_image: Image.Image
    input_image: Image.Image
    output_image: Image.Image
    unchanged_objects: tuple[str, ...] = ()
    all_objects: tuple[str, ...] = ()
    bg_consistency: bool = False
    history_images: tuple[Image.Image, ...] = ()
    history_instructions: tuple[str, ...] = ()

    @classmethod
    def from_session(cls, session: "MiceSession", images: Sequence[Image.Image], turn: int) -> "TurnRequest":
        """Build turn `turn`'s request from a session and its images ``[source, out_1, ..., out_T]``."""
        if len(images) < turn + 2:
            raise JudgeInputError(f"turn {turn} needs {turn + 2} images [source, out_1, ...], got {len(images)}")
        return cls(
            turn=turn,
            instruction=session.instruction[turn],
            task_type=session.task_type[turn],
            formatted_instruction=session.formatted_instruction[turn],
            source_image=images[0],
            input_image=images[turn],
            output_image=images[turn + 1],
            unchanged_objects=tuple(session.unchanged_objects[turn]),
            all_objects=tuple(session.all_objects[turn]) if session.all_objects else (),
            bg_consistency=bool(session.bg_consistency[turn]),
            history_images=tuple(images[: turn + 1]),
            history_instructions=tuple(session.instruction[:turn]),
        )


@runtime_checkable
class Judge(Protocol):
    """A judge scores one turn. `judge_many` may run requests concurrently (what the back-end allows)."""

    name: str

    def judge(self, request: TurnRequest) -> Judgement: ...

    def judge_many(self, requests: Sequence[TurnRequest]) -> list[Judgement]: ...


class JudgeBase:
    """Shared `judge_many`: runs `judge` over requests, concurrently up to `max_workers` (1 = in order)."""

    name = "judge"
    max_workers: int = 1

    def judge(self, request: TurnRequest) -> Judgement:  # pragma: no cover - overridden
        raise NotImplementedError

    def judge_many(self, requests: Sequence[TurnRequest]) -> list[Judgement]:
        return map_bounded(self.judge, requests, self.max_workers)


def map_bounded(fn: Callable[[T], object], items: Sequence[T], max_workers: int) -> list:
    """``[fn(x) for x in items]``, with at most `max_workers` calls running at once; order is kept."""
    if max_workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(fn, items))


# ---------------------------------------------------------------------------------------------------------------------
# Retries and votes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retry with exponential backoff.

    Attributes:
        max_attempts: total attempts (1 = no retry).
        initial_backoff_s: wait before the second attempt.
        multiplier: each later wait is this many times the previous one.
        max_backoff_s: cap on a single wait.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.5
    multiplier: float = 2.0
    max_backoff_s: float = 8.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.multiplier < 1 or self.max_backoff_s < 0:
            raise ValueError("backoff times must be >= 0 and multiplier >= 1")

    def delays(self) -> list[float]:
        """The waits between attempts: ``max_attempts - 1`` values."""
        waits, wait = [], self.initial_backoff_s
        for _ in range(self.max_attempts - 1):
            waits.append(min(wait, self.max_backoff_s))
            wait *= self.multiplier
        return waits


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    retry_on: tuple[type[BaseException], ...] = (JudgeError,),
    no_retry: tuple[type[BaseException], ...] = (BackendError,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn` until it returns, retrying `retry_on` errors (not `no_retry` ones) with backoff; re-raise the last."""
    delays = policy.delays()
    for attempt in range(policy.max_attempts):
        try:
            return fn()
        except no_retry:
            raise
        except retry_on as err:
            if attempt == policy.max_attempts - 1:
                raise
            logger.debug("attempt %d failed (%s); retrying in %.2fs", attempt + 1, err, delays[attempt])
            sleep(delays[attempt])
    raise AssertionError("unreachable")


def describe_error(err: BaseException) -> str:
    text = str(err).strip().replace("\n", " ")
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def judge_with_retries(fn: Callable[[], Judgement], policy: RetryPolicy) -> Judgement:
    """Run a judgement; retry parse failures; anything that still fails becomes a *missing* judgement with its reason.

    `JudgeError`s (unparsable answers) are retried; `BackendError`s (already retried by the back-end), input errors and
    unexpected exceptions are not. Nothing raises out of here, and no score is ever made up.
    """
    try:
        return call_with_retries(fn, policy)
    except JudgeError as err:
        tries = "" if isinstance(err, BackendError) else f" after {policy.max_attempts} attempt(s)"
        return Judgement.missing(f"judge failed{tries}: {describe_error(err)}")
    except Exception as err:  # noqa: BLE001 - a judge failure must not end a bench run; it is recorded instead
        logger.warning("judge raised %s", describe_error(err))
        return Judgement.missing(f"judge error: {describe_error(err)}")


def aggregate_votes(votes: Sequence[float | None], *, min_valid: int = 1, reason: str = "") -> Judgement:
    """Average the votes that succeeded; missing when fewer than `min_valid` succeeded.

    Args:
        votes: one score per vote, None for a vote that failed after its retries.
        min_valid: how many successful votes a score needs.
        reason: carried into the judgement.

    Example: ``aggregate_votes([1, 0, None, 1])`` scores 2/3 and records one missing vote.
    """
    if min_valid < 1:
        raise ValueError(f"min_valid must be >= 1, got {min_valid}")
    valid = [float(v) for v in votes if v is not None]
    failed = len(votes) - len(valid)
    if len(valid) < min_valid:
        prefix = f"only {len(valid)} of {len(votes)} votes succeeded (need {min_valid})"
        return Judgement.missing(f"{prefix}; {reason}" if reason else prefix, votes)
    note = f"{len(valid)}/{len(votes)} votes" + (f", {failed} failed" if failed else "")
    reason = f"{reason} ({note})" if reason else note
    return Judgement(sum(valid) / len(valid), OK, reason, tuple(votes))


def check_vote_counts(num_votes: int, min_valid_votes: int) -> None:
    """Validate a judge config's vote settings (`num_votes` votes, `min_valid_votes` of them needed for a score)."""
    if num_votes < 1 or min_valid_votes < 1 or min_valid_votes > num_votes:
        raise ValueError("need num_votes >= 1 and 1 <= min_valid_votes <= num_votes")


def run_votes(
    vote: Callable[[int], tuple[float, str]],
    num_votes: int,
    policy: RetryPolicy,
    *,
    min_valid: int = 1,
    max_workers: int = 1,
) -> Judgement:
    """Run `num_votes` votes (each retried by `policy`) and aggregate them.

    Args:
        vote: ``vote(index) -> (score, reason)``; raises `JudgeError` to fail (and be retried).
        num_votes: how many votes.
        policy: retry policy per vote.
        min_valid: successful votes needed for a score.
        max_workers: votes run at once (a back-end's concurrency; 1 = one after the other).
    """
    results = map_bounded(lambda index: judge_with_retries(lambda: _as_judgement(vote(index)), policy),
                          list(range(num_votes)), max_workers)
    scores: list[float | None] = [result.score for result in results]
    reasons: list[str] = [result.reason for result in results]
    first = next((r for s, r in zip(scores, reasons) if s is not None), "")
    failures = sorted({r for s, r in zip(scores, reasons) if s is None})
    judgement = aggregate_votes(scores, min_valid=min_valid, reason=first)
    if failures and judgement.is_missing:
        return Judgement.missing(f"{judgement.reason}; failures: {' | '.join(failures)}", scores)
    return judgement


def _as_judgement(result: tuple[float, str]) -> Judgement:
    score, reason = result
    return Judgement(float(score), OK, reason)


# ---------------------------------------------------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------------------------------------------------

_YES_NO = re.compile(r"(?<![a-z])(yes|no)(?![a-z])")
_LEADING_YES_NO = re.compile(r"^[\W_]*(yes|no)(?![a-z])")
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def parse_yes_no(text: str) -> bool:
    """Parse a yes/no answer: True for yes, False for no.

    The answer may start with the word ("Yes.", "NO, it is blue") or contain exactly one of the two words.

    Raises:
        JudgeParseError: when the answer says neither, or both without leading with one.
    """
    if not isinstance(text, str):
        raise JudgeParseError(f"expected a text answer, got {type(text).__name__}")
    lowered = text.strip().lower()
    lead = _LEADING_YES_NO.match(lowered)
    if lead:
        return lead.group(1) == "yes"
    found = {m.group(1) for m in _YES_NO.finditer(lowered)}
    if len(found) == 1:
        return found.pop() == "yes"
    shown = text.strip()[:80]
    if not found:
        raise JudgeParseError(f"answer is not yes/no: {shown!r}")
    raise JudgeParseError(f"answer says both yes and no: {shown!r}")


def parse_count(text: str) -> int:
    """Parse a count ("3", "There are 3.", "three"). Raises `JudgeParseError` when there is none."""
    lowered = text.strip().lower()
    digits = re.search(r"\d+", lowered)
    if digits:
        return int(digits.group())
    for word in re.findall(r"[a-z]+", lowered):
        if word in _NUMBER_WORDS:
            return _NUMBER_WORDS[word]
    raise JudgeParseError(f"answer holds no count: {text.strip()[:80]!r}")

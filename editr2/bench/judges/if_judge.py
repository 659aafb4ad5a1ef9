"""IF (instruction following): was turn t's instruction carried out, comparing the input image with the output?

Per task type, symbolic checks with an open-vocabulary detector plus yes/no questions to a VLM, in the spirit of the
EdiVal-IF checks the paper's reward server runs. Each vote is 0 or 1; the score is the mean of `num_votes` votes.
Detections are computed once per request (the detector is deterministic); the VLM is asked again for every vote.

Without a detector the judge asks the VLM instead (presence, count, relative position), so an HTTP-only set-up works.
A formatted instruction that matches no known pattern is judged by a generic before/after question.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from .backends import VLM, Detection, Detector, count_distinct, iou
from .protocol import (
    BackendError,
    JudgeBase,
    Judgement,
    JudgeError,
    RetryPolicy,
    TurnRequest,
    call_with_retries,
    check_vote_counts,
    describe_error,
    judge_with_retries,
    parse_count,
    parse_yes_no,
    run_votes,
)

# Patterns of the release's formatted_instruction, per task type (first match wins).
PATTERNS: dict[str, tuple[re.Pattern, ...]] = {
    "subject_add": (
        re.compile(r"Add \[(?P<obj>[^\]]+)\] on the \[(?P<pos>[^\]]+)\] of \[(?P<ref>[^\]]+)\]"),
        re.compile(r"Add \[(?P<obj>[^\]]+)\]"),
    ),
    "subject_remove": (re.compile(r"Remove \[(?P<obj>[^\]]+)\]"),),
    "subject_replace": (re.compile(r"Replace \[(?P<obj>[^\]]+)\] with \[(?P<new>[^\]]+)\]"),),
    "color_alter": (re.compile(r"Change the colou?r of \[(?P<obj>[^\]]+)\] to \[(?P<value>[^\]]+)\]"),),
    "material_alter": (re.compile(r"Change the material of \[(?P<obj>[^\]]+)\] to \[(?P<value>[^\]]+)\]"),),
    "text_change": (
        re.compile(r"Replace the text '\[(?P<old>[^\]]+)\]' on \[(?P<obj>[^\]]+)\] with '\[(?P<text>[^\]]+)\]'"),
        re.compile(r"Add text '\[(?P<text>[^\]]+)\]' on the image"),
    ),
    "position_change": (
        re.compile(r"Change the position of \[(?P<obj>[^\]]+)\] to \[(?P<pos>[^\]]+)\] of \[(?P<ref>[^\]]+)\]"),
    ),
    "count_change": (re.compile(r"Change the count of \[(?P<obj>[^\]]+)\] to \[(?P<count>\d+)\]"),),
    "background_change": (re.compile(r"Change the background to \[(?P<bg>[^\]]+)\]"),),
}
POSITIONS = ("left", "right", "above", "below")

# Questions (this project's wording). {placeholders} are filled from the parsed instruction.
BEFORE_AFTER = (
    "The first image is the original and the second image is the result of this edit: \"{instruction}\". "
    "{question} Answer with only yes or no."
)
Q_APPLIED = "Was the edit applied successfully?"
Q_ADDED = "Does the second image now contain a {obj} that is not in the first image?"
Q_REPLACED = "Has the {obj} been replaced by a {new}?"
Q_ATTRIBUTE = "Is the {obj} now {value}?"
Q_MATERIAL = "Is the {obj} now made of {value}?"
SINGLE_PRESENT = "Is there a {obj} in this image? Answer with only yes or no."
SINGLE_BACKGROUND = "Does the background of this image show {bg}? Answer with only yes or no."
SINGLE_POSITION = "In this image, is the {obj} {where} the {ref}? Answer with only yes or no."
SINGLE_COUNT = "How many {obj} are in this image? Answer with only a number (0 if there is none)."
SINGLE_TEXT = "What text is written in this image? Answer with only the text, or 'none'."
_WHERE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


@dataclass
class IFConfig:
    """IF judge settings.

    Attributes:
        num_votes: votes per turn (the paper uses 4).
        temperature: VLM sampling temperature per vote (0 = greedy: votes then differ only on non-deterministic
            servers).
        min_valid_votes: successful votes a score needs; fewer and the judgement is missing.
        position_margin: how far (fraction of the image) a centre must lie beyond the reference's centre.
        remove_iou: a box left where the removed object was (IoU above this) means it was not removed.
        presence_threshold: detector threshold for presence and counting checks (None = the detector's default).
    """

    num_votes: int = 4
    temperature: float = 0.0
    min_valid_votes: int = 1
    position_margin: float = 0.03
    remove_iou: float = 0.2
    presence_threshold: float | None = None

    def __post_init__(self):
        check_vote_counts(self.num_votes, self.min_valid_votes)


def parse_formatted_instruction(task_type: str, text: str) -> dict[str, str] | None:
    """The bracketed parts of a formatted instruction (``{"obj": "dog", "pos": "left", ...}``), or None.

    The instruction must start with the pattern, so text that merely quotes one (leaked reasoning) is not taken.
    """
    for pattern in PATTERNS.get(task_type, ()):
        match = pattern.match(text.strip())
        if match:
            return {key: value.strip() for key, value in match.groupdict().items() if value is not None}
    return None


class _Detections:
    """Per-request detection cache (the detector is deterministic; votes reuse its boxes)."""

    def __init__(self, detector: Detector, policy: RetryPolicy, threshold: float | None):
        self.detector, self.policy, self.threshold = detector, policy, threshold
        self._cache: dict[tuple[int, str], list[Detection]] = {}
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image, phrase: str) -> list[Detection]:
        key = (id(image), phrase)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            found = call_with_retries(lambda: self.detector.detect(image, phrase, threshold=self.threshold),
                                      self.policy)
        except JudgeError as err:  # already retried: do not retry again at the vote level
            raise BackendError(f"detector failed for {phrase!r}: {describe_error(err)}") from err
        with self._lock:
            self._cache[key] = found
        return found


class IFJudge(JudgeBase):
    """Instruction following, per task type.

    Args:
        vlm: the VLM back-end (required).
        detector: an open-vocabulary detector, or None to ask the VLM instead.
        config: `IFConfig`.
        retry: retry policy for each vote (unparsable answers) and each detector call.
    """

    name = "IF"

    def __init__(self, vlm: VLM, detector: Detector | None = None, config: IFConfig | None = None,
                 retry: RetryPolicy | None = None):
        self.vlm, self.detector = vlm, detector
        self.config = config or IFConfig()
        self.retry = retry or RetryPolicy()
        self.max_workers = max(1, int(getattr(vlm, "max_concurrency", 1)))

    def judge(self, request: TurnRequest) -> Judgement:
        return judge_with_retries(lambda: self._judge(request), RetryPolicy(1))

    def _judge(self, request: TurnRequest) -> Judgement:
        parts = parse_formatted_instruction(request.task_type, request.formatted_instruction)
        detect = _Detections(self.detector, self.retry, self.config.presence_threshold) if self.detector else None
        check = self._check_for(request, parts, detect)
        if isinstance(check, Judgement):
            return check
        return run_votes(lambda index: check(), self.config.num_votes, self.retry,
                         min_valid=self.config.min_valid_votes, max_workers=self.max_workers)

    # -----------------------------------------------------------------------------------------------------------------
    # One vote per task type: a function returning (0 or 1, reason). Preconditions that make a turn unjudgeable
    # return a skipped Judgement instead.
    # -----------------------------------------------------------------------------------------------------------------

    def _check_for(self, r: TurnRequest, p: dict | None, detect) -> Callable[[], tuple[float, str]] | Judgement:
        if p is None:
            return lambda: self._generic(r, "generic check (formatted instruction not recognised)")
        task = r.task_type
        if task == "subject_add":
            return lambda: self._add(r, p, detect)
        if task == "subject_remove":
            return self._remove(r, p, detect)
        if task == "subject_replace":
            return lambda: self._replace(r, p, detect)
        if task in ("color_alter", "material_alter"):
            question = Q_ATTRIBUTE if task == "color_alter" else Q_MATERIAL
            return lambda: self._before_after(r, question.format(**p), f"{p['obj']} -> {p['value']}")
        if task == "text_change":
            return lambda: self._text(r, p)
        if task == "position_change":
            return lambda: self._position(r, p, detect)
        if task == "count_change":
            return lambda: self._count(r, p, detect)
        if task == "background_change":
            return lambda: self._background(r, p, detect)
        return lambda: self._generic(r, f"generic check (task type {task!r})")

    def _ask(self, images: list[Image.Image], prompt: str) -> str:
        return self.vlm.ask(images, prompt, temperature=self.config.temperature)

    def _before_after(self, r: TurnRequest, question: str, what: str) -> tuple[float, str]:
        prompt = BEFORE_AFTER.format(instruction=r.formatted_instruction, question=question)
        yes = parse_yes_no(self._ask([r.input_image, r.output_image], prompt))
        return float(yes), f"VLM says {'yes' if yes else 'no'}: {what}"

    def _generic(self, r: TurnRequest, what: str) -> tuple[float, str]:
        prompt = BEFORE_AFTER.format(instruction=r.instruction, question=Q_APPLIED)
        yes = parse_yes_no(self._ask([r.input_image, r.output_image], prompt))
        return float(yes), f"{what}: VLM says {'yes' if yes else 'no'}"

    def _present(self, image: Image.Image, obj: str, detect) -> tuple[list[Detection], bool]:
        """(boxes, present): the detector's boxes, or the VLM's yes/no when there is no detector."""
        if detect is not None:
            found = detect(image, obj)
            return found, bool(found)
        return [], parse_yes_no(self._ask([image], SINGLE_PRESENT.format(obj=obj)))

    def _add(self, r: TurnRequest, p: dict, detect) -> tuple[float, str]:
        score, reason = self._before_after(r, Q_ADDED.format(obj=p["obj"]), f"{p['obj']} added")
        if not score:
            return 0.0, reason
        found, present = self._present(r.output_image, p["obj"], detect)
        if not present:
            return 0.0, f"{p['obj']} not found in the output"
        if "pos" not in p:
            return 1.0, f"{p['obj']} added"
        return self._relation(r.output_image, p["obj"], p["pos"], p["ref"], found, detect)

    def _relation(self, image, obj, pos, ref, obj_boxes, detect) -> tuple[float, str]:
        pos = pos.lower()
        if detect is None or pos not in POSITIONS:
            where = _WHERE.get(pos, pos)
            yes = parse_yes_no(self._ask([image], SINGLE_POSITION.format(obj=obj, where=where, ref=ref)))
            return float(yes), f"VLM says {'yes' if yes else 'no'}: {obj} {where} {ref}"
        ref_boxes = detect(image, ref)
        if not obj_boxes or not ref_boxes:
            return 0.0, f"cannot locate both {obj} and {ref} in the output"
        margin = self.config.position_margin
        for a in obj_boxes:
            for b in ref_boxes:
                dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
                ok = {"left": dx < -margin, "right": dx > margin, "above": dy < -margin, "below": dy > margin}[pos]
                if ok:
                    return 1.0, f"{obj} is {_WHERE[pos]} {ref}"
        return 0.0, f"{obj} is not {_WHERE[pos]} {ref}"

    def _remove(self, r: TurnRequest, p: dict, detect) -> Callable[[], tuple[float, str]] | Judgement:
        obj = p["obj"]
        if detect is None:
            def vote() -> tuple[float, str]:
                present = parse_yes_no(self._ask([r.output_image], SINGLE_PRESENT.format(obj=obj)))
                return float(not present), f"VLM says {obj} is {'still' if present else 'no longer'} there"
            return vote
        before = detect(r.input_image, obj)
        if not before:
            return Judgement.skipped(f"cannot judge removal: {obj} not found in the input image")
        after = detect(r.output_image, obj)
        stays = [d for d in after if iou(d.box, before[0].box) > self.config.remove_iou]
        result = (0.0, f"{obj} still there") if stays else (1.0, f"{obj} removed")
        return lambda: result

    def _replace(self, r: TurnRequest, p: dict, detect) -> tuple[float, str]:
        score, reason = self._before_after(r, Q_REPLACED.format(**p), f"{p['obj']} -> {p['new']}")
        if not score or detect is None:
            return score, reason
        old, new = detect(r.input_image, p["obj"]), detect(r.output_image, p["new"])
        if not new:
            return 0.0, f"{p['new']} not found in the output"
        if old and not any(iou(a.box, b.box) > 0 for a in old for b in new):
            return 0.0, f"{p['new']} is not where {p['obj']} was"
        return 1.0, f"{p['obj']} replaced by {p['new']}"

    def _text(self, r: TurnRequest, p: dict) -> tuple[float, str]:
        answer = self._ask([r.output_image], SINGLE_TEXT)
        if not answer.strip():
            raise JudgeError("empty answer to the text question")
        norm = lambda s: " ".join(s.lower().split())  # noqa: E731
        found = norm(p["text"]) in norm(answer)
        return float(found), f"text {p['text']!r} {'found' if found else 'not found'} (read: {answer.strip()[:60]!r})"

    def _position(self, r: TurnRequest, p: dict, detect) -> tuple[float, str]:
        if detect is not None:
            for name in (p["obj"], p["ref"]):
                before = count_distinct(detect(r.input_image, name))
                after = count_distinct(detect(r.output_image, name))
                if before != after:
                    return 0.0, f"count of {name} changed from {before} to {after}"
        found, present = self._present(r.output_image, p["obj"], detect)
        if not present:
            return 0.0, f"{p['obj']} not found in the output"
        return self._relation(r.output_image, p["obj"], p["pos"], p["ref"], found, detect)

    def _count(self, r: TurnRequest, p: dict, detect) -> tuple[float, str]:
        target = int(p["count"])
        if detect is not None:
            actual = count_distinct(detect(r.output_image, p["obj"]))
        else:
            actual = parse_count(self._ask([r.output_image], SINGLE_COUNT.format(obj=p["obj"])))
        return float(actual == target), f"{actual} {p['obj']} (target {target})"

    def _background(self, r: TurnRequest, p: dict, detect) -> tuple[float, str]:
        if detect is not None:
            for obj in r.unchanged_objects:
                found = detect(r.output_image, obj)
                if not found:
                    return 0.0, f"{obj} (to keep) not found after the background change"
                x0, y0, x1, y1 = found[0].box
                if x1 - x0 > 0.9 and y1 - y0 > 0.9:
                    return 0.0, f"{obj} (to keep) only matches the whole image"
        yes = parse_yes_no(self._ask([r.output_image], SINGLE_BACKGROUND.format(bg=p["bg"])))
        return float(yes), f"VLM says {'yes' if yes else 'no'}: background is {p['bg']}"

"""The IC-CoT contract: reconstructing the *operative session intent* before each editing turn.

Before turn t the editor's VLM reads the session so far (earlier instructions, persistent rules, the current image)
and writes a short reasoning trace followed by one self-contained instruction::

    <think>Turn 1 set the rule: only the edited object may be red. "it" is the blue square added in turn 2.</think>
    Make the blue square large; only the edited object may be red, nothing else changes colour.

This module builds that request (:func:`build_messages`), parses the answer (:func:`parse_answer`, which falls back to
the raw instruction and records why) and formats training targets (:func:`format_answer`). An intent may name an
earlier session state instead of an edit ("Restore the image from before turn 3.", "Undo the last edit."):
:func:`parse_restore` reads it into `Intent.restore`, and the pipeline then restores that state exactly. The
deterministic rule-based reconstructor that needs no model (a benchmark baseline) is
`editr2.bench.shapes.reconstruct`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

THINK_START, THINK_END = "<think>", "</think>"

# How the session history reaches the editing model: as one reconstructed intent ("intent", IC-CoT), as the earlier
# instructions prepended to this one ("history"), or not at all ("none": the upstream single-turn edit).
REASONING_MODES = ("intent", "history", "none")

SYSTEM_PROMPT = (
    "You are the planner of a multi-turn image editor. First reason briefly about the editing session inside "
    f"{THINK_START} {THINK_END} tags, then write the answer: one self-contained editing instruction, i.e. "
    f"{THINK_START} reasoning here {THINK_END} instruction here"
)

DEFAULT_TEMPLATE = (
    "Editing history:\n{history}\n"
    "Persistent rules:\n{rules}\n"
    'Current instruction: "{instruction}"\n'
    "Rewrite the current instruction so that it can be executed on the current image without the history: replace "
    "pronouns and references to earlier turns (it, them, the one you added first, undo that) with the concrete "
    "objects they mean, and fold every persistent rule into it. Think briefly, under 100 words."
)

# Fallback reasons recorded in Turn.fallback_reason when a reasoning answer is not used.
FALLBACK_EMPTY = "empty_output"
FALLBACK_NO_END_TAG = "no_think_end_tag"
FALLBACK_EMPTY_AFTER_THINK = "empty_after_think"
FALLBACK_TOO_LONG = "too_long"


@dataclass(frozen=True)
class Intent:
    """An operative intent.

    Args:
        text (`str`): the self-contained instruction that conditions the edit.
        reasoning (`str`): the reasoning trace (the text inside the think tags), `""` when there is none.
        fallback_reason (`str`, *optional*): why the model's answer was not used (then `text` is the raw
            instruction); `None` when the answer parsed cleanly.
        restore (`int`, *optional*): the earlier session state the intent names ([`parse_restore`]): 0 = the source
            image, k = the image after turn k. The pipeline then continues from that state exactly, without editing.
            `None` for an ordinary edit.
    """

    text: str
    reasoning: str = ""
    fallback_reason: str | None = None
    restore: int | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Persistent rules
# ---------------------------------------------------------------------------------------------------------------------

# A rule sentence is announced by one of these openers and, in MICE, ends where the turn's own edit starts.
_RULE_OPENERS = re.compile(
    r"(persistent rule|standing constraint|from now on|for all (?:following|subsequent|later) (?:edits|turns)"
    r"|for the rest of (?:the|this) session|global constraint|all subsequent edits)",
    re.IGNORECASE,
)
_RULE_EDIT_SPLIT = re.compile(r"\s*(?:with this rule (?:active|in place|in effect)|now)\s*[,:]\s*", re.IGNORECASE)
_RULE_ATTRIBUTE = re.compile(r"\b([a-z][a-z-]*)\s+(colou?r|material)\b", re.IGNORECASE)
_NOT_ATTRIBUTES = {"the", "a", "an", "any", "one", "same", "original", "their", "its", "that", "this"}


@dataclass(frozen=True)
class Rule:
    """A persistent session rule, as stated by the user and as understood.

    Args:
        text (`str`): the rule as stated.
        attribute (`str`, *optional*): the value the rule imposes (`"peach"`, `"leather"`), when one is found.
        kind (`str`, *optional*): `"color"` or `"material"`, when found.
    """

    text: str
    attribute: str | None = None
    kind: str | None = None

    def canonical(self) -> str:
        """A short, fixed phrasing of the rule that every later intent carries (what text-side scoring looks for)."""
        if self.attribute and self.kind:
            return f"apply {self.attribute} {self.kind} only to the edited object and leave everything else unchanged"
        return self.text.rstrip(". ")


def parse_rule(text: str) -> Rule:
    """Extract the imposed attribute and its kind (colour or material) from a rule sentence."""
    for match in _RULE_ATTRIBUTE.finditer(text):
        value, kind = match.group(1).lower(), match.group(2).lower()
        if value not in _NOT_ATTRIBUTES:
            return Rule(text=text.strip(), attribute=value, kind="color" if kind.startswith("colo") else "material")
    return Rule(text=text.strip())


def split_rule(instruction: str) -> tuple[Rule | None, str]:
    """Split an instruction that states a persistent rule into `(rule, the turn's own edit)`.

    Returns `(None, instruction)` when the instruction states no rule. MICE's cm sessions phrase turn 1 as
    ``"<rule sentence>. With this rule active, <edit>"``.
    """
    if not _RULE_OPENERS.search(instruction):
        return None, instruction
    parts = _RULE_EDIT_SPLIT.split(instruction, maxsplit=1)
    rule_text, edit = (parts[0], parts[1]) if len(parts) == 2 else (instruction, "")
    rule_text = re.sub(r"^.*?(?:edits|turns|on)\s*[:,]\s*", "", rule_text, count=1) or rule_text
    return parse_rule(rule_text.strip().rstrip(".")), edit.strip()


def find_rules(instructions: Sequence[str]) -> list[str]:
    """The persistent rules stated anywhere in `instructions`, in order (rule text only, without the edit)."""
    return [rule.text for rule, _ in map(split_rule, instructions) if rule is not None]


# ---------------------------------------------------------------------------------------------------------------------
# The reasoning request and its answer
# ---------------------------------------------------------------------------------------------------------------------


def build_messages(
    history: Sequence[str], instruction: str, rules: Sequence[str] = (), *, template: str | None = None
) -> list[dict]:
    """Build the reasoning request as chat messages (transformers' chat format, text only).

    Args:
        history (`Sequence[str]`): the raw instructions of the earlier turns, oldest first.
        instruction (`str`): this turn's raw instruction.
        rules (`Sequence[str]`, *optional*): persistent rules given explicitly, besides those stated in `history`.
        template (`str`, *optional*): the user-message template with `{history}`, `{rules}` and `{instruction}`
            fields; defaults to [`DEFAULT_TEMPLATE`].

    Returns:
        `list[dict]`: `[{"role": "system", ...}, {"role": "user", ...}]`. Callers that show images to the model add
        them to the user message.
    """
    if not instruction or not instruction.strip():
        raise ValueError("`instruction` is empty: pass the user's editing instruction for this turn.")
    all_rules = [*rules, *find_rules([*history, instruction])]
    history_text = "\n".join(f"Turn {k}: {h.strip()}" for k, h in enumerate(history, start=1)) or "(none)"
    rules_text = "\n".join(f"- {r}" for r in dict.fromkeys(all_rules)) or "(none)"
    user = (template or DEFAULT_TEMPLATE).format(history=history_text, rules=rules_text, instruction=instruction.strip())
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def format_answer(reasoning: str, intent: str) -> str:
    """The answer a reasoner should write: `"<think>reasoning</think>intent"` (the SFT target)."""
    return f"{THINK_START}{reasoning.strip()}{THINK_END}{intent.strip()}"


def parse_answer(text: str, instruction: str, *, max_chars: int = 600, num_turns: int | None = None) -> Intent:
    """Parse a reasoner's answer into an [`Intent`]; fall back to `instruction` and record why.

    Args:
        text (`str`): the generated text (special tokens already removed).
        instruction (`str`): the raw instruction, used when the answer cannot be.
        max_chars (`int`, defaults to 600): an intent longer than this is refused as `"too_long"`.
        num_turns (`int`, *optional*): the turns in the session before this one. When given, an intent naming an
            earlier state ([`parse_restore`]) sets `Intent.restore`; when `None`, no restore is read.
    """
    raw = (text or "").strip()
    if not raw:
        return Intent(instruction, "", FALLBACK_EMPTY)
    if THINK_END not in raw:
        return Intent(instruction, raw.replace(THINK_START, "").strip(), FALLBACK_NO_END_TAG)
    reasoning, answer = raw.split(THINK_END, 1)
    reasoning = reasoning.replace(THINK_START, "").strip()
    answer = answer.replace(THINK_START, "").replace(THINK_END, "").strip().strip('"').strip()
    if not answer:
        return Intent(instruction, reasoning, FALLBACK_EMPTY_AFTER_THINK)
    if len(answer) > max_chars:
        return Intent(instruction, reasoning, FALLBACK_TOO_LONG)
    restore = None if num_turns is None else parse_restore(answer, num_turns)
    return Intent(answer, reasoning, None, restore)


# ---------------------------------------------------------------------------------------------------------------------
# References to earlier session states (exact undo)
# ---------------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
                 "ninth": 9, "tenth": 10, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                 "eight": 8, "nine": 9, "ten": 10}
_N = r"\[?(\d+|" + "|".join(_NUMBER_WORDS) + r")\]?"
_STATE = r"(?:restore|return to|go back to|revert to|back to)\s+(?:the\s+)?(?:image|state|scene|picture)"
_RESTORE_BEFORE = re.compile(rf"^\s*{_STATE}\s+(?:from\s+|as it was\s+)?before\s+turn\s+{_N}\b", re.I)
_RESTORE_AFTER = re.compile(rf"^\s*{_STATE}\s+(?:from\s+|as it was\s+)?after\s+turn\s+{_N}\b", re.I)
_RESTORE_SOURCE = re.compile(rf"^\s*{_STATE}\s+(?:from\s+)?before\s+(?:any|every)\s+edits?\b"
                             r"|^\s*(?:restore|return to|go back to|revert to)\s+the\s+(?:original|source)\s+image\b",
                             re.I)
_UNDO_LAST = re.compile(r"^\s*undo\s+the\s+(?:last|previous)\s+(?:edit|turn|change)\b", re.I)


def _turn_number(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBER_WORDS[word.lower()]


def parse_restore(text: str, num_turns: int) -> int | None:
    """The earlier session state an intent names, or `None` when it names none (an ordinary edit).

    States are numbered as `Session.images` is: 0 = the source image, k = the image after turn k. Accepted forms
    (case-insensitive, at the start of the intent; whatever follows, e.g. a persistent rule, is ignored):

    - `Restore the image from before turn N` (MICE-Shapes' gold form; `[N]` too): state N - 1;
    - `Go back to the image after turn N` / `Restore the image after turn N` / `Return to the state after turn N`:
      state N ("image", "state", "scene" or "picture"; "restore", "return to", "go back to", "revert to", "back to");
    - `Restore the original image` / `Go back to the source image` / `Restore the image from before any edit`: 0;
    - `Undo the last edit` / `Undo the previous edit (...), restoring the image from before it` (the gold plain-undo
      form): the state before the last turn, `num_turns - 1`.

    Turns are counted from 1, in numbers or words up to "tenth". A state that does not exist yet (after turn
    `num_turns` is the current one and may be named; later ones may not), or an undo at the first turn, names none:
    `None` is returned and the intent is an ordinary edit instruction.

    Args:
        text (`str`): the operative intent.
        num_turns (`int`): the turns in the session before the one this intent is for.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str (the operative intent), got {type(text).__name__}")
    if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 0:
        raise ValueError(f"`num_turns` must be the number of turns so far (an int >= 0), got {num_turns!r}")
    if match := _RESTORE_BEFORE.match(text):
        index = _turn_number(match.group(1)) - 1
    elif match := _RESTORE_AFTER.match(text):
        index = _turn_number(match.group(1))
    elif _RESTORE_SOURCE.match(text):
        index = 0
    elif _UNDO_LAST.match(text):
        index = num_turns - 1
    else:
        return None
    return index if 0 <= index <= num_turns else None

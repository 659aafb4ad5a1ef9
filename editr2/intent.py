"""The IC-CoT contract: reconstructing the *operative session intent* before each editing turn.

Before turn t the editor's VLM reads the session so far (earlier instructions, persistent rules, the current image)
and writes a short reasoning trace followed by one self-contained instruction::

    <think>Turn 1 set the rule: only the edited object may be red. "it" is the blue square added in turn 2.</think>
    Make the blue square large; only the edited object may be red, nothing else changes colour.

This module builds that request (:func:`build_messages`), parses the answer (:func:`parse_answer`, which falls back to
the raw instruction and records why), formats training targets (:func:`format_answer`) and provides a deterministic
:class:`RuleBasedReconstructor` that needs no model: the baseline, and the gold-target generator for reasoner SFT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

THINK_START, THINK_END = "<think>", "</think>"

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
    """

    text: str
    reasoning: str = ""
    fallback_reason: str | None = None


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


def parse_answer(text: str, instruction: str, *, max_chars: int = 600) -> Intent:
    """Parse a reasoner's answer into an [`Intent`]; fall back to `instruction` and record why.

    Args:
        text (`str`): the generated text (special tokens already removed).
        instruction (`str`): the raw instruction, used when the answer cannot be.
        max_chars (`int`, defaults to 600): an intent longer than this is refused as `"too_long"`.
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
    return Intent(answer, reasoning, None)


# ---------------------------------------------------------------------------------------------------------------------
# The rule-based reconstructor (no model)
# ---------------------------------------------------------------------------------------------------------------------

# What each MICE instruction form makes the "focus" object of the turn: the object later pronouns refer to.
_FOCUS_PATTERNS = [
    re.compile(r"^replace (?:the )?(?P<old>.+?) with (?:a |an |the )?(?P<obj>.+?)$", re.IGNORECASE),
    re.compile(r"^add (?:a |an |the )?(?P<obj>.+?) on the \w+ of .+$", re.IGNORECASE),
    re.compile(r"^change the (?:count|number|colou?r|material|size) of (?:the )?(?P<obj>.+?) to .+$", re.IGNORECASE),
    re.compile(r"^change the position of (?:the )?(?P<obj>.+?) to .+$", re.IGNORECASE),
    re.compile(r"^(?:move|enlarge|shrink|recolou?r) (?:the )?(?P<obj>.+?)(?: to .+)?$", re.IGNORECASE),
    re.compile(r"^add text '(?P<obj>[^']+)'", re.IGNORECASE),
    re.compile(r"^remove (?:the )?(?P<obj>.+?)$", re.IGNORECASE),
    re.compile(r"^add (?:a |an |the )?(?P<obj>.+?)$", re.IGNORECASE),
]
_QUOTED = re.compile(r"((?<!\w)'[^']*'(?!\w)|\"[^\"]*\")")
_PRONOUNS = re.compile(r"\b(it|its|them|they|the one|that one|that object|this object)\b", re.IGNORECASE)


def focus_object(instruction: str) -> str | None:
    """The object an instruction acts on or creates (what a later "it" refers to), or `None`."""
    text = instruction.strip().rstrip(".")
    if text.lower().startswith("change the background"):
        return None
    for pattern in _FOCUS_PATTERNS:
        match = pattern.match(text)
        if match and not _PRONOUNS.fullmatch(match.group("obj")):
            return match.group("obj").strip()
    return None


class RuleBasedReconstructor:
    """Deterministic intent reconstruction from the text history alone (no model, no image).

    - Persistent rules stated in any turn (or passed explicitly) are folded into every intent from that turn on, in
      the canonical phrasing of [`Rule.canonical`].
    - Pronouns ("it", "them", "the one") are replaced by the most recent focus object of the history.
    - MICE-Shapes sessions (recognised by their grammar) are delegated to the shapes world's own text-only resolver,
      which also resolves "the one you added first" and "undo that".

    Args:
        domain (`str`, defaults to `"auto"`): `"mice"` for the generic resolver, `"shapes"` for the shapes resolver,
            `"auto"` to use the shapes resolver when it accepts the session.
    """

    def __init__(self, domain: str = "auto"):
        if domain not in ("auto", "mice", "shapes"):
            raise ValueError(f"domain must be 'auto', 'mice' or 'shapes', got {domain!r}.")
        self.domain = domain

    def __call__(self, history: Sequence[str], instruction: str, rules: Sequence[str] = ()) -> Intent:
        if not instruction or not instruction.strip():
            raise ValueError("`instruction` is empty: pass the user's editing instruction for this turn.")
        if self.domain != "mice" and not rules:
            shapes = self._shapes(history, instruction)
            if shapes is not None:
                return shapes
        return self._generic(history, instruction, rules)

    def _shapes(self, history: Sequence[str], instruction: str) -> Intent | None:
        from editr2.bench.shapes import reconstruct as shapes_reconstruct  # the shapes world is part of the core

        try:
            reasoning, text = shapes_reconstruct.reconstruct(list(history), instruction)
        except ValueError:
            if self.domain == "shapes":
                raise
            return None
        return Intent(text, reasoning)

    def _generic(self, history: Sequence[str], instruction: str, rules: Sequence[str]) -> Intent:
        notes: list[str] = []
        active = [parse_rule(r) for r in rules]
        focus = None
        for k, past in enumerate(history, start=1):
            rule, edit = split_rule(past)
            if rule is not None:
                active.append(rule)
                notes.append(f"Turn {k} set a persistent rule: {rule.canonical()}.")
            focus = focus_object(self._resolve(edit, focus)) or focus
        rule, edit = split_rule(instruction)
        if rule is not None:
            active.append(rule)
            notes.append(f"This turn sets a persistent rule: {rule.canonical()}.")
        resolved = self._resolve(edit or instruction, focus)
        if resolved != (edit or instruction):
            notes.append(f"The pronoun refers to {focus}, the object of the last edit.")
        text = resolved.strip().rstrip(".")
        for r in dict.fromkeys(active):
            text += f"; {r.canonical()}"
        if not notes:
            notes.append("The instruction is already self-contained.")
        return Intent(text[:1].upper() + text[1:] + ".", " ".join(notes))

    @staticmethod
    def _resolve(instruction: str, focus: str | None) -> str:
        if focus is None:
            return instruction
        noun = focus if re.match(r"(?:(?:the|a|an)\s|['\"])", focus, re.IGNORECASE) else f"the {focus}"
        swap = lambda m: noun if m.group(1).lower() != "its" else f"{noun}'s"  # noqa: E731
        # Quoted text ("Add text 'Call it a day'") is content, not a reference: leave it as written.
        parts = _QUOTED.split(instruction)
        return "".join(part if part.startswith(("'", '"')) else _PRONOUNS.sub(swap, part) for part in parts)

"""Text-only intent reconstruction for MICE-Shapes sessions (no scenes, no images).

`reconstruct(history, instruction)` replays the literal parses of the history to track what the text has said
about each object (its current "size colour shape" description, whether it still exists, which turn added it), then
resolves the current instruction: "it" is the object the previous turn produced or changed, "the one you added
first" the first object any turn added, "the shape from the first edit" the object turn 1 produced or changed,
"undo that" reverts the previous turn (and the tracked state with it). A persistent rule stated in the history is
merged: its colour fills in the new object's colour and the rule is restated with `grammar.canonical_rule`.

The output is the gold intent format of `grammar.canonical_intent`, so on generated sessions it reproduces
`ShapesSession.gold_intent`.

`RuleBasedReconstructor` is the benchmark's no-model baseline for any MICE-format session (and the gold-target
generator for reasoner SFT): persistent rules folded into every intent, pronouns replaced by the last focus object,
and shapes sessions delegated to `reconstruct`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from editr2.intent import Intent, parse_rule, split_rule

from .grammar import (LITERAL_DEFAULT_COLOR, REFERENCE_PHRASES, TARGET_OPS, Command, Literal, canonical_intent,
                      canonical_rule, parse_instruction, result_desc, split_color_rule)
from .world import Desc

_EVENT = {"subject_add": "added", "subject_replace": "created", "color_alter": "recolored", "size_change": "resized",
          "position_change": "moved", "mention": "named"}


@dataclass
class _State:
    alive: dict[int, Desc] = field(default_factory=dict)
    events: dict[int, tuple[int, str]] = field(default_factory=dict)  # id -> (turn, what happened)
    tainted: frozenset = frozenset()
    first_added: int | None = None

    def copy(self) -> "_State":
        return _State(dict(self.alive), dict(self.events), self.tainted, self.first_added)


class _Tracker:
    """What the text so far says about the objects, with per-turn snapshots for "undo"."""

    def __init__(self):
        self.state = _State()
        self.snapshots: list[_State] = []  # state before each turn
        self.focus: list[int | None] = []
        self.commands: list[Command | None] = []  # None: a turn the text could not resolve
        self.next_id = 0
        self.rule: str | None = None
        self.rule_turn: int | None = None

    def _new(self, desc: Desc, turn: int, event: str) -> int:
        i, self.next_id = self.next_id, self.next_id + 1
        self.state.alive[i] = desc
        self.state.events[i] = (turn, event)
        return i

    def lookup(self, desc: Desc, turn: int) -> int:
        """The tracked object with this description, or a newly named one (present since the source image)."""
        for i, d in self.state.alive.items():
            if d == desc:
                return i
        i = self._new(desc, turn, "mention")
        for snap in self.snapshots:  # it existed before it was first named
            snap.alive[i] = desc
            snap.events[i] = (turn, "mention")
        return i

    def reference(self, key: str) -> int | None:
        if key == "it":
            i = self.focus[-1] if self.focus else None
        elif key == "first_added":
            i = self.state.first_added
        else:  # first_edit
            i = self.focus[0] if self.focus else None
        ok = i is not None and i in self.state.alive and i not in self.state.tainted
        return i if ok else None

    def resolve(self, lit: Literal, turn: int) -> tuple[Command | None, int | None, str]:
        """Resolve a literal edit: (command or None, target id, a note for the reasoning trace)."""
        if lit.op == "undo":
            if not self.commands or self.commands[-1] is None:
                return None, None, "'undo' has no known previous edit to revert."
            prev = self.commands[-1]
            what = canonical_intent(prev).rstrip(".")
            note = f"'Undo' reverts turn {turn - 1}: {what[0].lower() + what[1:]}."
            return Command("undo", previous=prev), None, note
        note, target_id, target = "", None, None
        if isinstance(lit.target, str):
            target_id = self.reference(lit.target)
            phrase = REFERENCE_PHRASES[lit.target][0]
            if target_id is None:
                return None, None, f"'{phrase}' does not point at an object that still exists."
            target = self.state.alive[target_id]
            k, event = self.state.events[target_id]
            note = f"'{phrase}' refers to the {target.phrase}, which turn {k} {_EVENT[event]}."
        elif lit.target is not None:
            target = lit.target
            if lit.op in TARGET_OPS:
                target_id = self.lookup(target, turn)
        rule = self.rule
        if lit.op == "subject_add":
            color = lit.color or rule
            if color is None:
                color, note = LITERAL_DEFAULT_COLOR, "No colour was given; using the default."
            cmd = Command(lit.op, shape=lit.shape, color=color, size=lit.size or "small", cell=lit.cell,
                          color_from_rule=lit.color is None and rule is not None)
        elif lit.op == "subject_replace":
            color = lit.color or rule or target.color
            cmd = Command(lit.op, target, shape=lit.shape, color=color,
                          color_from_rule=lit.color is None and rule is not None)
        else:
            cmd = Command(lit.op, target, color=lit.color, size=lit.size, cell=lit.cell, count=lit.count,
                          tone=lit.tone)
        if rule is not None and cmd.color_from_rule:
            note = (note + " " if note else "") + f"The rule makes the new {cmd.shape} {rule}."
        return cmd, target_id, note

    def apply(self, cmd: Command, target_id: int | None, turn: int) -> None:
        self.snapshots.append(self.state.copy())
        self.commands.append(cmd)
        if cmd.op == "undo":
            self.state = self.snapshots[-2].copy()
            self.focus.append(None)
            return
        state, focus = self.state, None
        if cmd.op == "subject_add":
            focus = self._new(result_desc(cmd), turn, cmd.op)
            if state.first_added is None:
                state.first_added = focus
        elif cmd.op == "count_change":
            group = {i for i, d in state.alive.items() if d == cmd.target}
            state.tainted = state.tainted | group
        elif cmd.op == "subject_remove":
            state.alive.pop(target_id, None)
        elif cmd.op == "subject_replace":
            state.alive.pop(target_id, None)
            focus = self._new(result_desc(cmd), turn, cmd.op)
        elif cmd.op in ("color_alter", "size_change", "position_change"):
            state.alive[target_id] = result_desc(cmd)
            state.events[target_id] = (turn, cmd.op)
            focus = target_id
        self.focus.append(focus)


def _step(tracker: _Tracker, text: str, turn: int) -> tuple[Command | None, str, list[str]]:
    notes = []
    lit = parse_instruction(text)  # ValueError: not this grammar
    if lit.rule_color is not None:
        tracker.rule, tracker.rule_turn = lit.rule_color, turn
        notes.append(f"Turn {turn} sets the rule: {lit.rule_color} color only on the object being added or changed.")
    cmd, target_id, note = tracker.resolve(lit, turn)
    if note:
        notes.append(note)
    if cmd is not None:
        tracker.apply(cmd, target_id, turn)
    else:  # keep turn numbering aligned; an unresolved turn changes nothing we know of
        tracker.snapshots.append(tracker.state.copy())
        tracker.commands.append(None)
        tracker.focus.append(None)
    return cmd, split_color_rule(text)[1], notes


def reconstruct(history: list[str], instruction: str) -> tuple[str, str]:
    """Reconstruct the operative intent of `instruction` from the text history alone.

    Args:
        history (`list[str]`): the session's earlier instructions, oldest first.
        instruction (`str`): the current instruction.

    Returns:
        `(reasoning_trace, intent)`: a short explanation, and the self-contained intent in the gold format.

    Raises:
        ValueError: if an instruction is not in the MICE-Shapes grammar (callers then use a generic resolver).
    """
    tracker = _Tracker()
    for turn, text in enumerate(history, start=1):
        _step(tracker, text, turn)
    turn = len(history) + 1
    cmd, edit, notes = _step(tracker, instruction, turn)
    if tracker.rule_turn is not None and tracker.rule_turn < turn:
        notes.insert(0, f"Turn {tracker.rule_turn} set the rule: {tracker.rule} color only on the object being "
                        "added or changed; it still holds.")
    if cmd is None:
        intent = edit.rstrip(". ") + "."
        if tracker.rule is not None:
            intent += " " + canonical_rule(tracker.rule)
        notes.append("Could not resolve the reference; keeping the instruction as written.")
        return " ".join(notes), intent
    if not notes:
        notes.append("The instruction names everything explicitly.")
    return " ".join(notes), canonical_intent(cmd, tracker.rule)


# ---------------------------------------------------------------------------------------------------------------------
# The rule-based reconstructor (no model): MICE sessions in general, shapes sessions through `reconstruct`
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
        try:
            reasoning, text = reconstruct(list(history), instruction)
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

"""Text-side intent scoring for MICE-format sessions (no images needed).

Two checks per turn t, on the operative intent a reconstructor (or a model) wrote for that turn:

- **resolved**: every bracketed object of `formatted_instruction[t]` appears in the intent (case-insensitive), i.e.
  pronouns and references were resolved to the concrete objects the turn acts on.
- **rule_kept** (only for turns at or after the turn that stated a persistent rule): the rule's attribute ("peach")
  and its scope (the intent says the attribute applies *only* to the edited/added/changed object) both appear.

A session's scores are the per-turn booleans; :func:`summarise` averages them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from editr2.bench.shapes.reconstruct import RuleBasedReconstructor
from editr2.intent import Intent, split_rule

_BRACKETED = re.compile(r"\[([^\]]+)\]")
_SCOPE = re.compile(r"\bonly\b.{0,40}\b(edited|changed|modified|added|edit)\b", re.IGNORECASE)

Reconstructor = Callable[[Sequence[str], str], Intent]


@dataclass
class IntentScore:
    """Text-side scores of one turn's intent (`rule_kept` is `None` where no rule is active)."""

    turn: int
    resolved: bool
    rule_kept: bool | None
    intent: str = ""


@dataclass
class IntentReport:
    """Per-turn scores of every session plus their means (per turn index and overall)."""

    sessions: list[list[IntentScore]] = field(default_factory=list)

    def summarise(self) -> dict:
        rows: dict[int, dict[str, list[float]]] = {}
        for session in self.sessions:
            for s in session:
                row = rows.setdefault(s.turn, {"resolved": [], "rule_kept": []})
                row["resolved"].append(float(s.resolved))
                if s.rule_kept is not None:
                    row["rule_kept"].append(float(s.rule_kept))
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        per_turn = [{"turn": t, **{k: mean(v) for k, v in rows[t].items()}} for t in sorted(rows)]
        flat = {k: [x for t in rows.values() for x in t[k]] for k in ("resolved", "rule_kept")}
        return {"per_turn": per_turn, "mean": {k: mean(v) for k, v in flat.items()}, "sessions": len(self.sessions)}


def score_turn(intent: str, formatted_instruction: str, rule_attribute: str | None, turn: int) -> IntentScore:
    """Score one intent against the turn's bracketed objects and the active rule's attribute (if any)."""
    lowered = intent.lower()
    objects = [o.strip().lower() for o in _BRACKETED.findall(formatted_instruction)]
    resolved = all(o in lowered for o in objects)
    rule_kept = None
    if rule_attribute is not None:
        rule_kept = rule_attribute.lower() in lowered and bool(_SCOPE.search(intent))
    return IntentScore(turn=turn, resolved=resolved, rule_kept=rule_kept, intent=intent)


def score_intents(
    instructions: Sequence[str], formatted_instructions: Sequence[str], reconstructor: Reconstructor
) -> list[IntentScore]:
    """Reconstruct each turn's intent from the raw history and score it.

    Args:
        instructions (`Sequence[str]`): the raw instructions, one per turn.
        formatted_instructions (`Sequence[str]`): MICE's self-contained instructions with [bracketed] objects.
        reconstructor (`Callable`): `(history, instruction) -> Intent`, e.g. a [`RuleBasedReconstructor`].
    """
    if len(instructions) != len(formatted_instructions):
        raise ValueError(
            f"instructions has {len(instructions)} turns but formatted_instruction has {len(formatted_instructions)}."
        )
    scores, attribute = [], None
    for t, (raw, formatted) in enumerate(zip(instructions, formatted_instructions)):
        rule, _ = split_rule(raw)
        if rule is not None and rule.attribute is not None:
            attribute = rule.attribute
        intent = reconstructor(list(instructions[:t]), raw)
        scores.append(score_turn(intent.text, formatted, attribute, turn=t + 1))
    return scores


def score_sessions(sessions, reconstructor: Reconstructor | None = None) -> IntentReport:
    """Score `(instructions, formatted_instructions)` pairs with `reconstructor` (the rule-based one by default)."""
    reconstructor = reconstructor or RuleBasedReconstructor("mice")
    report = IntentReport()
    for instructions, formatted in sessions:
        report.sessions.append(score_intents(instructions, formatted, reconstructor))
    return report

"""The MICE-Shapes instruction grammar: edit commands, their phrasings, a literal parser and the canonical intent.

Three levels of meaning, from words to pixels:

- `Literal`: what an instruction's words say, references unresolved (`target="it"`, colour left to a rule).
  `realize(literal, rng)` writes it with a seeded choice among several phrasings (modelled on the real MICE
  instructions: "Change the count of X to 3", "Replace X with Y", "Change the background to ..., remain the ...
  unchanged", plus casual ones); `parse_instruction(text)` reads it back (exactly, for every phrasing here).
- `Command`: the resolved, self-contained edit (explicit target description, every new attribute filled in).
  `apply_command(scene, command)` is pure: Scene -> new Scene.
- `canonical_intent(command, rule_color)`: the one fixed phrasing of a resolved command (the gold operative intent),
  and `formatted_instruction(command)` its MICE `formatted_instruction` with the objects in [brackets].

Persistent rules (cm sessions) are colour rules: "<colour> color goes only on the object being added or changed,
nothing else changes colour". Semantics: objects that a turn *creates* (subject_add, the new object of
subject_replace) take the rule colour and their instructions do not name a colour; count_change copies keep their
group's colour, so under a rule it is generated only to decrease a group or for a group already in the rule colour;
color_alter is not generated under a rule (it would contradict it); moved, resized and untouched objects keep
their colour. (Everyday phrasing, `language`, also changes and cancels rules and lets a named colour override one.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

from .world import (CELL_BY_NAME, CELL_NAMES, COLOR_NAMES, MAX_OBJECTS, PLURALS, SHAPES, SIZES, TONE_NAMES, Desc,
                    Obj, Scene)

TASK_TYPES: tuple[str, ...] = ("subject_add", "subject_remove", "subject_replace", "color_alter", "size_change",
                               "position_change", "count_change", "background_change", "undo")
TARGET_OPS = ("subject_remove", "subject_replace", "color_alter", "size_change", "position_change")
REFERENCES = ("it", "first_added", "first_edit")  # what a target may say instead of a description
LITERAL_DEFAULT_COLOR = "red"   # colour of an added object whose instruction names none (literal reading)
LITERAL_DEFAULT_SIZE = "small"

# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    """What an instruction's words say.

    Args:
        op (`str`): one of `TASK_TYPES`.
        target: a `Desc` ("the small red circle"), a reference key of `REFERENCES`, or `None`. For count_change the
            described group.
        shape, color, size (`str`, *optional*): new attributes the words state (add: the new object; replace: the
            new shape and maybe colour; color_alter: colour; size_change: the new size).
        cell (`tuple[int, int]`, *optional*): destination cell (add, position_change).
        count (`int`, *optional*): count_change's number.
        tone (`str`, *optional*): background_change's tone.
        rule_color (`str`, *optional*): the colour of a persistent rule this instruction states.
    """

    op: str
    target: Desc | str | None = None
    shape: str | None = None
    color: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None
    count: int | None = None
    tone: str | None = None
    rule_color: str | None = None


@dataclass(frozen=True)
class Command:
    """A resolved, self-contained edit.

    Args:
        op (`str`): one of `TASK_TYPES`.
        target (`Desc`, *optional*): the object acted on (the group, for count_change).
        shape, color, size, cell, count, tone: the new values (every one the op needs is filled in).
        previous (`Command`, *optional*): for "undo", the command being undone.
        color_from_rule (`bool`): the new object's colour comes from the persistent rule, not from the words.
        requested_cell (`tuple[int, int]`, *optional*): subject_add only: the occupied cell the words asked for; the
            object goes to `cell`, the nearest free cell (`nearest_free_cell`).
        swap_with (`Desc`, *optional*): position_change only: the object occupying the destination `cell`, which
            moves to the moved object's old cell (the two swap places).
        restore (`int`, *optional*): "undo" only: the index of the earlier scene restored (0 = the source image, k =
            the scene after turn k) instead of the scene before the last edit; `previous` is then unused.
        overrides_rule (`bool`): the colour named in the words differs from the active persistent rule's colour and
            wins for this edit (the rule stays active for later turns).
    """

    op: str
    target: Desc | None = None
    shape: str | None = None
    color: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None
    count: int | None = None
    tone: str | None = None
    previous: "Command | None" = None
    color_from_rule: bool = False
    requested_cell: tuple[int, int] | None = None
    swap_with: Desc | None = None
    restore: int | None = None
    overrides_rule: bool = False

    def to_json(self) -> dict:
        out = {"op": self.op}
        for key in ("shape", "color", "size", "count", "tone"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.target is not None:
            out["target"] = list(self.target)
        if self.cell is not None:
            out["cell"] = list(self.cell)
        if self.previous is not None:
            out["previous"] = self.previous.to_json()
        if self.color_from_rule:
            out["color_from_rule"] = True
        if self.requested_cell is not None:
            out["requested_cell"] = list(self.requested_cell)
        if self.swap_with is not None:
            out["swap_with"] = list(self.swap_with)
        if self.restore is not None:
            out["restore"] = self.restore
        if self.overrides_rule:
            out["overrides_rule"] = True
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Command":
        return cls(
            op=data["op"],
            target=Desc(*data["target"]) if "target" in data else None,
            shape=data.get("shape"), color=data.get("color"), size=data.get("size"),
            cell=tuple(data["cell"]) if "cell" in data else None,
            count=data.get("count"), tone=data.get("tone"),
            previous=cls.from_json(data["previous"]) if "previous" in data else None,
            color_from_rule=bool(data.get("color_from_rule", False)),
            requested_cell=tuple(data["requested_cell"]) if "requested_cell" in data else None,
            swap_with=Desc(*data["swap_with"]) if "swap_with" in data else None,
            restore=data.get("restore"),
            overrides_rule=bool(data.get("overrides_rule", False)),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Applying commands to scenes
# ---------------------------------------------------------------------------------------------------------------------


def check_command(scene: Scene, cmd: Command) -> str | None:
    """Why `cmd` cannot apply to `scene` (a sentence), or `None` when it can. Undo is checked by the caller."""
    n = len(scene.objects)
    if cmd.op == "subject_add":
        if n >= MAX_OBJECTS:
            return f"the scene already has {MAX_OBJECTS} objects"
        if scene.at(cmd.cell) is not None:
            return f"the {CELL_NAMES[cmd.cell]} cell is occupied"
        if cmd.requested_cell is not None and cmd.cell != nearest_free_cell(scene, cmd.requested_cell):
            return f"the {CELL_NAMES[cmd.cell]} is not the nearest free cell to the {CELL_NAMES[cmd.requested_cell]}"
        return None
    if cmd.op == "background_change":
        return None if cmd.tone != scene.tone else f"the background already has a {cmd.tone} tone"
    if cmd.op == "count_change":
        k = scene.count(cmd.target)
        if k == 0:
            return f"there is no {cmd.target.phrase} to count"
        if not 1 <= cmd.count <= MAX_OBJECTS or cmd.count == k:
            return f"count {cmd.count} is not a change from {k}"
        extra = cmd.count - k
        if extra > 0 and (extra > len(scene.free_cells) or n + extra > MAX_OBJECTS):
            return "no room for the copies"
        return None
    if cmd.op in TARGET_OPS:
        matches = scene.find(cmd.target)
        if len(matches) != 1:
            return f"{len(matches)} objects match '{cmd.target.phrase}' (need exactly one)"
        if cmd.op == "subject_remove" and n <= 1:
            return "cannot remove the last object"
        if cmd.op == "position_change":
            occupant = scene.at(cmd.cell)
            if occupant is matches[0]:
                return f"the {cmd.target.phrase} is already at the {CELL_NAMES[cmd.cell]}"
            if (occupant.desc if occupant is not None else None) != cmd.swap_with:
                return (f"the {CELL_NAMES[cmd.cell]} cell is occupied" if cmd.swap_with is None else
                        f"the {CELL_NAMES[cmd.cell]} does not hold the {cmd.swap_with.phrase} to swap with")
        return None
    if cmd.op == "undo":
        return "undo needs the previous scene"
    raise ValueError(f"Unknown op {cmd.op!r}: pass one of {TASK_TYPES}.")


def nearest_free_cell(scene: Scene, cell: tuple[int, int]) -> tuple[int, int] | None:
    """The free cell nearest to `cell` (Manhattan distance; ties go to the first in reading order), or `None`.

    The occupied-cell policy for adds: an object added into an occupied cell goes here instead.
    """
    free = scene.free_cells
    if not free:
        return None
    return min(free, key=lambda c: (abs(c[0] - cell[0]) + abs(c[1] - cell[1]), c))


def apply_command(scene: Scene, cmd: Command, previous_scene: Scene | None = None,
                  history: Sequence[Scene] | None = None) -> Scene:
    """Apply a resolved command to a scene (pure: returns a new Scene).

    Args:
        scene (`Scene`): the current scene.
        cmd (`Command`): the edit.
        previous_scene (`Scene`, *optional*): the scene before the last edit; required for "undo", which returns it.
        history (`Sequence[Scene]`, *optional*): the session's scenes so far (0 = the source); required for an undo
            with `restore`, which returns `history[restore]`.
    """
    if cmd.op == "undo" and cmd.restore is not None:
        if history is None or not 0 <= cmd.restore < len(history):
            raise ValueError(f"'undo' restoring scene {cmd.restore} needs the session's scenes: pass `history` "
                             f"with at least {cmd.restore + 1} scenes.")
        return history[cmd.restore]
    if cmd.op == "undo":
        if previous_scene is None:
            raise ValueError("'undo' restores the scene before the last edit: pass it as `previous_scene`.")
        return previous_scene
    reason = check_command(scene, cmd)
    if reason is not None:
        raise ValueError(f"Cannot apply {cmd.op}: {reason}.")
    objects = list(scene.objects)
    if cmd.op == "subject_add":
        return scene.with_objects(objects + [Obj(cmd.shape, cmd.color, cmd.size, cmd.cell)])
    if cmd.op == "background_change":
        return scene.with_tone(cmd.tone)
    if cmd.op == "count_change":
        group = scene.find(cmd.target)
        if cmd.count > len(group):  # copies go to the first free cells in reading order
            new = [Obj(cmd.target.shape, cmd.target.color, cmd.target.size, c)
                   for c in scene.free_cells[: cmd.count - len(group)]]
            return scene.with_objects(objects + new)
        drop = set(group[cmd.count:])  # the last ones in reading order go
        return scene.with_objects(o for o in objects if o not in drop)
    (old,) = scene.find(cmd.target)
    rest = [o for o in objects if o is not old]
    if cmd.op == "subject_remove":
        return scene.with_objects(rest)
    if cmd.op == "subject_replace":
        return scene.with_objects(rest + [Obj(cmd.shape, cmd.color, old.size, old.cell)])
    if cmd.op == "color_alter":
        return scene.with_objects(rest + [old.replace(color=cmd.color)])
    if cmd.op == "size_change":
        return scene.with_objects(rest + [old.replace(size=cmd.size)])
    if cmd.op == "position_change":
        occupant = scene.at(cmd.cell)
        if occupant is not None:  # swap places (check_command made sure it is `swap_with`)
            rest = [o for o in rest if o is not occupant] + [occupant.replace(cell=old.cell)]
        return scene.with_objects(rest + [old.replace(cell=cmd.cell)])
    raise ValueError(f"Unknown op {cmd.op!r}: pass one of {TASK_TYPES}.")


def result_desc(cmd: Command) -> Desc | None:
    """Description of the object a command leaves in focus (what a later "it" means), or `None`."""
    if cmd.op == "subject_add":
        return Desc(cmd.size, cmd.color, cmd.shape)
    if cmd.op == "subject_replace":
        return Desc(cmd.target.size, cmd.color, cmd.shape)
    if cmd.op == "color_alter":
        return cmd.target._replace(color=cmd.color)
    if cmd.op == "size_change":
        return cmd.target._replace(size=cmd.size)
    if cmd.op == "position_change":
        return cmd.target
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Canonical intent (the gold operative instruction) and MICE formatted_instruction
# ---------------------------------------------------------------------------------------------------------------------


def _core(cmd: Command) -> str:
    t = cmd.target.phrase if cmd.target is not None else ""
    if cmd.op == "subject_add" and cmd.requested_cell is not None:
        return (f"Add a {cmd.size} {cmd.color} {cmd.shape} at the {CELL_NAMES[cmd.cell]}, the nearest free cell to "
                f"the occupied {CELL_NAMES[cmd.requested_cell]}")
    if cmd.op == "subject_add":
        return f"Add a {cmd.size} {cmd.color} {cmd.shape} at the {CELL_NAMES[cmd.cell]}"
    if cmd.op == "subject_remove":
        return f"Remove the {t}"
    if cmd.op == "subject_replace":
        return f"Replace the {t} with a {cmd.target.size} {cmd.color} {cmd.shape}"
    if cmd.op == "color_alter":
        return f"Change the color of the {t} to {cmd.color}"
    if cmd.op == "size_change":
        return f"Change the size of the {t} to {cmd.size}"
    if cmd.op == "position_change" and cmd.swap_with is not None:
        return f"Move the {t} to the {CELL_NAMES[cmd.cell]}, swapping it with the {cmd.swap_with.phrase} there"
    if cmd.op == "position_change":
        return f"Move the {t} to the {CELL_NAMES[cmd.cell]}"
    if cmd.op == "count_change":
        return f"Change the number of {cmd.target.plural} to {cmd.count}"
    if cmd.op == "background_change":
        return f"Change the background to a {cmd.tone} tone, keeping its texture and every object unchanged"
    if cmd.op == "undo" and cmd.restore is not None:
        return f"Restore the image from before turn {cmd.restore + 1}"
    if cmd.op == "undo":
        prev = _core(cmd.previous)
        return f"Undo the previous edit ({prev[0].lower() + prev[1:]}), restoring the image from before it"
    raise ValueError(f"Unknown op {cmd.op!r}: pass one of {TASK_TYPES}.")


def canonical_rule(rule_color: str) -> str:
    """The fixed short statement of a colour rule that every intent under it carries."""
    return (f"Persistent rule: apply {rule_color} color only to the object being added or changed; "
            "nothing else changes color.")


def canonical_intent(cmd: Command, rule_color: str | None = None) -> str:
    """The gold operative intent: one fixed, self-contained phrasing of a resolved command.

    Forms (targets are always full "size colour shape" descriptions, cells by name):

    - `Add a small red circle at the top left.` / `Remove the small red circle.`
    - `Replace the small red square with a small blue circle.` (the replaced object keeps its size)
    - `Change the color of the small red square to blue.` / `Change the size of the small red square to large.`
    - `Move the small red square to the bottom left.` / `Change the number of small red squares to 3.`
    - `Change the background to a warm tone, keeping its texture and every object unchanged.`
    - `Undo the previous edit (move the small red square to the bottom left), restoring the image from before it.`

    Everyday phrasing (`language`, docs/shapes_language.md) adds: `Restore the image from before turn 3.` (an undo
    with `restore=2`: undo of an undo, "go back to how it was after the second edit"); `Move the small red square to
    the top left, swapping it with the large blue circle there.` (a move into an occupied cell); `Add a small red
    circle at the middle left, the nearest free cell to the occupied top left.` (an add into one); and, for a colour
    named against the rule, `...; the named color red overrides the purple rule for this object.` before the rule.

    Under a persistent colour rule the colour it imposes is already explicit in the edit, and the rule is appended
    as `canonical_rule(color)`: `Add a small blue circle at the top left. Persistent rule: apply blue color only to
    the object being added or changed; nothing else changes color.`

    Args:
        cmd (`Command`): the resolved edit.
        rule_color (`str`, *optional*): the active persistent rule's colour.
    """
    text = _core(cmd)
    if cmd.overrides_rule and rule_color is not None:
        text += f"; the named color {cmd.color} overrides the {rule_color} rule for this object"
    text += "."
    if rule_color is not None:
        text += " " + canonical_rule(rule_color)
    return text


def formatted_instruction(cmd: Command) -> str:
    """The MICE `formatted_instruction`: the resolved edit with its objects and values in [brackets]."""
    t = f"[{cmd.target.phrase}]" if cmd.target is not None else ""
    if cmd.op == "subject_add":
        return f"Add [{cmd.size} {cmd.color} {cmd.shape}] at the [{CELL_NAMES[cmd.cell]}]"
    if cmd.op == "subject_remove":
        return f"Remove {t}"
    if cmd.op == "subject_replace":
        return f"Replace {t} with [{cmd.target.size} {cmd.color} {cmd.shape}]"
    if cmd.op == "color_alter":
        return f"Change the color of {t} to [{cmd.color}]"
    if cmd.op == "size_change":
        return f"Change the size of {t} to [{cmd.size}]"
    if cmd.op == "position_change" and cmd.swap_with is not None:
        return f"Change the position of {t} to [{CELL_NAMES[cmd.cell]}], swapping with [{cmd.swap_with.phrase}]"
    if cmd.op == "position_change":
        return f"Change the position of {t} to [{CELL_NAMES[cmd.cell]}]"
    if cmd.op == "count_change":
        return f"Change the count of {t} to [{cmd.count}]"
    if cmd.op == "background_change":
        return f"Change the background to [{cmd.tone}] tone"
    if cmd.op == "undo" and cmd.restore is not None:
        return f"Restore the image from before turn [{cmd.restore + 1}]"
    if cmd.op == "undo":
        return f"Undo the previous edit: {formatted_instruction(cmd.previous)}"
    raise ValueError(f"Unknown op {cmd.op!r}: pass one of {TASK_TYPES}.")


# ---------------------------------------------------------------------------------------------------------------------
# Phrasings
# ---------------------------------------------------------------------------------------------------------------------

# Slots: {target} object or reference, {new} object phrase with article, {cell}, {color}, {size} (large|small),
# {cmp} (bigger|smaller), {verb} (Enlarge|Shrink), {n} digit, {nw} number word, {group_sg} / {group_pl} /
# {group_n} (singular / plural / agreeing with n), {tone}, {keep} (names of the objects kept).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "subject_add": ("Add {new} at the {cell}", "Put {new} in the {cell}", "Place {new} at the {cell}",
                    "Draw {new} in the {cell} cell", "Add {new} on the {cell} of the image"),
    "subject_remove": ("Remove {target}", "Delete {target}", "Take away {target}", "Get rid of {target}",
                       "Erase {target}"),
    "subject_replace": ("Replace {target} with {new}", "Swap {target} for {new}", "Turn {target} into {new}",
                        "Change {target} into {new}"),
    "color_alter": ("Change the color of {target} to {color}", "Make {target} {color}", "Recolor {target} {color}",
                    "Paint {target} {color}"),
    "size_change": ("Make {target} {cmp}", "Change the size of {target} to {size}", "{verb} {target}",
                    "Resize {target} to {size}"),
    "position_change": ("Move {target} to the {cell}", "Change the position of {target} to the {cell}",
                        "Shift {target} to the {cell}", "Relocate {target} to the {cell}"),
    "count_change": ("Change the count of the {group_sg} to {n}", "Change the number of {group_pl} to {n}",
                     "Make the number of {group_pl} {n}", "Show exactly {nw} {group_n}"),
    "background_change": ("Change the background to a {tone} tone", "Give the background a {tone} tint",
                          "Make the background {tone}", "Switch the background to a {tone} color scheme",
                          "Change the background to a {tone} tone, remain the {keep} unchanged"),
    "undo": ("Undo that", "Undo the last edit", "Actually, undo that", "Revert the previous change",
             "Go back to how it was before the last edit"),
}
REFERENCE_PHRASES: dict[str, tuple[str, ...]] = {
    "it": ("it",),
    "first_added": ("the one you added first", "the shape you added first"),
    "first_edit": ("the shape from the first edit", "the object from the first edit"),
}
PREFIXES = ("", "Now ", "Next, ", "Then ")
# Persistent colour rules, phrased like the real cm release (turn 1 only); the edit follows a connector.
RULE_TEMPLATES: tuple[str, ...] = (
    ("Set a persistent rule for all following edits: {c} color must be applied exclusively to the object being "
     "added or changed — nothing else may change color."),
    ("Apply a standing constraint to all subsequent edits: only the object directly involved in each edit should "
     "receive {c} color — the background and all other objects must keep their original colors."),
    ("From now on, every edit must use {c} color only on the object that is being added or changed — leave the "
     "background and all unmodified objects in their original colors."),
    "From now on, anything you add or change must be given {c} color, and nothing else may change color.",
)
RULE_CONNECTORS = ("With this rule active, ", "With this rule in place, ")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _new_phrase(lit: Literal) -> str:
    words = [w for w in (lit.size, lit.color, lit.shape) if w]
    return _article(" ".join(words))


def _target_phrase(target, rng) -> str:
    if isinstance(target, Desc):
        return "the " + target.phrase
    if target in REFERENCE_PHRASES:
        return rng.choice(REFERENCE_PHRASES[target])
    raise ValueError(f"Bad target {target!r}: pass a Desc or one of {REFERENCES}.")


def realize(lit: Literal, rng, *, keep: Sequence[str] = (), prefix: bool = False) -> str:
    """Write a literal edit as an instruction, choosing a phrasing with `rng` (a `random.Random`).

    Args:
        lit (`Literal`): what to say.
        rng (`random.Random`): picks the phrasing.
        keep (`Sequence[str]`): object names for the "remain the ... unchanged" background phrasing (used only if
            non-empty).
        prefix (`bool`): may start with "Now" / "Next," / "Then" (later turns of a session).
    """
    templates = [t for t in TEMPLATES[lit.op] if keep or "{keep}" not in t]
    template = rng.choice(templates)
    slots = {"cell": CELL_NAMES.get(lit.cell, ""), "color": lit.color or "", "size": lit.size or "",
             "tone": lit.tone or "", "keep": ", ".join(keep)}
    if lit.op in ("subject_add", "subject_replace"):
        slots["new"] = _new_phrase(lit)
    if lit.target is not None:
        slots["target"] = _target_phrase(lit.target, rng)
    if lit.op == "size_change":
        slots["cmp"] = "bigger" if lit.size == "large" else "smaller"
        slots["verb"] = "Enlarge" if lit.size == "large" else "Shrink"
    if lit.op == "count_change":
        slots.update(n=str(lit.count), nw=NUMBER_WORDS[lit.count], group_sg=lit.target.phrase,
                     group_pl=lit.target.plural, group_n=lit.target.phrase if lit.count == 1 else lit.target.plural)
    text = template.format(**slots)
    if prefix:
        lead = rng.choice(PREFIXES)
        if lead:
            text = lead + text[0].lower() + text[1:]
    if lit.rule_color is not None:
        rule = rng.choice(RULE_TEMPLATES).format(c=lit.rule_color)
        text = f"{rule} {rng.choice(RULE_CONNECTORS)}{text}"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Literal parser
# ---------------------------------------------------------------------------------------------------------------------


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_SIZE, _COLOR, _SHAPE = _alt(SIZES), _alt(COLOR_NAMES), _alt(SHAPES)
_SHAPE_ANY = _alt(list(SHAPES) + list(PLURALS.values()))
_REF = _alt([p for phrases in REFERENCE_PHRASES.values() for p in phrases])
_SLOTS = {
    "target": rf"(?P<target>the (?:{_SIZE}) (?:{_COLOR}) (?:{_SHAPE})|{_REF})",
    "new": rf"(?P<new>an? (?:(?:{_SIZE}) )?(?:(?:{_COLOR}) )?(?:{_SHAPE}))",
    "cell": rf"(?P<cell>{_alt(CELL_BY_NAME)})",
    "color": rf"(?P<color>{_COLOR})",
    "size": rf"(?P<size>{_SIZE})",
    "cmp": r"(?P<cmp>bigger|larger|smaller)",
    "verb": r"(?P<verb>enlarge|shrink)",
    "n": r"(?P<n>[1-5])",
    "nw": rf"(?P<nw>{_alt(NUMBER_WORDS.values())})",
    "group_sg": rf"(?P<group>(?:{_SIZE}) (?:{_COLOR}) (?:{_SHAPE_ANY}))",
    "tone": rf"(?P<tone>{_alt(TONE_NAMES)})",
    "keep": r"(?P<keep>[a-z ,]+?)",
}
_SLOTS["group_pl"] = _SLOTS["group_n"] = _SLOTS["group_sg"]
_RULE_RES = [re.compile(re.escape(t).replace(re.escape("{c}"), rf"(?P<rule>{_COLOR})") + r"\s*", re.IGNORECASE)
             for t in RULE_TEMPLATES]
_CONNECTOR_RE = re.compile(f"(?:{_alt([c.strip().rstrip(',').lower() for c in RULE_CONNECTORS])})" + r"\s*,\s*",
                           re.IGNORECASE)
_PREFIX_RE = re.compile(r"^(?:now|next|then),?\s+", re.IGNORECASE)


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    pattern = "".join(_SLOTS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(pattern + r"\.?", re.IGNORECASE)


_PATTERNS: list[tuple[str, re.Pattern]] = [(op, _compile(t)) for op, ts in TEMPLATES.items() for t in ts]
_REF_BY_PHRASE = {p: key for key, phrases in REFERENCE_PHRASES.items() for p in phrases}
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_NUMBER_BY_WORD = {w: n for n, w in NUMBER_WORDS.items()}


def split_color_rule(text: str) -> tuple[str | None, str]:
    """`(rule colour, the edit clause)` of an instruction; `(None, text)` when it states no shapes rule."""
    text = " ".join(text.split())
    for rule_re in _RULE_RES:
        m = rule_re.match(text)
        if m:
            rest = text[m.end():]
            c = _CONNECTOR_RE.match(rest)
            return m.group("rule").lower(), (rest[c.end():] if c else rest).strip()
    return None, text.strip()


def _desc(text: str) -> Desc:
    size, color, shape = text.lower().split()
    return Desc(size, color, _SINGULAR.get(shape, shape))


def parse_instruction(text: str) -> Literal:
    """Read an instruction of the shapes grammar literally (no history, no scene).

    Raises:
        ValueError: when the text is not an instruction of this grammar.
    """
    rule_color, edit = split_color_rule(text)
    edit = _PREFIX_RE.sub("", edit.strip())
    for op, pattern in _PATTERNS:
        m = pattern.fullmatch(edit)
        if m is None:
            continue
        g = {k: (v.lower() if isinstance(v, str) else v) for k, v in m.groupdict().items()}
        target = None
        if g.get("target"):
            phrase = g["target"]
            target = _REF_BY_PHRASE[phrase] if phrase in _REF_BY_PHRASE else _desc(phrase[len("the "):])
        if g.get("group"):
            target = _desc(g["group"])
        shape = color = size = None
        if g.get("new"):
            words = g["new"].split()[1:]
            shape = words[-1]
            color = next((w for w in words if w in COLOR_NAMES), None)
            size = next((w for w in words if w in SIZES), None)
        color = g.get("color") or color
        size = g.get("size") or size
        if g.get("cmp") or g.get("verb"):
            size = "small" if (g.get("cmp") == "smaller" or g.get("verb") == "shrink") else "large"
        count = int(g["n"]) if g.get("n") else _NUMBER_BY_WORD.get(g.get("nw"))
        return Literal(op, target, shape, color, size, CELL_BY_NAME.get(g.get("cell")), count, g.get("tone"),
                       rule_color)
    raise ValueError(f"Not a MICE-Shapes instruction: {text!r}.")


def resolve_literal(lit: Literal, scene: Scene) -> Command | None:
    """Resolve a literal edit against a scene using its words only (the `literal` editor's reading).

    References ("it", "the one you added first") and "undo" cannot be resolved from the words: returns `None`.
    A colour the words leave out is `LITERAL_DEFAULT_COLOR` for an added object and the old colour for a replaced one;
    persistent rules are ignored.
    """
    if lit.op == "undo" or isinstance(lit.target, str):
        return None
    old = None
    if lit.op in TARGET_OPS:
        matches = scene.find(lit.target)
        if len(matches) != 1:
            return None
        old = matches[0]
    if lit.op == "subject_add":
        return Command(lit.op, shape=lit.shape, color=lit.color or LITERAL_DEFAULT_COLOR,
                       size=lit.size or LITERAL_DEFAULT_SIZE, cell=lit.cell)
    if lit.op == "subject_replace":
        return Command(lit.op, lit.target, shape=lit.shape, color=lit.color or old.color)
    return Command(lit.op, lit.target, color=lit.color, size=lit.size, cell=lit.cell, count=lit.count, tone=lit.tone)


def with_rule_colour(cmd: Command, rule_color: str | None) -> Command:
    """`cmd` with an unspecified new-object colour taken from the rule (marks `color_from_rule`)."""
    if rule_color is None or cmd.op not in ("subject_add", "subject_replace"):
        return cmd
    return replace(cmd, color=rule_color, color_from_rule=True)

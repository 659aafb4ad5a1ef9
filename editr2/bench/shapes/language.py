"""Everyday phrasing for MICE-Shapes: phrasing families, referring expressions, rules, undo, and the oracle reader.

`generate_session(..., phrasing="seen" | "unseen" | "all")` writes sessions in this language (the default
`phrasing="grammar"` keeps the fixed grammar of `grammar.TEMPLATES`, unchanged). Each turn is written in one
*phrasing family* (`FAMILIES`): a register with its own sentence frames for every operation, rule statement and undo.
Families are split into `SEEN_FAMILIES` (for training) and `UNSEEN_FAMILIES` (held out: only
`phrasing="unseen"` / `"all"` ever produce them; the bench reports either split with `--phrasing`).

What the language covers (the exact semantics are in docs/shapes_language.md):

- targets by partial description ("the red one", "the circle", "the big square"), quoted or not, with or without
  articles, always by the object's *current* attributes; references: "it" / "that one" (the object the previous turn
  produced or changed), "the one you just added" (the last object added), "the earliest one" (the first object
  added), "the other square" (the one of two squares that "it" is not), "the shape from the first edit";
- places by name ("the top-left corner", "the middle") or relative to an object ("left of the circle", "above it",
  "beside it", "where the triangle used to be");
- moves or adds into an occupied cell: a move *swaps* the two objects; an add goes to the nearest free cell
  (`grammar.nearest_free_cell`); the gold intent says which;
- colour rules stated, changed and cancelled in many ways; a colour named in the words wins over the rule for that
  edit (the gold intent says so, `Command.overrides_rule`) and the rule stays active;
- undo in many forms, undo of an undo (restores the scene before the undo), and "go back to how it was after the
  second edit" (`Command.restore`: the gold intent names the restored state, the gold scene is exactly that scene).

`interpret(dialogue, text)` is the oracle reader: it reads an instruction of this language against the session so far
(a `Dialogue`) and returns the resolved command and the rule after the turn. Every generated instruction is checked
with it when it is written, so the gold scene follows from the words deterministically.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .grammar import Command, canonical_intent, check_command, formatted_instruction, nearest_free_cell
from .sessions import OP_WEIGHTS  # how often each edit op is drawn: as in the grammar's sessions
from .world import (CELL_NAMES, COLOR_NAMES, GRID, MAX_OBJECTS, PLURALS, SHAPES, SIZES, TONE_NAMES, Desc, Obj,
                    Scene)

PHRASINGS = ("grammar", "seen", "unseen", "all")

# ---------------------------------------------------------------------------------------------------------------------
# Phrasing families
# ---------------------------------------------------------------------------------------------------------------------

# Slots: {t} target, {new} new object, {where} place (with its preposition), {color}, {size}, {cmp} (bigger /
# smaller), {verb} (enlarge / shrink), {n} digit, {nw} number word, {group} counted group, {tone}, {keep} kept object
# names, {k} an earlier turn ("the second edit", "turn 2"); rule sentences: {c} new colour, {old} previous colour.
# Keys: the edit ops of `grammar.TASK_TYPES` plus "redo" (undo of an undo), "restore" (back to the state after turn
# k), "restore_source" (back to the source image), "rule_set", "rule_change", "rule_cancel".
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "release": {  # the Edit-R2 release's own style: bare object names, no final full stop
        "subject_add": ("Add {new} {where}",),
        "subject_remove": ("Remove {t}", "Delete {t}"),
        "subject_replace": ("Replace {t} with {new}",),
        "color_alter": ("Change the color of {t} to {color}",),
        "size_change": ("Change the size of {t} to {size}",),
        "position_change": ("Change the position of {t} {where}",),
        "count_change": ("Change the count of {group} to {n}",),
        "background_change": ("Change the background to {tone} tone",
                              "Change the background to {tone} tone, remain the {keep} unchanged"),
        "undo": ("Undo the last edit", "Revert the previous edit"),
        "redo": ("Undo the previous undo", "Redo the last undone edit"),
        "restore": ("Restore the image to the state after {k}", "Revert to the state after {k}"),
        "restore_source": ("Restore the original image", "Revert all edits"),
        "rule_set": (
            ("Set a persistent rule for all following edits: {c} color must be applied exclusively to the object "
             "being added or changed — nothing else may change color."),
            ("Apply a standing constraint to all subsequent edits: only the object directly involved in each edit "
             "should receive {c} color — the background and all other objects must keep their original colors."),
            ("From now on, every edit must use {c} color only on the object that is being added or changed — leave "
             "the background and all unmodified objects in their original colors."),
        ),
        "rule_change": ("Update the persistent rule: {c} color now replaces {old} for every object being added or "
                        "changed.",),
        "rule_cancel": ("Cancel the persistent rule: objects being added or changed no longer need {old} color.",),
    },
    "plain": {
        "subject_add": ("Add {new} {where}.", "Put {new} {where}.", "Place {new} {where}.", "Draw {new} {where}."),
        "subject_remove": ("Remove {t}.", "Get rid of {t}.", "Delete {t}.", "Erase {t}."),
        "subject_replace": ("Turn {t} into {new}.", "Swap {t} for {new}.", "Replace {t} with {new}."),
        "color_alter": ("Make {t} {color}.", "Recolour {t} {color}.", "Paint {t} {color}.", "Turn {t} {color}."),
        "size_change": ("Make {t} {cmp}.", "{verb} {t}.", "Resize {t} to {size}."),
        "position_change": ("Move {t} {where}.", "Shift {t} {where}.", "Relocate {t} {where}."),
        "count_change": ("Change the number of {group} to {n}.", "Show exactly {nw} {group}."),
        "background_change": ("Make the background {tone}.", "Give the background a {tone} tone."),
        "undo": ("Undo that.", "Undo the last change.", "Take that back.", "Revert that."),
        "redo": ("Undo the undo.", "Redo that."),
        "restore": ("Go back to how it was after {k}.", "Restore it to how it looked after {k}."),
        "restore_source": ("Go back to the original.", "Start over from the original image."),
        "rule_set": ("Keep using {c} for new things.", "From now on, everything new is {c}.",
                     "New shapes should be {c} from now on."),
        "rule_change": ("Use {c} instead of {old} for new things from now on.", "Switch the colour rule to {c}."),
        "rule_cancel": ("Forget the colour rule.", "Stop using {old} for new things."),
    },
    "casual": {  # lower case, articles optional, no final punctuation
        "subject_add": ("add {new} {where}", "stick {new} {where}", "pop {new} {where}"),
        "subject_remove": ("get rid of {t}", "ditch {t}", "lose {t}"),
        "subject_replace": ("make {t} {new} instead", "change {t} to {new}"),
        "color_alter": ("make {t} {color}", "colour {t} {color}", "recolor {t} to {color}"),
        "size_change": ("make {t} a bit {cmp}", "make {t} {size}"),
        "position_change": ("move {t} {where}", "shove {t} {where}", "slide {t} {where}"),
        "count_change": ("make it {n} {group}", "change the number of {group} to {n}"),
        "background_change": ("background {tone} pls", "make the bg {tone}"),
        "undo": ("undo", "undo that", "nah undo that", "scratch that", "go back one step"),
        "redo": ("undo the undo", "actually put that back"),
        "restore": ("go back to after {k}", "back to how it was after {k}"),
        "restore_source": ("start over", "back to the original"),
        "rule_set": ("keep using {c} for new stuff", "new stuff should be {c} from now on"),
        "rule_change": ("actually use {c} instead of {old} for new stuff", "switch new stuff to {c}"),
        "rule_cancel": ("no more {old}, new stuff can be any colour", "forget the {old} thing"),
    },
    "polite": {
        "subject_add": ("Could you add {new} {where}?", "Please put {new} {where}."),
        "subject_remove": ("Could you remove {t}?", "Please get rid of {t}."),
        "subject_replace": ("Could you turn {t} into {new}?", "Please replace {t} with {new}."),
        "color_alter": ("Could you make {t} {color}?", "Please recolour {t} {color}."),
        "size_change": ("Could you make {t} {cmp}?", "Please make {t} {size}."),
        "position_change": ("Could you move {t} {where}?", "Please move {t} {where}."),
        "count_change": ("Could you change the number of {group} to {n}?", "Please show {nw} {group}."),
        "background_change": ("Could you make the background {tone}?", "Please give the background a {tone} tone."),
        "undo": ("Could you undo that?", "Please undo the last change."),
        "redo": ("Could you undo the undo?", "Please redo that."),
        "restore": ("Could you go back to how it was after {k}?", "Please restore it to how it looked after {k}."),
        "restore_source": ("Could you go back to the original?", "Please start over from the original image."),
        "rule_set": ("Please keep using {c} for anything new.", "Could you make every new shape {c} from now on?"),
        "rule_change": ("Please use {c} instead of {old} for new shapes from now on.",),
        "rule_cancel": ("Please drop the colour rule.",),
    },
    "wish": {  # held out: first-person wishes
        "subject_add": ("I'd like {new} {where}.", "Let's have {new} {where}.", "I want {new} {where}."),
        "subject_remove": ("I'd like {t} gone.", "{t} has to go."),
        "subject_replace": ("I'd rather have {new} instead of {t}.", "Let's swap {t} out for {new}."),
        "color_alter": ("I'd like {t} in {color}.", "{t} should be {color}."),
        "size_change": ("I'd like {t} {cmp}.", "{t} should be {size}."),
        "position_change": ("I'd like {t} moved {where}.", "Let's move {t} {where}."),
        "count_change": ("I want {n} {group}.", "There should be {nw} {group}."),
        "background_change": ("I'd like a {tone} background.", "Let's go with a {tone} background."),
        "undo": ("I liked it better before.", "Let's not do that, go back."),
        "redo": ("I liked it better with that change, bring it back.", "Let's redo what you undid."),
        "restore": ("I liked it best after {k}, go back there.", "Let's return to how it looked after {k}."),
        "restore_source": ("I liked the original better, go back to it.", "Let's return to the original."),
        "rule_set": ("I want everything new in {c} from now on.", "Let's make all new shapes {c} from here on."),
        "rule_change": ("I'd like new shapes in {c} now instead of {old}.",),
        "rule_cancel": ("I don't need new shapes to be {old} anymore.",),
    },
    "shorthand": {  # held out: terse notes
        "subject_add": ("+ {new} {where}", "add: {new} {where}"),
        "subject_remove": ("- {t}", "remove: {t}", "{t} out"),
        "subject_replace": ("{t} -> {new}", "swap: {t} / {new}"),
        "color_alter": ("{t} -> {color}", "recolour: {t} {color}"),
        "size_change": ("{t} -> {size}", "size: {t} {size}"),
        "position_change": ("{t} -> {where}", "move: {t} {where}"),
        "count_change": ("{n} x {group}", "count: {group} {n}"),
        "background_change": ("bg -> {tone}", "bg: {tone}"),
        "undo": ("ctrl+z", "step back", "rollback"),
        "redo": ("ctrl+y", "redo"),
        "restore": ("rollback: after {k}", "state after {k}"),
        "restore_source": ("rollback: original", "reset"),
        "rule_set": ("rule: new stuff {c}", "rule: {c} for anything new"),
        "rule_change": ("rule: {c} not {old}", "rule now {c}"),
        "rule_cancel": ("rule off", "no rule"),
    },
}
SEEN_FAMILIES: tuple[str, ...] = ("release", "plain", "casual", "polite")
UNSEEN_FAMILIES: tuple[str, ...] = ("wish", "shorthand")
FAMILIES_BY_PHRASING = {"seen": SEEN_FAMILIES, "unseen": UNSEEN_FAMILIES, "all": SEEN_FAMILIES + UNSEEN_FAMILIES}
# How each family writes: articles ("never" / "always" / "sometimes"), lower case, opening words, fillers, and what
# joins a rule sentence to the edit.
STYLE = {
    "release": {"articles": "never", "lower": False, "openers": (), "fillers": False,
                "join": " With this rule active, "},
    "plain": {"articles": "always", "lower": False, "openers": ("Now ", "Next, ", "Then "), "fillers": True,
              "join": " "},
    "casual": {"articles": "sometimes", "lower": True, "openers": ("ok ", "now ", "and "), "fillers": True,
               "join": ", "},
    "polite": {"articles": "always", "lower": False, "openers": ("Next, ",), "fillers": True, "join": " "},
    "wish": {"articles": "always", "lower": False, "openers": ("Now ",), "fillers": True, "join": " "},
    "shorthand": {"articles": "never", "lower": True, "openers": (), "fillers": False, "join": "; "},
}
# Trailing words that mention "there" / "their" / "the others" without naming an object (the reader drops them).
FILLERS = (", leave the rest where they are", ", everything else stays there", " and keep the others in their places",
           ", thanks")
OPENERS_RE = re.compile(r"^(?:(?:now|next|then|ok|okay|and|alright),?\s+)+", re.IGNORECASE)

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SIZE_BY_WORD = {w: s for s, words in SIZE_WORDS.items() for w in words}
CELL_WORDS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("top left", "top-left", "upper left", "top left corner", "top-left corner", "upper left corner"),
    (0, 1): ("top center", "top centre", "top middle", "top"),
    (0, 2): ("top right", "top-right", "upper right", "top right corner", "top-right corner", "upper right corner"),
    (1, 0): ("middle left", "left middle", "center left", "left side"),
    (1, 1): ("center", "centre", "middle"),
    (1, 2): ("middle right", "right middle", "center right", "right side"),
    (2, 0): ("bottom left", "bottom-left", "lower left", "bottom left corner", "bottom-left corner"),
    (2, 1): ("bottom center", "bottom centre", "bottom middle", "bottom"),
    (2, 2): ("bottom right", "bottom-right", "lower right", "bottom right corner", "bottom-right corner"),
}
CELL_BY_WORDS = {w: c for c, words in CELL_WORDS.items() for w in words}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
REL_WORDS = {"left": ("left of", "to the left of", "on the left of"), "right": ("right of", "to the right of",
                                                                           "on the right of"),
             "above": ("above", "above of"), "below": ("below", "under", "below of")}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
            "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
REFERENCE_WORDS = {
    "it": ("it", "that one", "this one"),
    "last_added": ("the one you just added", "the one you added last"),
    "first_added": ("the earliest one", "the first one you added", "the one you added first"),
    "first_edit": ("the shape from the first edit", "the object from the first edit"),
}
REF_BY_WORDS = {w: k for k, words in REFERENCE_WORDS.items() for w in words}


def families_for(phrasing: str) -> tuple[str, ...]:
    """The phrasing families a `phrasing` of `PHRASINGS` (other than "grammar") draws from."""
    if phrasing not in FAMILIES_BY_PHRASING:
        raise ValueError(f"phrasing={phrasing!r}: pass one of {tuple(FAMILIES_BY_PHRASING)} (or 'grammar').")
    return FAMILIES_BY_PHRASING[phrasing]


# ---------------------------------------------------------------------------------------------------------------------
# Regular expressions of the language
# ---------------------------------------------------------------------------------------------------------------------


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in set(words)), key=len, reverse=True))


_SIZE_RE, _COLOR_RE = _alt(SIZE_BY_WORD), _alt(COLOR_NAMES)
_SHAPE_RE = _alt(SHAPES)
_DESC_RE = rf"(?:the )?(?:(?:{_SIZE_RE}) )?(?:(?:{_COLOR_RE}) )?(?:{_SHAPE_RE}|one)"
_REF_RE = _alt(list(REF_BY_WORDS)) + rf"|the other (?:{_SHAPE_RE})"
_TARGET_RE = rf'(?:"(?:{_REF_RE}|{_DESC_RE})"|{_REF_RE}|{_DESC_RE})'
_CELL_RE = _alt(CELL_BY_WORDS)
_WHERE_RE = (rf"(?:(?:at|in|on|to|into|onto) )?(?:the )?(?:{_CELL_RE})"
             rf"|(?:to )?(?:{_alt(w for ws in REL_WORDS.values() for w in ws)}) {_TARGET_RE}"
             rf"|(?:beside|next to) {_TARGET_RE}"
             rf"|(?:to |in )?where {_DESC_RE} (?:used to be|was)")
_K_RE = rf"(?:the )?(?:{_alt(ORDINALS)}) (?:edit|change|step|turn)|(?:turn|step|edit) \d+"
_SLOT_RE = {
    "t": _TARGET_RE, "where": _WHERE_RE, "k": _K_RE,
    "new": rf"(?:an? )?(?:(?:{_SIZE_RE}) )?(?:(?:{_COLOR_RE}) )?(?:{_SHAPE_RE})",
    "color": _COLOR_RE, "size": _SIZE_RE, "cmp": "bigger|larger|smaller", "verb": "enlarge|shrink",
    "n": "[1-5]", "nw": _alt(NUMBER_WORDS.values()),
    "group": rf"(?:the )?(?:{_SIZE_RE}) (?:{_COLOR_RE}) (?:{_alt(list(SHAPES) + list(PLURALS.values()))})",
    "tone": _alt(TONE_NAMES), "keep": r"[a-z ,]+?", "c": _COLOR_RE, "old": _COLOR_RE,
}


def _strip_end(template: str) -> str:
    return template.rstrip(".!?")


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", _strip_end(template))
    pattern = "".join(f"(?P<{p[1:-1]}>{_SLOT_RE[p[1:-1]]})" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(pattern, re.IGNORECASE)


_EDIT_KEYS = ("subject_add", "subject_remove", "subject_replace", "color_alter", "size_change", "position_change",
              "count_change", "background_change", "undo", "redo", "restore", "restore_source")
_RULE_KEYS = ("rule_set", "rule_change", "rule_cancel")
PATTERNS: list[tuple[str, str, str, re.Pattern]] = [  # (family, key, template, pattern)
    (fam, key, t, _compile(t)) for fam, table in FAMILIES.items() for key in _EDIT_KEYS for t in table[key]]
_RULE_END = r"[.!?]?(?:\s+|,\s*|;\s*|$)(?:with this rule (?:active|in place),\s*)?"  # what joins the edit
RULE_PATTERNS: list[tuple[str, str, str, re.Pattern]] = [
    (fam, key, t, re.compile(_compile(t).pattern + _RULE_END, re.IGNORECASE))
    for fam, table in FAMILIES.items() for key in _RULE_KEYS for t in table[key]]


# ---------------------------------------------------------------------------------------------------------------------
# The session so far
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Dialogue:
    """A session as far as it has gone, with object identities (what the oracle reader resolves words against).

    Args:
        scenes (`list[dict[int, Obj]]`): the objects by id after each turn (0 = the source).
        tones (`list[str]`), background (`int`): the tone after each turn; the texture seed.
        commands (`list[Command]`): the resolved edit of each turn.
        focus (`list[int | None]`): per turn, the object it produced or changed ("it" after it).
        first_added, last_added (`list[int | None]`): per scene, the first / last object added so far.
        tainted (`list[frozenset]`): per scene, ids that took part in a count change (never referred back to).
        rules (`list[str | None]`): the persistent rule's colour after each turn (index 0: before turn 1).
        next_id (`int`): the next fresh object id.
    """

    scenes: list[dict]
    tones: list[str]
    background: int
    commands: list = field(default_factory=list)
    focus: list = field(default_factory=list)
    first_added: list = field(default_factory=lambda: [None])
    last_added: list = field(default_factory=lambda: [None])
    tainted: list = field(default_factory=lambda: [frozenset()])
    rules: list = field(default_factory=lambda: [None])
    touched: list = field(default_factory=list)
    next_id: int = 0

    @classmethod
    def start(cls, scene: Scene) -> "Dialogue":
        objs = {i: o for i, o in enumerate(scene.objects)}
        return cls([objs], [scene.tone], scene.background, next_id=len(objs))

    @property
    def turn(self) -> int:
        """The 1-based number of the next turn."""
        return len(self.commands) + 1

    @property
    def objs(self) -> dict:
        return self.scenes[-1]

    @property
    def rule(self) -> str | None:
        return self.rules[-1]

    def scene(self, index: int = -1) -> Scene:
        return Scene(tuple(self.scenes[index].values()), self.background, self.tones[index])

    def nameable(self, obj_id) -> bool:
        """Alive and the only object with its full description (so the gold intent can name it)."""
        if obj_id not in self.objs:
            return False
        return sum(o.desc == self.objs[obj_id].desc for o in self.objs.values()) == 1

    def referable(self, obj_id) -> bool:
        return obj_id is not None and self.nameable(obj_id) and obj_id not in self.tainted[-1]

    def it(self) -> int | None:
        return self.focus[-1] if self.focus else None

    def reference(self, key: str) -> int | None:
        """The object a reference key points at (`None` when it points at nothing that can be named)."""
        obj_id = {"it": self.it(), "last_added": self.last_added[-1], "first_added": self.first_added[-1],
                  "first_edit": self.focus[0] if self.focus else None}[key]
        return obj_id if self.referable(obj_id) else None

    def other(self, shape: str) -> int | None:
        """"the other <shape>": of exactly two objects of `shape`, the one that "it" is not."""
        it = self.it()
        if it not in self.objs or self.objs[it].shape != shape:
            return None
        rest = [i for i, o in self.objs.items() if o.shape == shape and i != it]
        return rest[0] if len(rest) == 1 and self.referable(rest[0]) else None

    def id_at(self, cell) -> int | None:
        return next((i for i, o in self.objs.items() if o.cell == cell), None)

    def advance(self, cmd: Command, rule: str | None) -> "Dialogue":
        """The dialogue after one more turn (`cmd` resolved, `rule` the rule after it)."""
        objs, focus = dict(self.objs), None
        first, last, tainted = self.first_added[-1], self.last_added[-1], self.tainted[-1]
        tone, touched, next_id = self.tone_now, set(), self.next_id
        if cmd.op == "undo":
            index = cmd.restore if cmd.restore is not None else len(self.scenes) - 2
            objs, tone = dict(self.scenes[index]), self.tones[index]
            first, last, tainted = self.first_added[index], self.last_added[index], self.tainted[index]
            for k in range(index + 1, len(self.scenes)):
                touched |= self.touched[k - 1]
        elif cmd.op == "subject_add":
            objs[next_id] = Obj(cmd.shape, cmd.color, cmd.size, cmd.cell)
            focus, last, first = next_id, next_id, first if first is not None else next_id
            next_id += 1
        elif cmd.op == "background_change":
            tone = cmd.tone
        elif cmd.op == "count_change":
            group = sorted((i for i, o in objs.items() if o.desc == cmd.target), key=lambda i: objs[i].cell)
            free = self.scene().free_cells
            added = []
            for cell in free[: max(0, cmd.count - len(group))]:
                objs[next_id] = Obj(cmd.target.shape, cmd.target.color, cmd.target.size, cell)
                added.append(next_id)
                next_id += 1
            for i in group[cmd.count:]:
                del objs[i]
            tainted = tainted | set(group) | set(added)
            touched = set(group)
        else:
            (i,) = [i for i, o in objs.items() if o.desc == cmd.target]
            old = objs.pop(i)
            touched = {i}
            if cmd.op == "subject_replace":
                objs[next_id] = Obj(cmd.shape, cmd.color, old.size, old.cell)
                focus, next_id = next_id, next_id + 1
            elif cmd.op != "subject_remove":
                if cmd.op == "position_change" and cmd.swap_with is not None:
                    j = next(j for j, o in objs.items() if o.cell == cmd.cell)
                    objs[j] = objs[j].replace(cell=old.cell)
                    touched.add(j)
                change = {"color_alter": {"color": cmd.color}, "size_change": {"size": cmd.size},
                          "position_change": {"cell": cmd.cell}}[cmd.op]
                objs[i] = old.replace(**change)
                focus = i
        return Dialogue(self.scenes + [objs], self.tones + [tone], self.background, self.commands + [cmd],
                        self.focus + [focus], self.first_added + [first], self.last_added + [last],
                        self.tainted + [frozenset(tainted)], self.rules + [rule], self.touched + [frozenset(touched)],
                        next_id)

    @property
    def tone_now(self) -> str:
        return self.tones[-1]


# ---------------------------------------------------------------------------------------------------------------------
# The oracle reader
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What `interpret` reads from one instruction.

    Args:
        command (`Command`): the resolved edit.
        rule (`str`, *optional*): the persistent rule's colour after this turn.
        rule_action (`str`, *optional*): "rule_set", "rule_change" or "rule_cancel" when the turn states one.
        family (`str`): the phrasing family of the edit's sentence frame (the first in `FAMILIES` order, when
            families share it; `frame_families` lists them all).
        template (`str`): that frame.
        reference (`str`): how the target was named: "explicit", "it", "last_added", "first_added", "first_edit",
            "other", "undo", "redo", "restore" or "none".
        notes (`tuple[str, ...]`): short reasoning notes: what each reference and place resolved to, which policy
            applied (occupied cell, named colour against the rule) and the rule in force (`reasoning` joins them).
    """

    command: Command
    rule: str | None
    rule_action: str | None
    family: str
    template: str
    reference: str
    notes: tuple[str, ...] = ()

    @property
    def reasoning(self) -> str:
        """The notes as one short trace, e.g. `'the red one' = the small red circle. Rule: purple.`"""
        return " ".join(self.notes)


class NotUnderstood(ValueError):
    """The words are not an instruction of the language, or do not resolve against the session."""


def _normal(text: str) -> str:
    return " ".join(text.replace("’", "'").split())


def _read_target(dlg: Dialogue, text: str, scene_objs: dict | None = None) -> tuple[int, str]:
    """The id an object expression names in the current scene (or in `scene_objs`), and how it was named."""
    text = text.strip().strip('"').lower()
    objs = dlg.objs if scene_objs is None else scene_objs
    if scene_objs is None and text in REF_BY_WORDS:
        key = REF_BY_WORDS[text]
        obj_id = dlg.reference(key)
        if obj_id is None:
            raise NotUnderstood(f"'{text}' does not point at an object that can be named.")
        return obj_id, key
    m = re.fullmatch(rf"the other ({_SHAPE_RE})", text)
    if scene_objs is None and m:
        obj_id = dlg.other(m.group(1))
        if obj_id is None:
            raise NotUnderstood(f"'{text}': there are not exactly two {PLURALS[m.group(1)]}, one of them 'it'.")
        return obj_id, "other"
    words = text.split()
    if words and words[0] == "the":
        words = words[1:]
    if not words:
        raise NotUnderstood("An empty object description.")
    shape = None if words[-1] == "one" else words[-1]
    size = next((SIZE_BY_WORD[w] for w in words[:-1] if w in SIZE_BY_WORD), None)
    color = next((w for w in words[:-1] if w in COLOR_NAMES), None)
    if shape is None and size is None and color is None:
        raise NotUnderstood(f"'{text}' names no attribute.")
    hits = [i for i, o in objs.items()
            if (shape is None or o.shape == shape) and (size is None or o.size == size)
            and (color is None or o.color == color)]
    if len(hits) != 1:
        raise NotUnderstood(f"'{text}' matches {len(hits)} objects (need exactly one).")
    return hits[0], "explicit"


def _beside(dlg: Dialogue, anchor: Obj) -> tuple[int, int] | None:
    """"beside X" / "next to X": the cell right of X if it is on the grid and free, else left of X if so."""
    taken = {o.cell for o in dlg.objs.values()}
    for dc in (1, -1):
        cell = (anchor.cell[0], anchor.cell[1] + dc)
        if 0 <= cell[1] < GRID and cell not in taken:
            return cell
    return None


def _read_where(dlg: Dialogue, text: str) -> tuple[int, int]:
    """The cell a place expression names (possibly occupied: the op's policy decides)."""
    text = text.lower()
    m = re.fullmatch(rf"(?:(?:at|in|on|to|into|onto) )?(?:the )?({_CELL_RE})", text)
    if m:
        return CELL_BY_WORDS[m.group(1)]
    m = re.fullmatch(rf"(?:to |in )?where ({_DESC_RE}) (?:used to be|was)", text)
    if m:
        if len(dlg.scenes) < 2:
            raise NotUnderstood("'where ... used to be' needs an earlier turn.")
        i, _ = _read_target(dlg, m.group(1), dlg.scenes[-2])
        cell = dlg.scenes[-2][i].cell
        if dlg.id_at(cell) is not None:
            raise NotUnderstood(f"the {CELL_NAMES[cell]}, where it used to be, is not free.")
        return cell
    m = re.fullmatch(rf"(?:beside|next to) ({_TARGET_RE})", text)
    if m:
        cell = _beside(dlg, dlg.objs[_read_target(dlg, m.group(1))[0]])
        if cell is None:
            raise NotUnderstood(f"'{text}': no free cell beside it.")
        return cell
    for direction, words in REL_WORDS.items():
        m = re.fullmatch(rf"(?:to )?(?:{_alt(words)}) ({_TARGET_RE})", text)
        if m:
            anchor = dlg.objs[_read_target(dlg, m.group(1))[0]]
            dr, dc = DIRECTIONS[direction]
            cell = (anchor.cell[0] + dr, anchor.cell[1] + dc)
            if not (0 <= cell[0] < GRID and 0 <= cell[1] < GRID):
                raise NotUnderstood(f"'{text}' is off the grid.")
            return cell
    raise NotUnderstood(f"Not a place: {text!r}.")


def _read_k(text: str) -> int:
    words = text.lower().split()
    if words[-1].isdigit():
        return int(words[-1])
    return ORDINALS.index(words[-2]) + 1


def _read_rule(dlg: Dialogue, text: str) -> tuple[str | None, str | None, str, str | None]:
    """(rule action, rule after, the rest of the text, the rule sentence's family)."""
    for fam, key, _, pattern in RULE_PATTERNS:
        m = pattern.match(text)
        if m is None or m.end() == 0:
            continue
        g = {k: v.lower() for k, v in m.groupdict().items() if v}
        old = dlg.rule
        if key == "rule_set":  # stated again while a rule is active: the new statement replaces it
            return key, g["c"], text[m.end():], fam
        if old is None or ("old" in g and g["old"] != old):
            continue
        if key == "rule_change":
            if g["c"] == old:
                continue
            return key, g["c"], text[m.end():], fam
        return key, None, text[m.end():], fam
    return None, dlg.rule, text, None


def _strip(text: str) -> str:
    text = OPENERS_RE.sub("", text.strip())
    for filler in FILLERS:
        if text.lower().rstrip(".!?").endswith(filler):
            text = text.rstrip(".!?")[: -len(filler)]
            break
    return text.strip().rstrip(".!?").strip()


def frame_families(dlg: Dialogue, text: str) -> tuple[set, str | None]:
    """The families whose edit frame fits the words (nothing resolved), and the family of its rule sentence (if any).

    A frame can be shared by families of the same split ("Delete {t}" is both `release` and `plain`); frames are never
    shared between the training and held-out families.
    """
    _, _, rest, rule_family = _read_rule(dlg, _normal(text))
    edit = _strip(rest)
    return {fam for fam, _, _, pattern in PATTERNS if pattern.fullmatch(edit)}, rule_family


def interpret(dlg: Dialogue, text: str) -> Reading:
    """Read one instruction of the language against the session so far (the oracle reader).

    Args:
        dlg (`Dialogue`): the session before this turn.
        text (`str`): the instruction.

    Returns:
        `Reading`: the resolved command and the rule after the turn.

    Raises:
        NotUnderstood: when the words are not an instruction of the language or do not resolve uniquely.
    """
    text = _normal(text)
    rule_action, rule, rest, _ = _read_rule(dlg, text)
    edit = _strip(rest)
    errors = []
    for fam, key, template, pattern in PATTERNS:
        m = pattern.fullmatch(edit)
        if m is None:
            continue
        try:
            cmd, reference = _resolve(dlg, key, {k: v for k, v in m.groupdict().items() if v is not None}, rule)
        except (NotUnderstood, KeyError, ValueError) as err:
            errors.append(f"{fam}/{template!r}: {err}")
            continue
        notes = _notes(dlg, m.groupdict(), cmd, reference, rule_action, rule)
        return Reading(cmd, rule, rule_action, fam, template, reference, notes)
    raise NotUnderstood(f"Cannot read {text!r}" + (f" ({'; '.join(errors)})" if errors else "") + ".")


def _notes(dlg: Dialogue, g: dict, cmd: Command, reference: str, rule_action: str | None,
           rule: str | None) -> tuple[str, ...]:
    """What a reader has to work out for this turn, in short sentences (see `Reading.notes`)."""
    notes = []
    if rule_action == "rule_set":
        notes.append(f"New rule: {rule}.")
    elif rule_action == "rule_change":
        notes.append(f"Rule changed: {dlg.rule} -> {rule}.")
    elif rule_action == "rule_cancel":
        notes.append(f"Rule cancelled ({dlg.rule}).")
    elif rule is not None:
        notes.append(f"Rule: {rule}.")
    if cmd.op == "undo":
        last = len(dlg.commands)
        if cmd.restore is None:
            notes.append(f"Undo turn {last}.")
        elif reference == "redo":
            notes.append(f"Undo the undo of turn {last}: back to after turn {cmd.restore}.")
        else:
            notes.append(f"Back to after turn {cmd.restore}." if cmd.restore else "Back to the original image.")
        return tuple(notes)
    words = (g.get("t") or "").strip('"').lower()
    if words and (reference != "explicit" or words.removeprefix("the ") != cmd.target.phrase):
        notes.append(f"'{words}' = the {cmd.target.phrase}.")
    place = (g.get("where") or "").lower()
    if cmd.op == "subject_add" and cmd.requested_cell is not None:
        notes.append(f"'{place}' = the {CELL_NAMES[cmd.requested_cell]}, taken: nearest free cell "
                     f"{CELL_NAMES[cmd.cell]}.")
    elif place and not re.fullmatch(rf"(?:(?:at|in|on|to|into|onto) )?(?:the )?{CELL_NAMES[cmd.cell]}", place):
        notes.append(f"'{place}' = the {CELL_NAMES[cmd.cell]}.")
    if cmd.swap_with is not None:
        notes.append(f"The {CELL_NAMES[cmd.cell]} holds the {cmd.swap_with.phrase}: they swap.")
    if cmd.color_from_rule:
        notes.append(f"New {cmd.shape}: {cmd.color} (rule).")
    if cmd.overrides_rule:
        notes.append(f"Named {cmd.color} overrides the {rule} rule.")
    if not notes or notes == [f"Rule: {rule}."]:
        notes.append("Explicit.")
    return tuple(notes)


def _new_object(text: str) -> tuple[str | None, str | None, str]:
    words = text.lower().split()
    if words[0] in ("a", "an"):
        words = words[1:]
    size = next((SIZE_BY_WORD[w] for w in words[:-1] if w in SIZE_BY_WORD), None)
    color = next((w for w in words[:-1] if w in COLOR_NAMES), None)
    return size, color, words[-1]


def _colour(said: str | None, rule: str | None, keep: str | None) -> dict:
    """The new colour: named words win (over a rule: `overrides_rule`), else the rule's, else `keep`."""
    if said is not None:
        return {"color": said, "overrides_rule": rule is not None and said != rule}
    if rule is not None:
        return {"color": rule, "color_from_rule": True}
    if keep is None:
        raise NotUnderstood("an added object needs a colour when no rule is active.")
    return {"color": keep}


def _resolve(dlg: Dialogue, key: str, g: dict, rule: str | None) -> tuple[Command, str]:
    scene = dlg.scene()
    if key in ("undo", "redo", "restore", "restore_source"):
        if not dlg.commands:
            raise NotUnderstood("nothing to undo at the first turn.")
        last = dlg.commands[-1]
        if key == "restore_source":
            cmd, ref = Command("undo", restore=0), "restore"
        elif key == "restore":
            k = _read_k(g["k"])
            if not 0 < k < len(dlg.commands):
                raise NotUnderstood(f"turn {k} is not an earlier turn.")
            cmd, ref = Command("undo", restore=k), "restore"
        elif key == "redo" or last.op == "undo":  # undoing an undo restores the scene before it
            if last.op != "undo":
                raise NotUnderstood("the last turn was not an undo.")
            cmd, ref = Command("undo", restore=len(dlg.commands) - 1), "redo"
        else:
            cmd, ref = Command("undo", previous=last), "undo"
        return cmd, ref
    if key == "background_change":
        return Command(key, tone=g["tone"].lower()), "none"
    if key == "count_change":
        words = g["group"].lower().split()
        words = words[1:] if words[0] == "the" else words
        shape = {p: s for s, p in PLURALS.items()}.get(words[2], words[2])
        count = int(g["n"]) if "n" in g else {w: n for n, w in NUMBER_WORDS.items()}[g["nw"].lower()]
        cmd = Command(key, Desc(SIZE_BY_WORD[words[0]], words[1], shape), count=count)
    elif key == "subject_add":
        size, color, shape = _new_object(g["new"])
        if size is None:
            raise NotUnderstood("an added object needs a size.")
        requested = _read_where(dlg, g["where"])
        cell = requested if scene.at(requested) is None else nearest_free_cell(scene, requested)
        if cell is None:
            raise NotUnderstood("no free cell.")
        cmd = Command(key, shape=shape, size=size, cell=cell, **_colour(color, rule, None),
                      requested_cell=None if cell == requested else requested)
        return _checked(scene, cmd), "none"
    else:
        obj_id, ref = _read_target(dlg, g["t"])
        if not dlg.nameable(obj_id):
            raise NotUnderstood("the object has no unique description.")
        old = dlg.objs[obj_id]
        if key == "subject_remove":
            cmd = Command(key, old.desc)
        elif key == "subject_replace":
            size, color, shape = _new_object(g["new"])
            if size not in (None, old.size) or shape == old.shape:
                raise NotUnderstood("a replacement keeps the size and changes the shape.")
            cmd = Command(key, old.desc, shape=shape, **_colour(color, rule, old.color))
        elif key == "color_alter":
            c = g["color"].lower()
            cmd = Command(key, old.desc, color=c, overrides_rule=rule is not None and c != rule)
        elif key == "size_change":
            size = SIZE_BY_WORD[g["size"].lower()] if "size" in g else (
                "small" if g.get("cmp", "").lower() == "smaller" or g.get("verb", "").lower() == "shrink" else "large")
            cmd = Command(key, old.desc, size=size)
        else:
            cell = _read_where(dlg, g["where"])
            occupant = scene.at(cell)
            cmd = Command(key, old.desc, cell=cell, swap_with=None if occupant is None else occupant.desc)
        return _checked(scene, cmd), ref
    return _checked(scene, cmd), "none"


def _checked(scene: Scene, cmd: Command) -> Command:
    reason = check_command(scene, cmd)
    if reason is not None:
        raise NotUnderstood(reason)
    return cmd


# ---------------------------------------------------------------------------------------------------------------------
# Writing sessions
# ---------------------------------------------------------------------------------------------------------------------

UNDO_PROBABILITY = 0.15      # cu, turns >= 2, after an edit: undo it
REDO_PROBABILITY = 0.5       # cu, after an undo: undo the undo
RESTORE_PROBABILITY = 0.1    # cu, turns >= 3: go back to the state after an earlier turn
REFERENCE_PROBABILITY = 0.7  # cu: name the target by a reference when one applies
RULE_CHANGE_PROBABILITY, RULE_CANCEL_PROBABILITY, RULE_AGAIN_PROBABILITY = 0.12, 0.08, 0.15  # cm, turns >= 2
OVERRIDE_PROBABILITY = 0.2   # under a rule: name a colour anyway (it wins for that edit)
OCCUPIED_PROBABILITY = 0.2   # adds and moves: ask for an occupied cell (add: nearest free cell; move: swap)
RELATIVE_PROBABILITY = 0.5   # say a place relative to an object when one fits
QUOTE_PROBABILITY, FILLER_PROBABILITY, OPENER_PROBABILITY = 0.08, 0.12, 0.3


@dataclass
class _Plan:
    key: str
    cmd: Command
    target: int | None = None
    where: tuple[int, int] | None = None
    say_color: str | None = None
    say_size: bool = True


def _desc_options(objs: dict, obj_id: int) -> list[tuple[str | None, str | None, str]]:
    """(size, colour, shape-or-"one") word choices that pick out `obj_id` alone among `objs`."""
    o, out = objs[obj_id], []
    for size, color, shape in ((None, None, o.shape), (o.size, None, o.shape), (None, o.color, o.shape),
                               (o.size, o.color, o.shape), (o.size, None, "one"), (None, o.color, "one"),
                               (o.size, o.color, "one")):
        hits = [x for x in objs.values() if (shape == "one" or x.shape == shape) and size in (None, x.size)
                and color in (None, x.color)]
        if len(hits) == 1:
            out.append((size, color, shape))
    return out


def _say_desc(choice, style: dict, rng: random.Random) -> str:
    size, color, shape = choice
    words = [rng.choice(SIZE_WORDS[size])] if size else []
    words += [color] if color else []
    text = " ".join(words + [shape])
    if style["articles"] == "always" or (style["articles"] == "sometimes" and rng.random() < 0.5):
        text = "the " + text
    return text


def _say_target(dlg: Dialogue, obj_id: int, rng: random.Random, style: dict, prefer_ref: bool) -> tuple[str, str]:
    """Words naming `obj_id` (a reference when one applies and is preferred, else a unique description)."""
    refs = []
    for key, words in REFERENCE_WORDS.items():
        if dlg.reference(key) == obj_id:
            refs += [(w, key) for w in words]
    shape = dlg.objs[obj_id].shape
    if dlg.other(shape) == obj_id:
        refs.append((f"the other {shape}", "other"))
    if refs and (prefer_ref or rng.random() < 0.15):
        text, key = rng.choice(refs)
    else:
        text, key = _say_desc(rng.choice(_desc_options(dlg.objs, obj_id)), style, rng), "explicit"
    if key == "explicit" and rng.random() < QUOTE_PROBABILITY:
        text = f'"{text}"'
    return text, key


def _rel_words(direction: str, release: bool, op: str) -> tuple[str, ...]:
    """How a family says "left of" etc.: the release's "on the left of" / "to above of", or everyday words."""
    side = direction in ("left", "right")
    if release:
        if op == "subject_add":
            return (f"on the {direction} of",) if side else (f"{direction} of",)
        return (f"to the {direction} of",) if side else (f"to {direction} of",)
    if side:
        return (f"{direction} of", f"to the {direction} of")
    return ("above",) if direction == "above" else ("below", "under")


def _say_where(dlg: Dialogue, cell, rng: random.Random, style: dict, op: str, mover: int | None) -> str:
    """Words for a place: the cell's name, or relative to an object ("left of it", "where the X used to be")."""
    options = []
    for a_id, a in dlg.objs.items():
        if a_id == mover or not _desc_options(dlg.objs, a_id):
            continue
        for direction, (dr, dc) in DIRECTIONS.items():
            if (a.cell[0] + dr, a.cell[1] + dc) == cell:
                options.append(("rel", direction, a_id))
        if _beside(dlg, a) == cell:
            options.append(("beside", None, a_id))
    if len(dlg.scenes) >= 2 and dlg.id_at(cell) is None:
        for p_id, p in dlg.scenes[-2].items():
            if p.cell == cell and _desc_options(dlg.scenes[-2], p_id):
                options.append(("used", None, p_id))
    release = style is STYLE["release"]
    if options and rng.random() < RELATIVE_PROBABILITY:
        kind, direction, a_id = rng.choice(options)
        if kind == "used":
            desc = _say_desc(rng.choice(_desc_options(dlg.scenes[-2], a_id)), {"articles": "always"}, rng)
            lead = "to " if release and op != "subject_add" else ""
            return f"{lead}where {desc} {rng.choice(('used to be', 'was'))}"
        anchor, _ = _say_target(dlg, a_id, rng, style, prefer_ref=rng.random() < 0.5)
        if kind == "beside":
            return f"{rng.choice(('beside', 'next to'))} {anchor}"
        return f"{rng.choice(_rel_words(direction, release, op))} {anchor}"
    prep = rng.choice(("at ", "in ", "on ") if op == "subject_add" else ("to ",) if release else ("to ", "into "))
    the = "" if style["articles"] == "never" and style["lower"] else "the "
    if style is STYLE["shorthand"]:
        prep = ""
    return f"{prep}{the}{rng.choice(CELL_WORDS[cell])}"


def _unique_after(scene: Scene, desc: Desc, ignore: Obj | None = None) -> bool:
    return all(o.desc != desc for o in scene.objects if o is not ignore)


def _vacated(dlg: Dialogue) -> list[tuple[int, int]]:
    """Cells the last turn emptied ("where the triangle used to be")."""
    if len(dlg.scenes) < 2:
        return []
    taken = {o.cell for o in dlg.objs.values()}
    return sorted({o.cell for o in dlg.scenes[-2].values()} - taken)


def _pick_free(dlg: Dialogue, free: list, rng: random.Random):
    vacated = _vacated(dlg)
    return rng.choice(vacated if vacated and rng.random() < 0.5 else free)


def _plan_op(op: str, dlg: Dialogue, rng: random.Random, rule: str | None, candidates: list[int]) -> _Plan | None:
    scene = dlg.scene()
    free = scene.free_cells
    if op == "subject_add":
        if len(scene.objects) >= MAX_OBJECTS or not free:
            return None
        for _ in range(20):
            say = rng.choice(COLOR_NAMES) if rule is None or rng.random() < OVERRIDE_PROBABILITY else None
            desc = Desc(rng.choice(SIZES), say or rule, rng.choice(SHAPES))
            if not _unique_after(scene, desc):
                continue
            occupied = [o.cell for o in scene.objects]
            requested = rng.choice(occupied) if rng.random() < OCCUPIED_PROBABILITY else _pick_free(dlg, free, rng)
            cell = nearest_free_cell(scene, requested)
            cmd = Command(op, shape=desc.shape, color=desc.color, size=desc.size, cell=cell,
                          color_from_rule=say is None, overrides_rule=say is not None and rule not in (None, say),
                          requested_cell=None if cell == requested else requested)
            return _Plan(op, cmd, where=requested, say_color=say)
        return None
    if op == "background_change":
        tone = rng.choice([t for t in TONE_NAMES if t != scene.tone])
        return _Plan(op, Command(op, tone=tone))
    if op == "count_change":
        groups = sorted({o.desc for o in scene.objects})
        rng.shuffle(groups)
        for desc in groups:
            k = scene.count(desc)
            room = min(len(free), MAX_OBJECTS - len(scene.objects))
            counts = [n for n in range(1, 5)
                      if n != k and n - k <= room and (rule is None or n < k or desc.color == rule)]
            if counts:
                return _Plan(op, Command(op, desc, count=rng.choice(counts)))
        return None
    for i in candidates:
        old = dlg.objs[i]
        if op == "subject_remove" and len(scene.objects) > 1:
            return _Plan(op, Command(op, old.desc), target=i)
        if op == "subject_replace":
            for shape in rng.sample([s for s in SHAPES if s != old.shape], len(SHAPES) - 1):
                if rule is not None:
                    say = rng.choice(COLOR_NAMES) if rng.random() < OVERRIDE_PROBABILITY else None
                else:
                    say = rng.choice([None, rng.choice(COLOR_NAMES)])
                color = say or rule or old.color
                if _unique_after(scene, Desc(old.size, color, shape), ignore=old):
                    cmd = Command(op, old.desc, shape=shape, color=color,
                                  color_from_rule=say is None and rule is not None,
                                  overrides_rule=say is not None and rule not in (None, say))
                    return _Plan(op, cmd, target=i, say_color=say, say_size=rng.random() < 0.3)
        if op == "color_alter" and (rule is None or rng.random() < OVERRIDE_PROBABILITY):
            colors = [c for c in COLOR_NAMES if c != old.color and _unique_after(scene, old.desc._replace(color=c))]
            if colors:
                c = rng.choice(colors)
                return _Plan(op, Command(op, old.desc, color=c, overrides_rule=rule not in (None, c)), target=i)
        if op == "size_change":
            size = "large" if old.size == "small" else "small"
            if _unique_after(scene, old.desc._replace(size=size)):
                return _Plan(op, Command(op, old.desc, size=size), target=i)
        if op == "position_change":
            others = [o.cell for o in scene.objects if o.cell != old.cell]
            if free or others:
                cell = rng.choice(others) if (others and (rng.random() < OCCUPIED_PROBABILITY or not free)) else \
                    _pick_free(dlg, free, rng)
                occupant = scene.at(cell)
                cmd = Command(op, old.desc, cell=cell, swap_with=None if occupant is None else occupant.desc)
                return _Plan(op, cmd, target=i, where=cell)
    return None


def _weighted_order(rng: random.Random) -> list[str]:
    ops, out = list(OP_WEIGHTS), []
    while ops:
        pick = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
        ops.remove(pick)
        out.append(pick)
    return out


def _plan_edit(dlg: Dialogue, rng: random.Random, rule: str | None, prefer_ref: bool) -> tuple[_Plan, bool]:
    nameable = [i for i in dlg.objs if dlg.nameable(i)]
    rng.shuffle(nameable)
    refs = []
    if prefer_ref:
        refs = [dlg.reference(k) for k in REFERENCE_WORDS] + [dlg.other(o.shape) for o in dlg.objs.values()]
        refs = list(dict.fromkeys(i for i in refs if i is not None))
        rng.shuffle(refs)
    for candidates, by_ref in ((refs, True), (nameable, False)):
        if by_ref and not candidates:
            continue
        for op in _weighted_order(rng):
            if by_ref and op not in ("subject_remove", "subject_replace", "color_alter", "size_change",
                                     "position_change"):
                continue
            plan = _plan_op(op, dlg, rng, rule, candidates)
            if plan is not None:
                return plan, by_ref
    raise RuntimeError("No edit applies to this scene (cannot happen for scenes of 1-5 objects).")


def _plan_undo(dlg: Dialogue, rng: random.Random) -> _Plan | None:
    """An undo, undo of an undo, or restore of an earlier state, when one is drawn (cu, turns >= 2)."""
    last, t = dlg.commands[-1], dlg.turn
    if last.op == "undo":
        if rng.random() < REDO_PROBABILITY:
            return _Plan(rng.choice(("redo", "undo")), Command("undo", restore=len(dlg.commands) - 1))
        return None
    if rng.random() < UNDO_PROBABILITY:
        return _Plan("undo", Command("undo", previous=last))
    if t >= 3 and rng.random() < RESTORE_PROBABILITY:
        now = dlg.scene()
        choices = [n for n in range(0, t - 1) if dlg.scene(n) != now]
        if choices:
            n = rng.choice(choices)
            return _Plan("restore_source" if n == 0 else "restore", Command("undo", restore=n))
    return None


def _say_k(n: int, rng: random.Random) -> str:
    forms = [f"turn {n}", f"step {n}", f"edit {n}"]
    if n <= len(ORDINALS):
        forms.append(f"the {ORDINALS[n - 1]} {rng.choice(('edit', 'change', 'step', 'turn'))}")
    return rng.choice(forms)


def _realize(dlg: Dialogue, plan: _Plan, fam: str, rng: random.Random, prefer_ref: bool,
             rule_action: str | None, rule: str | None) -> str:
    style, cmd = STYLE[fam], plan.cmd
    scene = dlg.scene()
    slots = {}
    templates = list(FAMILIES[fam][plan.key])
    if plan.key == "background_change":
        keep = ", ".join(o.name for o in scene.objects)
        templates = [t for t in templates if "{keep}" not in t or keep]
        slots["keep"], slots["tone"] = keep, cmd.tone
    if plan.key == "count_change":
        templates = [t for t in templates if "{nw}" not in t or cmd.count in NUMBER_WORDS]
        slots.update(n=str(cmd.count), nw=NUMBER_WORDS.get(cmd.count, ""))
    template = rng.choice(templates)
    if plan.key == "count_change":  # "the count of small red circle", "the number of the small red circles"
        if "count of" in template or ("number of" not in template and cmd.count == 1):
            group = cmd.target.phrase
        else:
            group = cmd.target.plural
        the = "of {group}" in template and (style["articles"] == "always" or (
            style["articles"] == "sometimes" and rng.random() < 0.5))
        slots["group"] = ("the " if the else "") + group
    if "{t}" in template:
        slots["t"], _ = _say_target(dlg, plan.target, rng, style, prefer_ref)
    if "{new}" in template:
        size = cmd.size if plan.key == "subject_add" else (cmd.target.size if plan.say_size else None)
        words = " ".join(w for w in (rng.choice(SIZE_WORDS[size]) if size else None, plan.say_color, cmd.shape) if w)
        if style["articles"] == "always" or (style["articles"] == "sometimes" and rng.random() < 0.5):
            words = ("an " if words[0] in "aeiou" else "a ") + words
        slots["new"] = words
    if "{where}" in template:
        slots["where"] = _say_where(dlg, plan.where, rng, style, plan.key, plan.target)
    if plan.key == "color_alter":
        slots["color"] = cmd.color
    if plan.key == "size_change":
        slots.update(size=rng.choice(SIZE_WORDS[cmd.size]), cmp="bigger" if cmd.size == "large" else "smaller",
                     verb="enlarge" if cmd.size == "large" else "shrink")
    if plan.key == "restore":
        slots["k"] = _say_k(cmd.restore, rng)
    text = template.format(**slots)
    text = text.lower() if style["lower"] else text[0].upper() + text[1:]
    if style["fillers"] and not text.endswith("?") and rng.random() < FILLER_PROBABILITY:
        end = text[-1] if text[-1] in ".!" else ""
        text = text.rstrip(".!") + rng.choice(FILLERS) + end
    if style["openers"] and dlg.turn > 1 and not rule_action and not text.startswith("I") and \
            rng.random() < OPENER_PROBABILITY:
        text = rng.choice(style["openers"]) + text[0].lower() + text[1:]
    if rule_action:
        sentence = rng.choice(FAMILIES[fam][rule_action]).format(c=rule, old=dlg.rule)
        sentence = sentence.lower() if style["lower"] else sentence
        if action_join := (rule_action == "rule_cancel" and fam == "release"):
            text = "Then, " + text[0].lower() + text[1:]  # not "With this rule active" after a cancellation
        text = sentence + (" " if action_join else style["join"]) + text
    return text


def generate_natural_session(family: str, num_turns: int, seed: int, size: int, phrasing: str):
    """One session in everyday phrasing (see the module docstring); `sessions.generate_session` calls this."""
    from .sessions import ShapesSession
    from .world import random_scene

    fams = families_for(phrasing)
    rng = random.Random(f"mice-shapes/{phrasing}/{family}/{num_turns}/{seed}")
    scene0 = random_scene(rng, rng.randint(1, 4))
    dlg = Dialogue.start(scene0)
    texts, refs, used, actions = [], [], [], []
    for t in range(1, num_turns + 1):
        fam = rng.choice(fams)
        action, rule = None, dlg.rule
        if family == "cm":
            draw = rng.random()
            if t == 1:
                action, rule = "rule_set", rng.choice(COLOR_NAMES)
            elif dlg.rule is not None and draw < RULE_CHANGE_PROBABILITY:
                action, rule = "rule_change", rng.choice([c for c in COLOR_NAMES if c != dlg.rule])
            elif dlg.rule is not None and draw < RULE_CHANGE_PROBABILITY + RULE_CANCEL_PROBABILITY:
                action, rule = "rule_cancel", None
            elif dlg.rule is None and draw < RULE_AGAIN_PROBABILITY:
                action, rule = "rule_set", rng.choice(COLOR_NAMES)
        plan = _plan_undo(dlg, rng) if family == "cu" and t >= 2 else None
        prefer_ref = family == "cu" and rng.random() < REFERENCE_PROBABILITY
        if plan is None:
            plan, prefer_ref = _plan_edit(dlg, rng, rule, prefer_ref)
        reading, errors = None, []
        for attempt in range(40):
            text = _realize(dlg, plan, fam, rng, prefer_ref, action, rule)
            try:
                reading = interpret(dlg, text)
            except NotUnderstood as err:
                errors.append(str(err))
                continue
            if reading.command == plan.cmd and reading.rule == rule and fam in frame_families(dlg, text)[0]:
                break
            errors.append(f"{text!r} read as {reading}")
            reading = None
        if reading is None:
            raise RuntimeError(f"No phrasing of {plan.cmd} reads back: {errors[-3:]}")
        texts.append(text)
        refs.append(reading.reference)
        used.append(fam)
        actions.append(action)
        dlg = dlg.advance(reading.command, reading.rule)
    return _assemble(dlg, family, seed, size, phrasing, texts, refs, used, actions, ShapesSession)


def _assemble(dlg: Dialogue, family, seed, size, phrasing, texts, refs, used, actions, session_cls):
    scenes = [dlg.scene(i) for i in range(len(dlg.scenes))]
    source_ids = sorted(dlg.scenes[0], key=lambda i: dlg.scenes[0][i].cell)
    touched: set = set()
    unchanged, available, all_objects, intents = [], [], [], []
    seen = list(dict.fromkeys(o.name for o in scenes[0].objects))
    for t, cmd in enumerate(dlg.commands, start=1):
        touched |= dlg.touched[t - 1]
        unchanged.append([dlg.scenes[0][i].name for i in source_ids if i not in touched])
        available.append(list(dict.fromkeys(o.name for o in scenes[t].objects)))
        seen += [n for n in available[-1] if n not in seen]
        all_objects.append(list(seen))
        intent = canonical_intent(cmd, dlg.rules[t])
        if actions[t - 1] == "rule_cancel":
            intent += " The persistent color rule is cancelled."
        intents.append(intent)
    return session_cls(
        family=family, seed=seed, size=size, rule_color=next((r for r in dlg.rules if r is not None), None),
        scenes=scenes, instruction=texts, task_type=[c.op for c in dlg.commands],
        formatted_instruction=[formatted_instruction(c) for c in dlg.commands],
        bg_consistency=[s.tone == scenes[0].tone for s in scenes[1:]],
        unchanged_objects=unchanged, available_objects=available, all_objects=all_objects,
        gold_intent=intents, commands=list(dlg.commands), references=refs,
        phrasing=phrasing, phrasing_families=used, rules=list(dlg.rules[1:]))

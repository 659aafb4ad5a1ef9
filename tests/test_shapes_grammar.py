"""MICE-Shapes grammar: every edit op applies and validates; phrasings parse back exactly; canonical intents."""

import random

import pytest

from editr2.bench.shapes import Command, Desc, Literal, Obj, Scene, apply_command, canonical_intent, parse_instruction
from editr2.bench.shapes.grammar import (RULE_TEMPLATES, TASK_TYPES, TEMPLATES, check_command, formatted_instruction,
                                         realize, resolve_literal, split_color_rule)
from editr2.bench.shapes.world import CELL_NAMES, COLOR_NAMES, SHAPES, SIZES, TONE_NAMES

RED_CIRCLE = Obj("circle", "red", "small", (0, 0))
BLUE_SQUARE = Obj("square", "blue", "large", (1, 1))
SCENE = Scene((RED_CIRCLE, BLUE_SQUARE), background=3, tone="neutral")


@pytest.mark.parametrize(
    "cmd, expected",
    [
        (Command("subject_add", shape="triangle", color="green", size="large", cell=(2, 2)),
         {(0, 0): RED_CIRCLE, (1, 1): BLUE_SQUARE, (2, 2): Obj("triangle", "green", "large", (2, 2))}),
        (Command("subject_remove", RED_CIRCLE.desc), {(1, 1): BLUE_SQUARE}),
        (Command("subject_replace", RED_CIRCLE.desc, shape="diamond", color="yellow"),
         {(0, 0): Obj("diamond", "yellow", "small", (0, 0)), (1, 1): BLUE_SQUARE}),
        (Command("color_alter", BLUE_SQUARE.desc, color="purple"),
         {(0, 0): RED_CIRCLE, (1, 1): BLUE_SQUARE.replace(color="purple")}),
        (Command("size_change", RED_CIRCLE.desc, size="large"),
         {(0, 0): RED_CIRCLE.replace(size="large"), (1, 1): BLUE_SQUARE}),
        (Command("position_change", RED_CIRCLE.desc, cell=(2, 0)),
         {(2, 0): RED_CIRCLE.replace(cell=(2, 0)), (1, 1): BLUE_SQUARE}),
        (Command("count_change", RED_CIRCLE.desc, count=3),  # copies go to the first free cells
         {(0, 0): RED_CIRCLE, (0, 1): RED_CIRCLE.replace(cell=(0, 1)), (0, 2): RED_CIRCLE.replace(cell=(0, 2)),
          (1, 1): BLUE_SQUARE}),
    ],
)
def test_every_op_applies(cmd, expected):
    new = apply_command(SCENE, cmd)
    assert {o.cell: o for o in new.objects} == expected
    assert new.tone == SCENE.tone and new.background == SCENE.background
    assert SCENE.objects == (RED_CIRCLE, BLUE_SQUARE)  # pure: the input scene is unchanged


def test_background_change_and_undo_and_count_decrease():
    assert apply_command(SCENE, Command("background_change", tone="warm")).tone == "warm"
    previous = Scene((RED_CIRCLE,), 3)
    assert apply_command(SCENE, Command("undo"), previous_scene=previous) is previous
    with pytest.raises(ValueError, match="previous_scene"):
        apply_command(SCENE, Command("undo"))
    three = apply_command(SCENE, Command("count_change", RED_CIRCLE.desc, count=3))
    one = apply_command(three, Command("count_change", RED_CIRCLE.desc, count=1))
    assert one == SCENE  # the last copies in reading order go


@pytest.mark.parametrize(
    "cmd, reason",
    [
        (Command("subject_add", shape="circle", color="red", size="small", cell=(1, 1)), "occupied"),
        (Command("subject_remove", Desc("small", "green", "circle")), "0 objects match"),
        (Command("position_change", RED_CIRCLE.desc, cell=(1, 1)), "occupied"),
        (Command("background_change", tone="neutral"), "already has"),
        (Command("count_change", RED_CIRCLE.desc, count=1), "not a change"),
        (Command("count_change", Desc("large", "red", "cross"), count=2), "no large red cross"),
    ],
)
def test_invalid_ops_are_refused(cmd, reason):
    assert reason in check_command(SCENE, cmd)
    with pytest.raises(ValueError, match="Cannot apply"):
        apply_command(SCENE, cmd)


def test_scene_limits():
    full = Scene(tuple(Obj(s, c, "small", cell) for s, c, cell in
                       zip(SHAPES, COLOR_NAMES, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)])))
    assert "already has 5" in check_command(full, Command("subject_add", shape="circle", color="red", size="large",
                                                          cell=(2, 2)))
    single = Scene((RED_CIRCLE,))
    assert "last object" in check_command(single, Command("subject_remove", RED_CIRCLE.desc))


def _random_literal(rng):
    op = rng.choice([o for o in TASK_TYPES])
    desc = Desc(rng.choice(SIZES), rng.choice(COLOR_NAMES), rng.choice(SHAPES))
    target = rng.choice([desc, "it", "first_added", "first_edit"])
    cell = rng.choice(list(CELL_NAMES))
    if op == "subject_add":
        return Literal(op, shape=desc.shape, color=rng.choice([None, desc.color]), size=desc.size, cell=cell)
    if op == "subject_replace":
        return Literal(op, target, shape=rng.choice(SHAPES), color=rng.choice([None, rng.choice(COLOR_NAMES)]))
    if op == "color_alter":
        return Literal(op, target, color=rng.choice(COLOR_NAMES))
    if op == "size_change":
        return Literal(op, target, size=rng.choice(SIZES))
    if op == "position_change":
        return Literal(op, target, cell=cell)
    if op == "count_change":
        return Literal(op, desc, count=rng.randint(1, 4))
    if op == "background_change":
        return Literal(op, tone=rng.choice(TONE_NAMES))
    if op == "subject_remove":
        return Literal(op, target)
    return Literal("undo")


def test_every_phrasing_parses_back_exactly():
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        lit = _random_literal(rng)
        if rng.random() < 0.3:
            lit = Literal(**{**lit.__dict__, "rule_color": rng.choice(COLOR_NAMES)})
        text = realize(lit, rng, keep=["small red circle", "large blue square"], prefix=rng.random() < 0.5)
        assert parse_instruction(text) == lit, text
        seen.add((lit.op, text.split()[0].lower()))
    assert len({op for op, _ in seen}) == len(TASK_TYPES)
    assert sum(len(t) for t in TEMPLATES.values()) >= 3 * len(TASK_TYPES)  # several phrasings per op


def test_rule_split_and_unknown_text():
    text = RULE_TEMPLATES[0].format(c="blue") + " With this rule active, Remove the small red circle"
    assert split_color_rule(text) == ("blue", "Remove the small red circle")
    assert parse_instruction(text).rule_color == "blue"
    # Real MICE instructions (from ../shared/data/mice/cm_train.jsonl) are not in this grammar.
    for real in ["Replace plastic silver robot figurine with teapot", "Change the count of teapot to 3",
                 "Add text 'Summer 78' on the image"]:
        with pytest.raises(ValueError, match="Not a MICE-Shapes instruction"):
            parse_instruction(real)


def test_canonical_intent_and_formatted_instruction():
    add = Command("subject_add", shape="circle", color="blue", size="small", cell=(0, 0), color_from_rule=True)
    assert canonical_intent(add, "blue") == (
        "Add a small blue circle at the top left. Persistent rule: apply blue color only to the object being added "
        "or changed; nothing else changes color.")
    move = Command("position_change", Desc("large", "red", "square"), cell=(2, 0))
    undo = Command("undo", previous=move)
    assert canonical_intent(undo) == ("Undo the previous edit (move the large red square to the bottom left), "
                                      "restoring the image from before it.")
    assert formatted_instruction(move) == "Change the position of [large red square] to [bottom left]"
    assert formatted_instruction(Command("count_change", Desc("small", "red", "cross"), count=3)) == \
        "Change the count of [small red cross] to [3]"
    assert "small red crosses" in canonical_intent(Command("count_change", Desc("small", "red", "cross"), count=3))


def test_literal_resolution_ignores_references_and_rules():
    assert resolve_literal(parse_instruction("Make it bigger"), SCENE) is None
    assert resolve_literal(parse_instruction("Undo that"), SCENE) is None
    add = resolve_literal(parse_instruction("Add a small cross at the bottom right"), SCENE)
    assert add.color == "red" and not add.color_from_rule  # the literal default colour
    swap = resolve_literal(parse_instruction("Swap the small red circle for a square"), SCENE)
    assert swap.color == "red"  # replace keeps the colour the words leave out
    assert Command.from_json(swap.to_json()) == swap

"""MICE-Shapes sessions: valid, seeded, MICE fields consistent; the text-only reconstructor matches the gold intents."""

import json
from collections import Counter

import pytest

from editr2.bench.shapes import ShapesSession, apply_command, generate_session, parse_instruction
from editr2.bench.shapes.reconstruct import reconstruct
from editr2.bench.shapes.grammar import TASK_TYPES, check_command
from editr2.bench.shapes.world import MAX_OBJECTS

MICE_FIELDS = ("image", "instruction", "task_type", "formatted_instruction", "bg_consistency", "unchanged_objects",
               "available_objects", "all_objects", "turns")
PER_TURN = ("instruction", "task_type", "formatted_instruction", "bg_consistency", "unchanged_objects",
            "available_objects", "all_objects", "gold_intent", "gold_command", "references")


@pytest.fixture(scope="module")
def sessions():
    return {fam: [generate_session(fam, 1 + seed % 8, seed) for seed in range(150)] for fam in ("cm", "cu")}


def test_sessions_are_seeded_and_deterministic():
    a, b = generate_session("cu", 5, 11), generate_session("cu", 5, 11)
    assert a.to_json() == b.to_json()
    assert generate_session("cu", 5, 12).to_json() != a.to_json()
    assert generate_session("cm", 3, 11).to_json() != generate_session("cu", 3, 11).to_json()
    with pytest.raises(ValueError, match="num_turns"):
        generate_session("cm", 17, 0)
    with pytest.raises(ValueError, match="family"):
        generate_session("xx", 3, 0)


def test_mice_fields_are_consistent(sessions):
    for group in sessions.values():
        for s in group:
            record = json.loads(json.dumps(s.to_json()))  # JSON-serialisable
            assert all(k in record for k in MICE_FIELDS)
            assert list(record)[: len(MICE_FIELDS)] == list(MICE_FIELDS)  # the release's field order first
            T = record["turns"]
            assert all(len(record[k]) == T for k in PER_TURN), s.seed
            assert len(record["scenes"]) == T + 1
            assert set(record["task_type"]) <= set(TASK_TYPES)
            assert ShapesSession.from_json(record).to_json() == record
            for t in range(T):
                names = [o.name for o in s.scenes[t + 1].objects]
                assert set(record["available_objects"][t]) == set(names)
                assert set(record["unchanged_objects"][t]) <= set(names)
                assert set(record["available_objects"][t]) <= set(record["all_objects"][t])
                assert record["bg_consistency"][t] == (s.scenes[t + 1].tone == s.scenes[0].tone)
                for obj in s.unchanged_scene_objects(t + 1):  # untouched objects really are unchanged
                    assert s.scenes[t + 1].at(obj.cell) == obj


def test_sessions_are_valid(sessions):
    for group in sessions.values():
        for s in group:
            for t, cmd in enumerate(s.commands, start=1):
                before, after = s.scenes[t - 1], s.scenes[t]
                assert 1 <= len(after.objects) <= MAX_OBJECTS
                assert before != after  # every turn changes something
                if cmd.op == "undo":
                    assert after == s.scenes[t - 2] and t >= 2 and s.commands[t - 2].op != "undo"
                else:
                    assert check_command(before, cmd) is None and apply_command(before, cmd) == after
                assert parse_instruction(s.instruction[t - 1]).op == cmd.op


def test_cm_rule_is_stated_once_and_obeyed(sessions):
    for s in sessions["cm"]:
        rule = s.rule_color
        assert parse_instruction(s.instruction[0]).rule_color == rule
        assert all(parse_instruction(text).rule_color is None for text in s.instruction[1:])
        assert all(f"apply {rule} color only to the object being added" in g for g in s.gold_intent)
        for t, cmd in enumerate(s.commands, start=1):
            assert cmd.op != "color_alter"
            if cmd.op in ("subject_add", "subject_replace"):
                assert cmd.color == rule and cmd.color_from_rule
                assert parse_instruction(s.instruction[t - 1]).color is None  # the words leave it to the rule


def test_cu_sessions_refer_back(sessions):
    refs = Counter(r for s in sessions["cu"] for r in s.references[1:])
    assert refs["it"] > 20 and refs["first_added"] > 5 and refs["first_edit"] > 5 and refs["undo"] > 10
    for s in sessions["cu"]:
        for text, ref in zip(s.instruction, s.references):
            lit = parse_instruction(text)
            if ref in ("it", "first_added", "first_edit"):
                assert lit.target == ref


def test_reconstruct_matches_gold(sessions):
    matched = total = 0
    for group in sessions.values():
        for s in group:
            for t in range(s.num_turns):
                reasoning, intent = reconstruct(s.instruction[:t], s.instruction[t])
                total += 1
                matched += intent == s.gold_intent[t]
                assert reasoning
    assert total > 800 and matched / total >= 0.99


def test_reconstruct_reasoning_names_the_referent():
    history = ["Add a small blue circle at the top left"]
    reasoning, intent = reconstruct(history, "Now make it bigger")
    assert intent == "Change the size of the small blue circle to large."
    assert "small blue circle" in reasoning and "turn 1" in reasoning
    reasoning, intent = reconstruct(history + ["Now make it bigger"], "Undo that")
    assert intent.startswith("Undo the previous edit (change the size of the small blue circle to large)")
    with pytest.raises(ValueError):
        reconstruct([], "Replace plastic silver robot figurine with teapot")

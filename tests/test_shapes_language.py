"""MICE-Shapes everyday phrasing: the oracle reader reads every generated instruction back to its gold edit; references
resolve uniquely by current attributes; occupied cells, rule conflicts, undo of undo and restores follow the
documented policies; held-out phrasing families never reach the training sampler; the grammar's sessions are
unchanged."""

import hashlib
import json
from collections import Counter

import pytest

from editr2.bench.shapes import sessions as sessions_module
from editr2.bench.shapes import Desc, Obj, Scene, apply_command, generate_session
from editr2.bench.shapes.grammar import TASK_TYPES, canonical_intent, check_command
from editr2.bench.shapes.language import (FAMILIES, PATTERNS, RULE_PATTERNS, SEEN_FAMILIES, UNSEEN_FAMILIES,
                                          Dialogue, NotUnderstood, _read_rule, _strip, families_for, frame_families,
                                          interpret)
from editr2.bench.shapes.world import MAX_OBJECTS

EDIT_OPS = [op for op in TASK_TYPES if op != "undo"]


def _sweep(phrasing, seeds=range(60), turns=None):
    return [generate_session(family, turns or 1 + seed % 8, seed, phrasing=phrasing)
            for family in ("cm", "cu") for seed in seeds]


@pytest.fixture(scope="module")
def everyday():
    return {phrasing: _sweep(phrasing) for phrasing in ("seen", "unseen", "all")}


def _read_back(session):
    """Replay a session through the oracle reader: every turn's words give its gold command, rule and scene."""
    dlg = Dialogue.start(session.scenes[0])
    for t, text in enumerate(session.instruction, start=1):
        reading = interpret(dlg, text)
        cmd = session.commands[t - 1]
        assert reading.command == cmd, (session.seed, t, text)
        assert reading.rule == session.rules[t - 1], (session.seed, t, text)
        assert session.phrasing_families[t - 1] in frame_families(dlg, text)[0]
        assert reading.reference == session.references[t - 1]
        before = session.scenes[t - 1]
        if cmd.op != "undo":
            assert check_command(before, cmd) is None
        gold = apply_command(before, cmd, session.scenes[t - 2] if t >= 2 else None, history=session.scenes[:t])
        assert gold == session.scenes[t], (session.seed, t, text)
        intent = canonical_intent(cmd, reading.rule)
        assert session.gold_intent[t - 1].startswith(intent)
        dlg = dlg.advance(reading.command, reading.rule)
        assert dlg.scene() == session.scenes[t]


def test_every_instruction_reads_back_to_its_gold_edit(everyday):
    for group in everyday.values():
        for session in group:
            _read_back(session)


def test_sessions_stay_coherent_for_16_turns(monkeypatch):
    monkeypatch.setattr(sessions_module, "MAX_TURNS", 16)
    for session in _sweep("all", seeds=range(25), turns=16):
        assert session.num_turns == 16
        _read_back(session)
        for t in range(1, 17):
            assert 1 <= len(session.scenes[t].objects) <= MAX_OBJECTS
            assert session.scenes[t] != session.scenes[t - 1]  # every turn changes something


def test_sessions_are_deterministic_and_round_trip():
    a = generate_session("cu", 6, 4, phrasing="unseen")
    assert a.to_json() == generate_session("cu", 6, 4, phrasing="unseen").to_json()
    assert a.to_json() != generate_session("cu", 6, 4, phrasing="seen").to_json()
    record = json.loads(json.dumps(a.to_json()))
    assert type(a).from_json(record).to_json() == record
    assert record["phrasing"] == "unseen" and len(record["phrasing_families"]) == 6
    with pytest.raises(ValueError, match="phrasing"):
        generate_session("cu", 2, 0, phrasing="everyday")


def test_the_grammar_sessions_are_unchanged():
    """The default phrasing writes exactly the sessions every recorded number was measured on."""
    sessions = [generate_session(f, 1 + s % 8, s).to_json() for f in ("cm", "cu") for s in range(100)]
    assert all("phrasing" not in s for s in sessions)
    digest = hashlib.sha1(json.dumps(sessions).encode()).hexdigest()
    assert digest == "e6eec0945793592d6dfc479f1b20dc2350334daf"


def test_the_language_covers_every_form(everyday):
    seen = Counter()
    for group in everyday.values():
        for s in group:
            seen.update(s.references)
            seen.update(s.task_type)
            seen.update(f"family:{f}" for f in s.phrasing_families)
            for cmd in s.commands:
                seen.update(k for k in ("requested_cell", "swap_with", "restore") if getattr(cmd, k) is not None)
                seen.update(["overrides_rule"] if cmd.overrides_rule else [])
            seen.update(g.split(". ")[-1] for g in s.gold_intent if "cancelled" in g)
    for key in ("it", "last_added", "first_added", "first_edit", "other", "undo", "redo", "restore", "explicit",
                "requested_cell", "swap_with", "restore", "overrides_rule", "The persistent color rule is cancelled.",
                *TASK_TYPES, *(f"family:{f}" for f in FAMILIES)):
        assert seen[key] > 0, key
    text = " ".join(t.lower() for group in everyday.values() for s in group for t in s.instruction)
    for words in ("used to be", "left of", "beside", '"', "there", "their", "recolour", "get rid of", "corner",
                  "turn", "into", "the other", "after the"):
        assert words in text, words


def test_at_least_eight_phrasings_per_operation():
    for op in EDIT_OPS:
        assert sum(len(FAMILIES[f][op]) for f in FAMILIES) >= 8, op
        assert sum(len(FAMILIES[f][op]) for f in SEEN_FAMILIES) >= 7, op
    undo_forms = ("undo", "redo", "restore", "restore_source")
    assert sum(len(FAMILIES[f][k]) for f in FAMILIES for k in undo_forms) >= 8
    for key in ("rule_set", "rule_change", "rule_cancel"):
        assert sum(len(FAMILIES[f][key]) for f in FAMILIES) >= 6


@pytest.mark.slow
def test_held_out_families_never_reach_the_training_sampler():
    """Sessions drawn for training ("seen") never use a held-out frame or rule sentence, and held-out sessions use
    no training frame (so "unseen" really is unseen)."""
    assert not set(SEEN_FAMILIES) & set(UNSEEN_FAMILIES)
    assert set(SEEN_FAMILIES) | set(UNSEEN_FAMILIES) == set(FAMILIES)
    assert families_for("seen") == SEEN_FAMILIES and families_for("unseen") == UNSEEN_FAMILIES
    for phrasing, allowed in (("seen", SEEN_FAMILIES), ("unseen", UNSEEN_FAMILIES)):
        for session in _sweep(phrasing, seeds=range(150)):
            dlg = Dialogue.start(session.scenes[0])
            for t, text in enumerate(session.instruction, start=1):
                families, rule_family = frame_families(dlg, text)
                assert families and families <= set(allowed), (phrasing, text, families)
                assert rule_family is None or rule_family in allowed, (phrasing, text)
                dlg = dlg.advance(session.commands[t - 1], session.rules[t - 1])


def _held_out_match(text):
    """The held-out families whose edit frame or rule sentence the words fit (without resolving anything)."""
    text = " ".join(text.split())
    hits = {fam for fam, _, _, pattern in RULE_PATTERNS if fam in UNSEEN_FAMILIES and pattern.match(text)}
    for fam, _, _, pattern in RULE_PATTERNS:
        m = pattern.match(text)
        if m and m.end():
            text = text[m.end():]
            break
    edit = _strip(text)
    return hits | {fam for fam, _, _, pattern in PATTERNS if fam in UNSEEN_FAMILIES and pattern.fullmatch(edit)}


def test_the_training_samplers_draw_no_held_out_phrasing():
    """The training paths (the reasoner's `draw_example` in the grammar and in `phrasing: seen`, its tokenizer corpus,
    the editor's `draw_turn`, the RL dataset) never write a held-out family's frame or rule sentence."""
    import random

    from recipes.shapes_tiny.train_editor import EditorConfig, draw_turn
    from recipes.shapes_tiny.train_reasoner import ReasonerConfig, draw_example
    from trl_editr2.data import ShapesSessionDataset

    rng, cfg = random.Random(0), ReasonerConfig()
    for _ in range(150):
        session, _ = draw_example(rng, cfg)
        for text in session.instruction:
            assert not _held_out_match(text), text
    # the everyday-phrasing reasoner (reasoner_v2.yaml): seen families (and some grammar) only, tokenizer included
    rng, cfg, drawn = random.Random(0), ReasonerConfig(phrasing="seen", grammar_fraction=0.3), set()
    for _ in range(150):
        session, _ = draw_example(rng, cfg)
        drawn.add(session.phrasing)
        assert set(session.phrasing_families) <= set(SEEN_FAMILIES)
        for text in session.instruction:
            assert not _held_out_match(text), text
    assert drawn == {"seen", "grammar"}
    from recipes.shapes_tiny.common import tokenizer_corpus

    for line in tokenizer_corpus(60, phrasing="seen"):
        assert not _held_out_match(line), line
    with pytest.raises(ValueError, match="phrasing"):
        ReasonerConfig(phrasing="unseen")
    rng, cfg = random.Random(0), EditorConfig()
    for _ in range(100):
        assert not _held_out_match(draw_turn(rng, cfg)[2])
    dataset = ShapesSessionDataset(20, family="mixed", num_turns=4)
    for i in range(len(dataset)):
        for text in dataset[i]["instruction"]:
            assert not _held_out_match(text), text
    for session in _sweep("unseen", seeds=range(20)):  # the check does see held-out words
        assert all(_held_out_match(text) for text in session.instruction)


# ---------------------------------------------------------------------------------------------------------------------
# Policies, one by one
# ---------------------------------------------------------------------------------------------------------------------

RED_CIRCLE = Obj("circle", "red", "small", (0, 0))
BLUE_SQUARE = Obj("square", "blue", "large", (0, 1))
GREEN_SQUARE = Obj("square", "green", "small", (2, 2))


def _dialogue(*objects):
    return Dialogue.start(Scene(objects or (RED_CIRCLE, BLUE_SQUARE, GREEN_SQUARE), 5, "neutral"))


def _do(dlg, text):
    reading = interpret(dlg, text)
    return dlg.advance(reading.command, reading.rule), reading


def test_attributes_are_tracked_and_stale_descriptions_refused():
    dlg, _ = _do(_dialogue(), "Make the red circle yellow.")
    with pytest.raises(NotUnderstood):
        interpret(dlg, "Remove the red circle.")  # stale: it is yellow now
    for words in ("Remove the yellow circle.", "remove it", "Remove that one.", 'Get rid of "the yellow one".',
                  "Remove the circle, everything else stays there.", "Delete the circle and keep the others in "
                                                                     "their places."):
        reading = interpret(dlg, words)
        assert reading.command.target == Desc("small", "yellow", "circle"), words
    dlg, reading = _do(dlg, "make it bigger")
    assert reading.command.target == Desc("small", "yellow", "circle") and reading.reference == "it"
    assert interpret(dlg, "Remove the big yellow circle.").command.target == Desc("large", "yellow", "circle")


def test_references_resolve_uniquely():
    dlg = _dialogue()
    with pytest.raises(NotUnderstood, match="matches 2"):
        interpret(dlg, "Remove the square.")  # two squares: ambiguous
    with pytest.raises(NotUnderstood):
        interpret(dlg, "Remove it.")  # nothing said yet
    dlg, _ = _do(dlg, "Make the big square red.")
    assert interpret(dlg, "Remove the other square.").command.target == GREEN_SQUARE.desc
    dlg, _ = _do(dlg, "Add a small purple cross at the center.")
    dlg, _ = _do(dlg, "Put a big orange diamond in the bottom left corner.")
    assert interpret(dlg, "Remove the one you just added.").command.target == Desc("large", "orange", "diamond")
    assert interpret(dlg, "Remove the earliest one.").command.target == Desc("small", "purple", "cross")
    assert interpret(dlg, "Remove the shape from the first edit.").command.target == Desc("large", "red", "square")


def test_relative_places():
    dlg = _dialogue()
    assert interpret(dlg, "Add a small blue cross below the red circle.").command.cell == (1, 0)
    assert interpret(dlg, "Add a small blue cross left of the green one.").command.cell == (2, 1)
    assert interpret(dlg, "Add a small blue cross beside the big square.").command.cell == (0, 2)  # right is free
    dlg, _ = _do(dlg, "Move the green square to the center.")
    assert interpret(dlg, "Add a small blue cross where the green square used to be.").command.cell == (2, 2)
    assert interpret(dlg, "Move the circle above it.").command.cell == (0, 1)  # occupied: a swap (below)


def test_occupied_cells_swap_on_move_and_take_the_nearest_free_cell_on_add():
    dlg = _dialogue()
    reading = interpret(dlg, "Move the red circle to the top center.")
    assert reading.command.swap_with == BLUE_SQUARE.desc
    assert "swapping it with the large blue square there" in canonical_intent(reading.command)
    scene = apply_command(dlg.scene(), reading.command)
    assert scene.at((0, 1)).shape == "circle" and scene.at((0, 0)) == BLUE_SQUARE.replace(cell=(0, 0))
    reading = interpret(dlg, "Add a small yellow cross in the top-left corner.")
    assert reading.command.requested_cell == (0, 0) and reading.command.cell == (1, 0)  # nearest free, reading order
    assert canonical_intent(reading.command).startswith(
        "Add a small yellow cross at the middle left, the nearest free cell to the occupied top left")


def test_rules_stated_changed_cancelled_and_overridden():
    dlg, reading = _do(_dialogue(), "Keep using purple for new things. Add a small cross at the center.")
    assert reading.rule_action == "rule_set" and reading.rule == "purple"
    assert reading.command.color == "purple" and reading.command.color_from_rule
    reading = interpret(dlg, "Add a small red cross at the center.")  # named colour wins for this object
    assert reading.command.color == "red" and reading.command.overrides_rule and reading.rule == "purple"
    assert "the named color red overrides the purple rule for this object. Persistent rule: apply purple" in \
        canonical_intent(reading.command, reading.rule)
    restated = interpret(dlg, "New shapes should be orange from now on. Add a small cross at the center.")
    assert restated.rule == "orange" and restated.command.color == "orange"  # a new statement replaces the rule
    dlg, reading = _do(dlg, "switch new stuff to green, add a big triangle at the bottom center")
    assert reading.rule_action == "rule_change" and reading.rule == "green" and reading.command.color == "green"
    dlg, reading = _do(dlg, "Forget the colour rule. Turn the red circle into an orange triangle.")
    assert reading.rule_action == "rule_cancel" and reading.rule is None and not reading.command.overrides_rule
    assert reading.command.color == "orange"
    reading = interpret(dlg, "Turn the orange triangle into a diamond.")  # no rule, no colour named: it keeps its own
    assert reading.command.color == "orange" and not reading.command.color_from_rule
    with pytest.raises(NotUnderstood, match="needs a colour"):
        interpret(_dialogue(), "Add a big triangle at the middle left.")  # no rule: an added object needs a colour


def test_undo_undo_of_undo_and_restore():
    dlg = _dialogue()
    dlg, _ = _do(dlg, "Remove the red circle.")
    dlg, _ = _do(dlg, "Make the big square yellow.")
    after_two = dlg.scene()
    dlg, reading = _do(dlg, "scratch that")
    assert reading.command.previous.op == "color_alter" and dlg.scene() == dlg.scene(1)
    dlg, reading = _do(dlg, "Undo the undo.")
    assert reading.command.restore == 2 and dlg.scene() == after_two
    assert canonical_intent(reading.command) == "Restore the image from before turn 3."
    dlg, _ = _do(dlg, "Shrink the yellow square.")
    for words in ("Go back to how it was after the second edit.", "back to how it was after turn 2",
                  "I liked it best after step 2, go back there."):
        reading = interpret(dlg, words)
        assert reading.command.restore == 2 and reading.reference == "restore"
        assert apply_command(dlg.scene(), reading.command, history=[dlg.scene(i) for i in range(5)]) == after_two
    assert interpret(dlg, "start over").command.restore == 0
    with pytest.raises(NotUnderstood):
        interpret(dlg, "Go back to how it was after the ninth edit.")


@pytest.mark.slow
def test_bench_shapes_phrasing_is_recorded(tmp_path, capsys):
    import argparse

    from editr2.bench import shapes_cli

    def run(*argv):
        parser = argparse.ArgumentParser()
        shapes_cli.add_arguments(parser)
        return shapes_cli.run(parser.parse_args([*argv, "--no-progress"]))

    out = tmp_path / "unseen"
    assert run("--editor", "oracle", "--family", "cu", "--sessions", "2", "--turns", "4", "--phrasing", "unseen",
               "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["phrasing"] == "unseen" and results["mean"]["IF"] == 1.0
    assert json.loads((out / "bench_config.json").read_text())["phrasing"] == "unseen"
    assert "phrasing: `unseen`" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="phrasing"):  # another phrasing into the same folder is refused
        run("--editor", "oracle", "--family", "cu", "--sessions", "2", "--turns", "4", "--phrasing", "seen",
            "--out", str(out))
    plain = tmp_path / "grammar"
    assert run("--editor", "oracle", "--sessions", "1", "--out", str(plain)) == 0
    assert "phrasing" not in json.loads((plain / "bench_config.json").read_text())
    assert "phrasing" not in json.loads((plain / "results.json").read_text())["config"]


def test_readings_carry_short_reasoning_notes():
    dlg, reading = _do(_dialogue(), "Keep using purple for new things. Add a small cross left of the big square.")
    assert reading.reasoning == ("New rule: purple. 'left of the big square' = the top left, taken: nearest free cell "
                                 "middle left. New cross: purple (rule).")
    dlg, reading = _do(dlg, "Make it bigger.")
    assert reading.reasoning == "Rule: purple. 'it' = the small purple cross."
    dlg, reading = _do(dlg, "Move the small red circle to the top center.")
    assert reading.notes[-1] == "The top center holds the large blue square: they swap."
    dlg, reading = _do(dlg, "undo")
    assert reading.reasoning == "Rule: purple. Undo turn 3."
    assert interpret(dlg, "Remove the small red circle.").reasoning == "Rule: purple. Explicit."

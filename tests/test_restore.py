"""Exact undo: intents that name an earlier session state, restored without running the editor."""

import json

import pytest
import torch

from editr2.intent import Intent, parse_answer, parse_restore
from editr2.session import Session, Turn

pytestmark = pytest.mark.numerics


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, num_turns, expected",
    [
        ("Restore the image from before turn 3.", 4, 2),
        ("Restore the image from before turn [2]", 4, 1),
        ("Restore the image from before turn 1. Persistent rule: apply red color only to ...", 2, 0),
        ("go back to the image after turn 2", 3, 2),
        ("Return to the state after turn 3.", 3, 3),
        ("Go back to the image after the second turn", 3, None),  # not an accepted form: an ordinary edit
        ("Go back to the image after turn two", 3, 2),
        ("Restore the original image.", 2, 0),
        ("Undo the last edit.", 3, 2),
        ("Undo the previous edit (move the small red square to the bottom left), restoring the image from before it.",
         2, 1),
        ("Undo the last edit.", 0, None),  # nothing to undo at the first turn
        ("Restore the image from before turn 9.", 3, None),  # a state that does not exist
        ("Make the small red square blue.", 3, None),
    ],
)
def test_parse_restore(text, num_turns, expected):
    assert parse_restore(text, num_turns) == expected


def test_parse_restore_refuses_bad_input():
    with pytest.raises(ValueError, match="num_turns"):
        parse_restore("Undo the last edit.", -1)
    with pytest.raises(TypeError, match="text"):
        parse_restore(None, 1)


def test_parse_answer_carries_the_restore():
    answer = "<think>Undo turn 2.</think>Undo the last edit."
    assert parse_answer(answer, "undo that", num_turns=2) == Intent("Undo the last edit.", "Undo turn 2.", None, 1)
    assert parse_answer(answer, "undo that").restore is None  # no session given: no restore read
    assert parse_answer("no tags", "undo that", num_turns=2).restore is None  # a fallback is the raw instruction


def test_shapes_gold_intents_parse_to_the_gold_restore():
    from editr2.bench.shapes.grammar import Command, Desc, canonical_intent

    for k in range(4):
        assert parse_restore(canonical_intent(Command("undo", restore=k), rule_color="red"), 4) == k
    moved = Command("position_change", Desc("small", "red", "square"), cell=(2, 0))
    plain_undo = canonical_intent(Command("undo", previous=moved))
    assert plain_undo.startswith("Undo the previous edit (move the small red square")
    assert parse_restore(plain_undo, 3) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------------------------


def _session():
    from diffusers_editr2.testing import tiny_image

    source = tiny_image(0)
    turns = [Turn(f"edit {k}", tiny_image(k), f"edit {k}", latents=torch.randn(1, 4, 8)) for k in (1, 2, 3)]
    return Session(source, turns)


def test_session_restore_shares_the_state_and_round_trips(tmp_path):
    session = _session()
    restored = session.restore(1, "undo twice", "Restore the image from before turn 2.")
    turn = restored.turns[-1]
    assert turn.restored_from == 1 and turn.image is session.turns[0].image and turn.latents is session.turns[0].latents
    assert session.num_turns == 3 and restored.state_origin() == 1
    loaded = Session.load(restored.save(tmp_path / "s"))
    assert loaded == restored and loaded.turns[-1].restored_from == 1
    assert torch.equal(loaded.turns[-1].latents, session.turns[0].latents)
    to_source = session.restore(0, "start over")
    assert to_source.turns[-1].image is session.source_image and to_source.state_origin() == 0
    assert to_source.turns[-1].latents is None  # the source latent is not at the working size


def test_old_session_files_without_restored_from_load(tmp_path):
    directory = _session().save(tmp_path / "s")
    doc = json.loads((directory / "session.json").read_text())
    for t in doc["turns"]:
        del t["restored_from"]
    (directory / "session.json").write_text(json.dumps(doc))
    assert all(t.restored_from is None for t in Session.load(directory).turns)
    doc["turns"][1]["restored_from"] = 5
    (directory / "session.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"turns\[1\].restored_from"):
        Session.load(directory)


def test_session_restore_refuses_bad_index():
    with pytest.raises(ValueError, match="index"):
        _session().restore(4, "undo")
    with pytest.raises(ValueError, match="restored_from"):
        Turn("x", None, "x", restored_from=-1)

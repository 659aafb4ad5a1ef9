"""Exact undo: intents that name an earlier session state, restored without running the editor."""

import json

import numpy as np

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


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def scripted_reasoner(monkeypatch, pipe, answer):
    """Make the pipeline's reasoner write `answer(session)` (a clean `<think>...</think>intent`); returns the calls."""
    calls = []

    def generate_reasoning(session, prompt, *args, **kwargs):
        calls.append(session.num_turns)
        return answer(session, prompt), None, None

    monkeypatch.setattr(pipe, "generate_reasoning", generate_reasoning)
    return calls


def forbid_models(monkeypatch, pipe):
    """Fail if the transformer or the VAE runs (a restore must not draw anything)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran during a restore")

    for name in ("predict_velocity", "decode_latents", "encode_image", "prepare_conditioning"):
        monkeypatch.setattr(pipe, name, refuse)


def three_turns(pipe):
    from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_image

    prompts = ["make the sign yellow", "now make it black", "add a red ball on the left"]
    return pipe.edit_session(tiny_image(4), prompts, generator=[gen(k) for k in range(3)], reasoning="none",
                             **TINY_CALL_KWARGS).session


@pytest.mark.parametrize("answer, restored", [("Undo the last edit.", 2),
                                              ("Restore the image from before turn 2.", 1),
                                              ("Go back to the image after turn 3.", 3)])
def test_pipeline_restore_is_a_bit_exact_copy(pipe, monkeypatch, answer, restored):
    from diffusers_editr2.testing import TINY_CALL_KWARGS

    session = three_turns(pipe)
    scripted_reasoner(monkeypatch, pipe, lambda s, p: f"<think>Take turn {s.num_turns} back.</think>{answer}")
    with monkeypatch.context() as m:
        forbid_models(m, pipe)
        out = pipe(prompt="undo that", session=session, generator=gen(9), output_type="np", **TINY_CALL_KWARGS)
    turn, state = out.session.turns[-1], session.turns[restored - 1]
    assert out.session.num_turns == 4 and turn.restored_from == restored and out.intents == [answer]
    assert turn.intent == answer and turn.instruction == "undo that" and turn.meta["restored_from"] == restored
    assert torch.equal(turn.latents, state.latents) and turn.image.tobytes() == state.image.tobytes()
    assert out.images.shape == (1, 32, 32, 3)
    assert np.array_equal(out.images[0], np.asarray(state.image, dtype=np.float32) / 255)
    assert out.session.turns[:3] == session.turns  # the session it continued is a value: unchanged, shared


def test_pipeline_continues_exactly_from_a_restored_state(pipe, monkeypatch, tmp_path):
    from diffusers_editr2.testing import TINY_CALL_KWARGS

    session = three_turns(pipe)
    scripted_reasoner(monkeypatch, pipe, lambda s, p: "<think>Back.</think>Restore the image from before turn 2.")
    restored = pipe(prompt="go back to after the first edit", session=session, **TINY_CALL_KWARGS).session
    reloaded = Session.load(restored.save(tmp_path / "s"))
    assert reloaded == restored and reloaded.turns[-1].restored_from == 1
    # a later edit from the restored state is the edit from that state itself
    after = pipe(prompt="make it blue", session=reloaded, generator=gen(5), reasoning="none", **TINY_CALL_KWARGS)
    direct = pipe(prompt="make it blue", session=session.truncate(1), generator=gen(5), reasoning="none",
                  **TINY_CALL_KWARGS)
    assert torch.equal(after.session.turns[-1].latents, direct.session.turns[-1].latents)


def test_pipeline_restores_the_source_and_continues_from_it(pipe, monkeypatch):
    from diffusers_editr2.testing import TINY_CALL_KWARGS

    session = three_turns(pipe)
    scripted_reasoner(monkeypatch, pipe, lambda s, p: "<think>Start over.</think>Restore the original image.")
    restored = pipe(prompt="start over", session=session, **TINY_CALL_KWARGS)
    assert restored.session.turns[-1].restored_from == 0
    assert restored.images[0].tobytes() == session.source_image.tobytes()
    after = pipe(prompt="make it blue", session=restored.session, generator=gen(5), reasoning="none",
                 **TINY_CALL_KWARGS)
    direct = pipe(prompt="make it blue", session=session.truncate(0), generator=gen(5), reasoning="none",
                  **TINY_CALL_KWARGS)
    assert torch.equal(after.session.turns[-1].latents, direct.session.turns[-1].latents)


@pytest.mark.parametrize("reasoning", ["none", "history"])
def test_no_restore_without_an_intent(pipe, monkeypatch, reasoning):
    from diffusers_editr2.testing import TINY_CALL_KWARGS

    session = three_turns(pipe)
    calls = scripted_reasoner(monkeypatch, pipe, lambda s, p: "<think>.</think>Undo the last edit.")
    out = pipe(prompt="Undo the last edit.", session=session, generator=gen(2), reasoning=reasoning,
               **TINY_CALL_KWARGS)
    assert calls == [] and out.session.turns[-1].restored_from is None and "denoise" in out.session.turns[-1].timings


# ---------------------------------------------------------------------------------------------------------------------
# The shapes bench
# ---------------------------------------------------------------------------------------------------------------------


def test_shapes_bench_scores_restores_of_a_model_editor_at_cc_one(pipe, monkeypatch):
    from diffusers_editr2.bench import PipelineEditor
    from diffusers_editr2.testing import TINY_CALL_KWARGS
    from editr2.bench.report import markdown_table
    from editr2.bench.shapes.runner import run_bench
    from editr2.bench.shapes.sessions import generate_session

    bench_session = generate_session("cu", 4, 0, 64, "all")  # an undo (turn 3), then an undo of that undo (turn 4)
    assert [c.op for c in bench_session.commands][2:] == ["undo", "undo"]
    # the reasoner writes the gold intents; a random tiny editor draws the edits
    scripted_reasoner(monkeypatch, pipe, lambda s, p: f"<think>.</think>{bench_session.gold_intent[s.num_turns]}")
    editor = PipelineEditor(pipe, "intent", call_kwargs={**TINY_CALL_KWARGS, "height": 64, "width": 64})
    results = run_bench(editor, sessions=[bench_session], progress=False)
    assert [t.restored_from for t in editor.session.turns] == [None, None, 1, 2]
    assert results["restores"] == {"turns": 2, "CC": 1.0}
    assert "Undo turns: 2, CC against the restored state: 1.000" in markdown_table(results)
    # the edits themselves are not copies: an ordinary turn's CC against an earlier state is not 1
    assert editor.session.turns[1].image.tobytes() != editor.session.turns[0].image.tobytes()

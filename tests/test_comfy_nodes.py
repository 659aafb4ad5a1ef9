"""Unit tests of the ComfyUI nodes, run without ComfyUI: the stand-ins in tests/comfy_stubs replace its modules.

The three-turn chain, branching, determinism and interrupt tests run the real tiny Edit-R2 pipeline, saved as a
pipeline folder under the stand-in's models/editr2/ and loaded through the Load Model node.
"""

import json
import pathlib
import shutil

import pytest
import torch
from comfy_stubs.install import installed
from PIL import Image

from editr2.session import Session

TINY_MODEL = "editr2-tiny-test"
SIZE = 32  # the tiny pipeline's images are 32 x 32


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with installed(tmp_path_factory.mktemp("comfy")) as comfy:
        yield comfy


@pytest.fixture(scope="module")
def tiny_model(comfy, tiny_dir):
    """The tiny pipeline copied to models/editr2/<TINY_MODEL> and loaded by the Load Model node (CPU, float32)."""
    shutil.copytree(tiny_dir, pathlib.Path(comfy.model.folder_paths.models_dir) / "editr2" / TINY_MODEL)
    return comfy.nodes.EditR2LoadModel.execute(TINY_MODEL, "float32", "cpu")[0]


def shown(result) -> str:
    """The text an Edit Turn shows on its node."""
    (text,) = result.ui["text"]
    return text


def comfy_image(seed=0, batch=1, size=SIZE, channels=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, size, size, channels, generator=generator)  # (B, H, W, C) in 0..1


def start(comfy, image=None, rules=""):
    return comfy.nodes.EditR2StartSession.execute(comfy_image() if image is None else image, rules)[0]


def turn(comfy, session, model, instruction, seed=0, steps=2, reasoning="none", **kwargs):
    """One Edit Turn; reasoning "none" unless a test needs the (slower: up to 256 generated tokens) intent mode."""
    return comfy.nodes.EditR2EditTurn.execute(session, model, instruction, reasoning, steps, 1.0, seed, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Schemas


def test_every_node_has_a_valid_prefixed_schema(comfy):
    schemas = [node.GET_SCHEMA() for node in comfy.nodes.NODES]
    ids = [s.node_id for s in schemas]
    assert len(set(ids)) == len(ids) == 9
    for schema in schemas:
        assert schema.node_id.startswith("EditR2") and schema.category == "Edit-R2"
        assert schema.display_name and schema.description


def test_edit_turn_schema(comfy):
    node = comfy.nodes.EditR2EditTurn
    inputs = node.INPUT_TYPES()
    required = inputs["required"]
    assert list(required) == ["session", "model", "instruction", "reasoning", "steps", "cfg", "seed"]
    assert required["session"][0] == "EDITR2_SESSION" and required["model"][0] == "EDITR2_MODEL"
    assert required["instruction"][0] == "STRING" and required["instruction"][1]["multiline"] is True
    from diffusers_editr2.pipeline_editr2 import REASONING_MODES

    assert required["reasoning"][1]["options"] == list(REASONING_MODES)
    assert required["seed"][1]["control_after_generate"] is True
    assert list(inputs["optional"]) == ["negative_prompt", "keep_unedited"]
    assert inputs["optional"]["keep_unedited"][1]["default"] == 0.0  # off
    assert node.RETURN_TYPES() == ["EDITR2_SESSION", "IMAGE", "STRING"]


def test_loader_lists_models_dir_and_default(comfy, tmp_path):
    models = pathlib.Path(comfy.folder_paths.models_dir) / "editr2"
    (models / "mine").mkdir(parents=True, exist_ok=True)
    (models / "mine" / "model_index.json").write_text("{}")
    (models / "not-a-pipeline").mkdir(exist_ok=True)
    options = comfy.nodes.EditR2LoadModel.INPUT_TYPES()["required"]["model_name"][1]["options"]
    assert options[0] == "editr2-shapes-tiny" and "mine" in options and "not-a-pipeline" not in options


# ----------------------------------------------------------------------------------------------------------------------
# Images, sessions, bad inputs


def test_start_session_and_session_images_round_trip(comfy):
    image = comfy_image(seed=3)
    session = start(comfy, image, rules="keep the background white\n\n  only the edited object may change ")
    assert isinstance(session, Session) and session.num_turns == 0
    assert session.rules == ("keep the background white", "only the edited object may change")
    batch = comfy.nodes.EditR2SessionImages.execute(session, True)[0]
    assert batch.shape == (1, SIZE, SIZE, 3) and batch.dtype == torch.float32
    assert (batch - image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
    with pytest.raises(ValueError, match="no turn images"):
        comfy.nodes.EditR2SessionImages.execute(session, False)


@pytest.mark.parametrize(
    "image, message",
    [
        (comfy_image(batch=2), "batch of 2"),
        (torch.rand(SIZE, SIZE, 3), r"shape \[batch, height, width, channels\]"),
        (comfy_image(channels=2), "1, 3 or 4 channels"),
    ],
)
def test_start_session_refuses_bad_images(comfy, image, message):
    with pytest.raises(ValueError, match=message):
        start(comfy, image)


def test_start_session_accepts_rgba_and_grey(comfy):
    rgba = comfy_image(channels=4)
    assert start(comfy, rgba).source_image.getpixel((0, 0)) == tuple(round(v * 255) for v in rgba[0, 0, 0, :3].tolist())
    assert start(comfy, comfy_image(channels=1)).source_image.mode == "RGB"


def test_edit_turn_refuses_bad_inputs(comfy):
    session = start(comfy)
    with pytest.raises(ValueError, match="instruction is empty"):
        turn(comfy, session, None, "   ")
    with pytest.raises(ValueError, match="connect 'session'"):
        turn(comfy, comfy_image(), None, "add a red circle")
    with pytest.raises(ValueError, match="connect 'model'"):
        turn(comfy, session, "a model", "add a red circle")
    with pytest.raises(ValueError, match="reasoning must be one of"):
        comfy.nodes.EditR2EditTurn.execute(session, None, "add a red circle", "think hard", 2, 1.0, 0)


def test_empty_instruction_is_a_validation_error(comfy):
    """Caught when the prompt is queued, not after the model load and the earlier turns."""
    node = comfy.nodes.EditR2EditTurn
    for blank in ("", "   ", "\n\t"):
        message = node.validate_inputs(blank)
        assert isinstance(message, str) and "instruction is empty" in message
    assert node.validate_inputs("make it red") is True
    assert node.validate_inputs() is True  # an instruction wired from another node is checked when the node runs


def test_missing_model_gives_a_readable_validation_error(comfy, monkeypatch, tmp_path):
    monkeypatch.setattr(comfy.model, "SHIPPED_CHECKPOINTS", tmp_path / "no-checkpoints")
    message = comfy.nodes.EditR2LoadModel.validate_inputs("editr2-shapes-tiny")
    assert isinstance(message, str) and "editr2-shapes-tiny" in message and "model_index.json" in message
    assert "Traceback" not in message and "shipped default" in message
    assert "not found" in comfy.nodes.EditR2LoadModel.validate_inputs("no-such-model")
    assert "folder name" in comfy.nodes.EditR2LoadModel.validate_inputs("../escape")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        comfy.nodes.EditR2LoadModel.execute("no-such-model", "auto", "auto")


def test_save_then_load_session(comfy):
    session = start(comfy, rules="keep the background white")
    nodes = comfy.nodes
    result = nodes.EditR2SaveSession.execute(session, "editr2/unit")
    folder = result[0]
    assert folder == "editr2/unit_00001" and "Saved 0 turn(s)" in result.ui.value
    assert nodes.EditR2SaveSession.execute(session, "editr2/unit")[0] == "editr2/unit_00002"  # never overwrites
    name = f"{folder} [output]"
    assert name in nodes.EditR2LoadSession.INPUT_TYPES()["required"]["folder"][1]["options"]
    assert nodes.EditR2LoadSession.validate_inputs(name) is True
    loaded, image = nodes.EditR2LoadSession.execute(name).args
    assert loaded == session and image.shape == (1, SIZE, SIZE, 3)
    fingerprint = nodes.EditR2LoadSession.fingerprint_inputs(name)
    assert fingerprint == nodes.EditR2LoadSession.fingerprint_inputs(name)


@pytest.mark.parametrize("prefix", [".", "./", "..", "../../outside", "a/..", "a/../../b", "sub/../..", "ABSOLUTE"])
def test_save_session_refuses_escaping_the_output_dir(comfy, prefix):
    """A prefix must name a folder strictly inside output/: "." would write output_00001 next to output/."""
    output_dir = pathlib.Path(comfy.folder_paths.get_output_directory()).resolve()
    prefix = str(output_dir.parent / "elsewhere") if prefix == "ABSOLUTE" else prefix
    around = sorted(p.name for p in output_dir.parent.iterdir())
    node = comfy.nodes.EditR2SaveSession
    message = node.validate_inputs(prefix)  # refused at queue time, before the graph runs
    assert isinstance(message, str) and "relative path inside" in message
    with pytest.raises(ValueError, match="relative path inside"):
        node.execute(start(comfy), prefix)
    assert sorted(p.name for p in output_dir.parent.iterdir()) == around  # nothing written next to output/


def test_save_session_accepts_prefixes_inside_the_output_dir(comfy):
    node = comfy.nodes.EditR2SaveSession
    assert node.validate_inputs("editr2/ok") is True and node.validate_inputs() is True  # () = wired from a node
    assert node.execute(start(comfy), "a/../inside/run")[0] == "inside/run_00001"
    assert node.execute(start(comfy), "  ")[0] == "editr2/session_00001"  # blank: the default prefix


def test_bad_session_folder_gives_a_readable_error(comfy):
    input_dir = pathlib.Path(comfy.folder_paths.get_input_directory())
    good = start(comfy).save(input_dir / "sessions" / "broken")
    (good / "session.json").write_text(json.dumps({"format_version": 1, "size": "wide"}))
    (input_dir / "sessions" / "empty").mkdir()
    node = comfy.nodes.EditR2LoadSession
    assert "sessions/broken" in node.INPUT_TYPES()["required"]["folder"][1]["options"]
    message = node.validate_inputs("sessions/broken")
    assert isinstance(message, str) and "session.json" in message and "size" in message
    assert "\n" not in message and "Traceback" not in message
    for folder in ("sessions/empty", "sessions/missing", "../../etc", ""):
        assert isinstance(node.validate_inputs(folder), str)
    with pytest.raises(ValueError, match="cannot load 'sessions/broken'"):
        node.execute("sessions/broken")


# ----------------------------------------------------------------------------------------------------------------------
# Running turns on the tiny pipeline


@pytest.mark.slow
def test_three_turn_chain(comfy, tiny_model):
    comfy.utils.BARS.clear()
    comfy.model_management.LOAD_CALLS.clear()
    session = start(comfy, rules="keep the background white")
    instructions = ["add a small red circle on the left", "make it blue", "now move it to the right"]
    intents = []
    for i, instruction in enumerate(instructions):
        result = turn(comfy, session, tiny_model, instruction, seed=i, steps=3, reasoning="intent")
        session, image, intent = result.args
        assert isinstance(session, Session) and session.num_turns == i + 1
        assert image.shape == (1, SIZE, SIZE, 3) and 0 <= image.min() and image.max() <= 1
        assert isinstance(intent, str) and intent and shown(result) == intent
        intents.append(intent)
    assert session.instructions == instructions and session.intents == intents
    assert [bar.values for bar in comfy.utils.BARS] == [[1, 2, 3]] * 3  # one progress bar per turn, one tick a step
    assert [calls[0] for calls in comfy.model_management.LOAD_CALLS] == [tiny_model.patcher] * 3
    assert all(t.latents is not None and t.meta["reasoning"] == "intent" for t in session.turns)  # latents carried

    images = comfy.nodes.EditR2SessionImages.execute(session, True)[0]
    assert images.shape == (4, SIZE, SIZE, 3)
    strip = comfy.nodes.EditR2SessionFilmstrip.execute(session, 64)[0]
    assert strip.ndim == 4 and strip.shape[0] == 1 and strip.shape[2] >= 4 * 64 and strip.shape[3] == 3

    folder = comfy.nodes.EditR2SaveSession.execute(session, "editr2/chain")[0]
    loaded = comfy.nodes.EditR2LoadSession.execute(f"{folder} [output]")[0]
    assert loaded == session
    continued = turn(comfy, loaded, tiny_model, "make it large", seed=7)[0]
    assert continued.num_turns == 4 and continued.turns[:3] == session.turns


def test_turns_are_deterministic_and_branches_do_not_interfere(comfy, tiny_model):
    base = turn(comfy, start(comfy), tiny_model, "add a red square", seed=1)[0]
    snapshot = (base.num_turns, base.turns[0].image.tobytes())
    a1 = turn(comfy, base, tiny_model, "make it green", seed=5)
    b = turn(comfy, base, tiny_model, "remove it", seed=6)
    a2 = turn(comfy, base, tiny_model, "make it green", seed=5)
    assert torch.equal(a1[1], a2[1]) and a1[2] == a2[2]  # same inputs and seed: the same turn
    assert not torch.equal(a1[1], b[1])
    assert (base.num_turns, base.turns[0].image.tobytes()) == snapshot  # the shared parent is untouched
    assert a1[0].turns[0] is base.turns[0] and b[0].turns[0] is base.turns[0]
    assert a1[0].instructions[-1] == "make it green" and b[0].instructions[-1] == "remove it"
    assert not torch.equal(turn(comfy, base, tiny_model, "make it green", seed=9)[1], a1[1])


def test_interrupt_stops_a_turn(comfy, tiny_model, monkeypatch):
    session = start(comfy)
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        turn(comfy, session, tiny_model, "add a red circle")
    assert not comfy.model_management.processing_interrupted()  # the flag is consumed, as in ComfyUI

    # Interrupt in the middle of denoising: the user presses cancel after the second step.
    original_update = comfy.utils.ProgressBar.update

    def update_then_interrupt(bar, value):
        original_update(bar, value)
        if bar.current == 2:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.BARS.clear()
    monkeypatch.setattr(comfy.utils.ProgressBar, "update", update_then_interrupt)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        turn(comfy, session, tiny_model, "add a red circle", steps=6)
    assert comfy.utils.BARS[-1].values == [1, 2]
    assert session.num_turns == 0


def test_session_size_follows_the_model(comfy, tiny_model):
    """The pipeline picks the working size: the image's own, floored to the multiple the model needs."""
    multiple = tiny_model.pipeline.vae_scale_factor * 2
    session = start(comfy, comfy_image(size=SIZE + multiple - 1), rules="keep the background white")
    new_session, image, _ = turn(comfy, session, tiny_model, "add a red circle", steps=2).args
    assert image.shape == (1, SIZE, SIZE, 3) and new_session.size == (SIZE, SIZE)
    assert new_session.rules == ("keep the background white",)
    with pytest.raises(ValueError, match=f"at least {multiple} pixels"):
        turn(comfy, start(comfy, comfy_image(size=multiple - 1)), tiny_model, "add a red circle")


def test_converted_inputs_are_reported(comfy, tiny_model, caplog):
    """Greyscale/RGBA sources and sizes the model cannot take are converted, and each conversion is said: a logged
    warning, a note in the session's meta and a `note:` line under the intent the first turn shows."""
    rgba = torch.rand(1, 53, 37, 4, generator=torch.Generator().manual_seed(0))  # 37 wide, 53 high
    with caplog.at_level("WARNING"):
        session = start(comfy, rgba)
    assert any("alpha channel was dropped" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        result = turn(comfy, session, tiny_model, "add a red circle")
    new_session, image, intent = result.args
    assert image.shape == (1, 48, 32, 3) and new_session.size == (32, 48)
    assert any("resized from 37x53 to 32x48" in r.getMessage() for r in caplog.records)
    shown_lines = shown(result).splitlines()
    assert shown_lines[0] == intent and "\n" not in intent  # the intent output itself stays the intent
    assert any(line.startswith("note:") and "alpha channel was dropped" in line for line in shown_lines)
    assert any(line.startswith("note:") and "resized from 37x53 to 32x48" in line for line in shown_lines)
    notes = new_session.meta["input_notes"]
    assert len(notes) == 2 and "RGBA" in notes[0] and "37x53" in notes[1]

    grey = start(comfy, comfy_image(channels=1))
    assert "greyscale" in grey.meta["input_notes"][0]
    assert "greyscale" in shown(turn(comfy, grey, tiny_model, "add a red circle"))
    later = turn(comfy, new_session, tiny_model, "make it blue")
    assert shown(later) == later[2]  # notes belong to the turn that made the conversion
    plain = turn(comfy, start(comfy), tiny_model, "add a red circle")
    assert shown(plain) == plain[2] and "input_notes" not in plain[0].meta


def test_edit_turn_applies_the_model_folders_call_defaults(comfy, tiny_dir, monkeypatch):
    """A model folder's editr2_call_defaults.json reaches the pipeline for what the node has no input for."""
    import json

    from diffusers_editr2 import EditR2Pipeline

    name = "editr2-with-defaults"
    folder = pathlib.Path(comfy.model.folder_paths.models_dir) / "editr2" / name
    shutil.copytree(tiny_dir, folder)
    template = 'History:\n{history}\nRules:\n{rules}\nInstruction: "{instruction}"'
    defaults = {"condition_area": 32 * 32, "template": template, "max_new_tokens": 3, "num_inference_steps": 50,
                "reasoning_condition_area": 48 * 48}
    (folder / "editr2_call_defaults.json").write_text(json.dumps(defaults))
    model = comfy.nodes.EditR2LoadModel.execute(name, "float32", "cpu")[0]
    assert model.call_defaults == defaults

    calls = []
    original = EditR2Pipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EditR2Pipeline, "__call__", spy)
    turn(comfy, start(comfy), model, "make it red", steps=2, reasoning="intent")
    (kwargs,) = calls
    assert kwargs["condition_area"] == 1024 and kwargs["template"] == template and kwargs["max_new_tokens"] == 3
    assert kwargs["reasoning_condition_area"] == 48 * 48  # a separate reasoner's view of the image
    assert kwargs["num_inference_steps"] == 2  # the node's own input wins over the folder's steps
    assert kwargs["keep_unedited"] is None  # the input's default, 0, is off

    calls.clear()
    first = turn(comfy, start(comfy), model, "make it red", steps=2, reasoning="none")
    out = comfy.nodes.EditR2EditTurn.execute(first[0], model, "make it blue", "none", 2, 1.0, 0, "", 1e6)
    assert calls[-1]["keep_unedited"] == 1e6
    assert torch.equal(out[0].turns[-1].latents, first[0].turns[-1].latents)  # nothing changed by more than that
    with pytest.raises(ValueError, match="keep_unedited must be a finite change"):
        comfy.nodes.EditR2EditTurn.execute(first[0], model, "make it blue", "none", 2, 1.0, 0, "", -1.0)


def test_edit_turn_restores_an_earlier_state_exactly(comfy, tiny_model, monkeypatch):
    session = start(comfy)
    for i, instruction in enumerate(["add a red square", "make it green", "move it to the right"]):
        session = turn(comfy, session, tiny_model, instruction, seed=i)[0]

    def generate_reasoning(session, prompt, *args, **kwargs):
        return "<think>Undo the move.</think>Restore the image from before turn 3.", None, None

    monkeypatch.setattr(tiny_model.pipeline, "generate_reasoning", generate_reasoning)
    result = turn(comfy, session, tiny_model, "undo that", seed=3, reasoning="intent")
    restored, image, intent = result.args
    assert intent == "Restore the image from before turn 3." and shown(result) == intent
    assert restored.num_turns == 4 and restored.turns[-1].restored_from == 2
    assert torch.equal(restored.turns[-1].latents, session.turns[1].latents)
    assert restored.turns[-1].image.tobytes() == session.turns[1].image.tobytes()
    assert torch.equal(image, comfy.nodes.EditR2SessionImages.execute(session, False)[0][1:2])

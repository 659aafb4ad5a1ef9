"""`editr2 edit` on a tiny model folder: turn PNGs, session.json and filmstrip.png."""

import argparse
import json

import pytest
import torch
from PIL import Image

from diffusers_editr2.testing import tiny_image
from diffusers_editr2 import cli as edit_cli
from editr2.filmstrip import Frame, filmstrip
from editr2.session import Session


def main(argv):
    """`editr2 edit ...` as editr2.cli dispatches it: this module's add_arguments + run."""
    assert argv[0] == "edit"
    parser = argparse.ArgumentParser(prog="editr2 edit", description=edit_cli.__doc__)
    edit_cli.add_arguments(parser)
    return edit_cli.run(parser.parse_args(argv[1:]))


def run_cli(model_dir, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tiny_image(0, size=(40, 40)).save(tmp_path / "in.png")
    argv = ["edit", "--model", str(model_dir), "--image", str(tmp_path / "in.png"), "make the sign yellow",
            "now make it black", "--out", str(tmp_path / "out"), "--steps", "2", "--seed", "3", "--height", "32",
            "--width", "32", "--true-cfg-scale", "1", "--reference-area", "0", "--condition-area", "1024",
            "--max-new-tokens", "6", *extra]  # fmt: skip
    assert main(argv) == 0
    return tmp_path / "out"


@pytest.mark.slow
def test_edit_writes_turns_session_and_filmstrip(qwen_edit_plus_dir, tmp_path, capsys):
    out = run_cli(qwen_edit_plus_dir, tmp_path, "--reasoning", "intent")
    files = {p.name for p in out.iterdir()}
    assert {"session.json", "source.png", "turn_01.png", "turn_02.png", "filmstrip.png", "latents.safetensors"} <= files
    session = Session.load(out)
    assert session.instructions == ["make the sign yellow", "now make it black"]
    assert [t.seed for t in session.turns] == [3, 4]
    assert all(t.fallback_reason == "no_think_end_tag" for t in session.turns)  # random tiny VLM: recorded fallback
    assert session.size == (32, 32) and session.meta["original_size"] == [40, 40]
    strip = Image.open(out / "filmstrip.png")
    assert strip.width > 3 * 256 and strip.height > 256
    assert "turn 2: 'now make it black'" in capsys.readouterr().out
    doc = json.loads((out / "session.json").read_text())
    assert doc["turns"][0]["meta"]["reasoning"] == "intent"

    # running again into the same directory replaces the session with --overwrite (same seeds: same images)
    again = run_cli(qwen_edit_plus_dir, tmp_path, "--reasoning", "intent", "--overwrite")
    assert Session.load(again).turns[1].image.tobytes() == session.turns[1].image.tobytes()


def test_edit_none_matches_history_first_turn(qwen_edit_plus_dir, tmp_path):
    none = Session.load(run_cli(qwen_edit_plus_dir, tmp_path / "a", "--reasoning", "none"))
    history = Session.load(run_cli(qwen_edit_plus_dir, tmp_path / "b", "--reasoning", "history"))
    # turn 1 has no history, so both modes condition on the same text and image
    assert none.turns[0].image.tobytes() == history.turns[0].image.tobytes()
    assert history.turns[1].intent.startswith("Earlier instructions: (1) make the sign yellow")


def test_filmstrip_layout():
    frames = [Frame(tiny_image(k, size=(64, 32)), f"Turn {k}", "make it red " * 20, "the sign, red") for k in range(3)]
    strip = filmstrip(frames, tile=64, max_lines=2)
    assert strip.mode == "RGB" and strip.width == 3 * (64 + 8) + 8
    with pytest.raises(ValueError, match="at least one frame"):
        filmstrip([])


def test_settings_come_from_the_command_line_then_the_model_folder_then_upstream(tmp_path):
    import argparse
    import json

    from diffusers_editr2.cli import UPSTREAM_DEFAULTS, add_arguments, call_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["x", "--image", "in.png", "--out", "out"]
    assert call_kwargs(parser.parse_args([*base, "--model", str(tmp_path)])) == UPSTREAM_DEFAULTS  # no defaults file

    template = 'History:\n{history}\nInstruction: "{instruction}"'
    (tmp_path / "editr2_call_defaults.json").write_text(json.dumps(
        {"height": 64, "width": 64, "reference_area": None, "condition_area": 1024, "num_inference_steps": 16,
         "true_cfg_scale": 1.0, "template": template}))
    kwargs = call_kwargs(parser.parse_args([*base, "--model", str(tmp_path), "--steps", "4"]))
    assert kwargs["num_inference_steps"] == 4 and kwargs["condition_area"] == 1024 and kwargs["template"] == template
    assert kwargs["reference_area"] is None and kwargs["height"] == 64 and kwargs["max_new_tokens"] == 256
    kwargs = call_kwargs(parser.parse_args([*base, "--model", str(tmp_path), "--reference-area", "4096"]))
    assert kwargs["reference_area"] == 4096 and "keep_unedited" not in kwargs
    assert call_kwargs(parser.parse_args([*base, "--model", str(tmp_path), "--keep-unedited", "0.2"]))[
        "keep_unedited"] == 0.2
    assert "reasoning_condition_area" not in kwargs  # None: the pipeline uses condition_area
    assert call_kwargs(parser.parse_args([*base, "--model", str(tmp_path), "--reasoning-condition-area", "4096"]))[
        "reasoning_condition_area"] == 4096


# ----------------------------------------------------------------------------------------------------------------------
# Bad command lines fail before the model loads: one line on stderr, exit status 2


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes loading a model fail loudly, so a test proves its error came before any model work."""
    from diffusers_editr2 import EditR2Pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr(EditR2Pipeline, "from_pretrained", refuse)


def edit_argv(model, image, out, *extra, instructions=("make the sign yellow",)):
    return ["edit", "--model", str(model), "--image", str(image), *instructions, "--out", str(out), *extra]


@pytest.mark.parametrize(
    "case, message",
    [
        ("out_is_file", "is a file; pass a folder"),
        ("out_under_a_file", "cannot be created: .* is a file"),
        ("out_not_a_session", "non-empty folder that is not a saved session"),
        ("out_holds_session", "holds an earlier session; pass --overwrite"),
        ("image_missing", "--image .*: no such file"),
        ("image_not_an_image", "cannot be read as an image"),
        ("image_is_folder", "no such file"),
        ("empty_instruction", "instruction 2 is empty"),
        ("model_missing", "no model folder at"),
        ("model_hub_id_offline", "offline"),
        ("model_not_a_pipeline", "no model_index.json"),
        ("bad_steps", "--steps must be at least 1"),
        ("bad_keep_unedited", "--keep-unedited must be a finite change >= 0"),
        ("keep_unedited_without_working_size_source", "pass --reference-area 0 with it"),
        ("bad_defaults_file", "--model .*: "),
    ],
)
def test_bad_command_line_fails_before_the_model_loads(case, message, tiny_dir, tmp_path, capsys, monkeypatch,
                                                       no_model_load):
    import re
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    image, out, model = tmp_path / "in.png", tmp_path / "out", tiny_dir
    tiny_image(0, size=(40, 40)).save(image)
    extra, instructions = [], ("make the sign yellow",)
    if case == "out_is_file":
        out.write_text("not a folder")
    elif case == "out_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "out_not_a_session":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "out_holds_session":
        Session(source_image=tiny_image(1, size=(32, 32))).save(out)
    elif case == "image_missing":
        image = tmp_path / "missing.png"
    elif case == "image_not_an_image":
        image.write_text("not a PNG")
    elif case == "image_is_folder":
        image = tmp_path
    elif case == "empty_instruction":
        instructions = ("make the sign yellow", "  ")
    elif case == "model_missing":
        model = tmp_path / "no-such-model"
    elif case == "model_hub_id_offline":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        model = "editr2-test-org/no-such-model"
    elif case == "model_not_a_pipeline":
        model = tmp_path
    elif case == "bad_steps":
        extra = ["--steps", "0"]
    elif case == "bad_keep_unedited":
        extra = ["--keep-unedited", "nan", "--reference-area", "0"]
    elif case == "keep_unedited_without_working_size_source":
        extra = ["--keep-unedited", "0.2"]
    elif case == "bad_defaults_file":
        model = tmp_path / "model"
        shutil.copytree(tiny_dir, model)
        (model / "editr2_call_defaults.json").write_text("[1, 2]")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(edit_argv(model, image, out, *extra, instructions=instructions)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("editr2 edit: error: ")
    assert re.search(message, captured.err), captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no probe folder left behind)


def test_overwrite_replaces_only_a_session(tiny_dir, tmp_path, capsys, no_model_load):
    """--overwrite allows replacing an earlier session, never a folder holding anything else."""
    from diffusers_editr2.cli import UsageError, check_out

    session_dir = Session(source_image=tiny_image(1, size=(32, 32))).save(tmp_path / "session")
    check_out(str(session_dir), overwrite=True)  # allowed
    check_out(str(tmp_path / "new" / "deeper"), overwrite=False)  # a new folder (parents created by the save)
    (tmp_path / "empty").mkdir()
    check_out(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a saved session"):
        check_out(str(tmp_path / "other"), overwrite=True)
    assert not (tmp_path / "new").exists()


def test_model_load_error_is_one_line(tmp_path, capsys, monkeypatch):
    """A model folder that passes the checks but fails to load is reported as one line, not a traceback."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{not json")
    tiny_image(0, size=(40, 40)).save(tmp_path / "in.png")
    assert main(edit_argv(model, tmp_path / "in.png", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("editr2 edit: error: cannot load the model") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_edit_undo_restores_the_earlier_turn_exactly(qwen_edit_plus_dir, tmp_path, capsys, monkeypatch):
    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    def generate_reasoning(self, session, prompt, *args, **kwargs):
        answer = "Undo the last edit." if prompt == "undo that" else prompt.capitalize() + "."
        return f"<think>Turn {session.num_turns + 1}.</think>{answer}", None, None

    monkeypatch.setattr(EditR2Pipeline, "generate_reasoning", generate_reasoning)
    tiny_image(0, size=(40, 40)).save(tmp_path / "in.png")
    argv = ["edit", "--model", str(qwen_edit_plus_dir), "--image", str(tmp_path / "in.png"), "make the sign yellow",
            "now make it black", "undo that", "--out", str(tmp_path / "out"), "--steps", "2", "--height", "32",
            "--width", "32", "--true-cfg-scale", "1", "--reference-area", "0", "--reasoning", "intent"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "out"
    session = Session.load(out)
    assert [t.restored_from for t in session.turns] == [None, None, 1]
    assert session.turns[2].intent == "Undo the last edit."
    assert session.turns[2].image.tobytes() == session.turns[0].image.tobytes()
    assert (out / "turn_03.png").read_bytes() == (out / "turn_01.png").read_bytes()
    assert torch.equal(session.turns[2].latents, session.turns[0].latents)
    assert "turn 3: 'undo that' -> 'Undo the last edit.'  [restored turn 1 exactly]" in capsys.readouterr().out

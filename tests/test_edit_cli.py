"""`editr2 edit` on a tiny model folder: turn PNGs, session.json and filmstrip.png."""

import argparse
import json

import pytest
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

    # running again into the same directory replaces the session (same seeds: same images)
    again = run_cli(qwen_edit_plus_dir, tmp_path, "--reasoning", "intent")
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
    assert kwargs["reference_area"] == 4096

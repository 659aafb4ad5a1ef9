"""EditR2Pipeline: every bad input is a clear error or a documented fallback."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_editr2.pipeline_editr2 import check_image
from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_image
from editr2.intent import parse_answer
from editr2.session import Session


@pytest.fixture(scope="module")
def session(pipe):
    return pipe(image=tiny_image(0), prompt="make the sign yellow", reasoning="none", **TINY_CALL_KWARGS).session


def call(pipe, **kwargs):
    return pipe(**{**TINY_CALL_KWARGS, "reasoning": "none", **kwargs})


@pytest.mark.parametrize(
    "mode, match",
    [("RGBA", "alpha channel"), ("LA", "alpha channel"), ("I;16", "16/32-bit"), ("I", "16/32-bit"), ("F", "16/32-bit")],
)
def test_refused_image_modes(pipe, mode, match):
    image = Image.new(mode, (32, 32))
    with pytest.raises(ValueError, match=match):
        call(pipe, image=image, prompt="x")


def test_palette_with_transparency_is_refused():
    image = Image.new("P", (8, 8))
    image.info["transparency"] = 0
    with pytest.raises(ValueError, match="alpha channel"):
        check_image(image)


@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK"])
def test_convertible_modes_fall_back_to_rgb(pipe, mode):
    image = tiny_image(1).convert(mode)
    out = call(pipe, image=image, prompt="x", output_type="np")
    assert out.session.source_image.mode == "RGB"
    assert np.array_equal(np.asarray(out.session.source_image), np.asarray(image.convert("RGB")))


def test_zero_size_and_huge_images(pipe, monkeypatch):
    with pytest.raises(ValueError, match="empty"):
        call(pipe, image=Image.new("RGB", (0, 16)), prompt="x")
    huge = Image.new("RGB", (64, 64))
    monkeypatch.setattr(Image.Image, "size", property(lambda self: (100_000, 100_000)))
    with pytest.raises(ValueError, match="downscale"):
        check_image(huge)


def test_not_an_image(pipe):
    with pytest.raises(ValueError, match="PIL.Image.fromarray"):
        call(pipe, image=np.zeros((32, 32, 3), dtype=np.uint8), prompt="x")


@pytest.mark.parametrize(
    "prompt, match", [(None, "Pass `prompt=`"), ("", "empty"), ("   ", "empty"), (["a", "b"], "edit_session")]
)
def test_bad_prompts(pipe, prompt, match):
    with pytest.raises(ValueError, match=match):
        call(pipe, image=tiny_image(0), prompt=prompt)


def test_prompt_without_image_or_session(pipe):
    with pytest.raises(ValueError, match="Pass `image=` to start a session, or `session=`"):
        call(pipe, prompt="make it red")


def test_image_and_session_together(pipe, session):
    with pytest.raises(ValueError, match="not both"):
        call(pipe, image=tiny_image(0), session=session, prompt="x")


def test_session_of_another_resolution(pipe, session):
    with pytest.raises(ValueError, match=r"works at 32x32.*omit height/width"):
        call(pipe, session=session, prompt="x", height=64, width=64)
    # the same size, or none, is fine
    assert call(pipe, session=session, prompt="x", height=32, width=32).session.num_turns == 2
    kwargs = {k: v for k, v in TINY_CALL_KWARGS.items() if k not in ("height", "width")}
    assert pipe(session=session, prompt="x", reasoning="none", **kwargs).session.size == (32, 32)


def test_session_of_another_model(pipe, session):
    # latents from a model with another latent layout (e.g. saved by a different checkpoint) are refused
    bad = session.append(replace(session.turns[0], latents=torch.zeros(1, 9, 16)))
    with pytest.raises(ValueError, match=r"turns\[1\].latents has shape \(1, 9, 16\)"):
        call(pipe, session=bad, prompt="x")
    bad = replace(session, source_latents=torch.zeros(1, 16, 64))
    with pytest.raises(ValueError, match="source_latents"):
        call(pipe, session=bad, prompt="x")


def test_other_bad_arguments(pipe, session):
    with pytest.raises(ValueError, match="reasoning"):
        call(pipe, session=session, prompt="x", reasoning="cot")
    with pytest.raises(ValueError, match="output_type"):
        call(pipe, session=session, prompt="x", output_type="jpeg")
    with pytest.raises(ValueError, match="`height` must be an int >= 8"):
        call(pipe, image=tiny_image(0), prompt="x", height=4)
    with pytest.raises(ValueError, match="temperature"):
        call(pipe, session=session, prompt="x", temperature=-1.0)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        call(pipe, session=session, prompt="x", callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="editr2.session.Session"):
        call(pipe, session={"turns": []}, prompt="x")
    with pytest.raises(ValueError, match="non-empty list"):
        pipe.edit_session(tiny_image(0), "one string")
    with pytest.raises(ValueError, match="one generator per prompt"):
        pipe.edit_session(tiny_image(0), ["a", "b"], generator=[torch.Generator()])


def test_resized_source_records_original_size(pipe):
    out = call(pipe, image=tiny_image(0, size=(50, 40)), prompt="x")
    assert out.session.size == (32, 32)
    assert out.session.meta["original_size"] == [50, 40]


def test_unparsable_answers_fall_back_with_reason():
    # what the pipeline records for each kind of bad reasoning answer (see editr2.intent.parse_answer)
    assert parse_answer("", "make it red").fallback_reason == "empty_output"
    assert parse_answer("<think>hmm", "make it red").fallback_reason == "no_think_end_tag"
    assert parse_answer("<think>hmm</think>  ", "make it red").fallback_reason == "empty_after_think"
    assert parse_answer("<think>a</think>" + "x" * 700, "make it red").text == "make it red"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_inference_steps": 1}, "num_inference_steps >= 2"), ({"num_inference_steps": 0}, "positive int"),
     ({"num_inference_steps": 1, "sigmas": [1.0]}, "at least two")],
)
def test_too_few_steps_are_refused(pipe, kwargs, match):
    # one step: the Qwen-Image scheduler's shift_terminal stretch divides by zero (NaN latents in diffusers itself)
    assert pipe.scheduler.config.get("shift_terminal")
    with pytest.raises(ValueError, match=match):
        call(pipe, image=tiny_image(0), prompt="make it red", **kwargs)


def test_two_steps_are_finite(pipe):
    out = call(pipe, image=tiny_image(0), prompt="make it red", num_inference_steps=2, output_type="pt")
    assert torch.isfinite(out.images).all()

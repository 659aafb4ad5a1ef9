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


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite values, prompt length, EXIF orientation, and deep errors caught up front


@pytest.fixture
def no_compute(pipe, monkeypatch):
    """Fail the test if any model work starts: every check must come first."""

    def ran(*args, **kwargs):
        raise AssertionError("model work started before the input was refused")

    for name in ("start_session", "reason", "prepare_conditioning", "prepare_latents"):
        monkeypatch.setattr(pipe, name, ran)
    return pipe


@pytest.mark.parametrize(
    "kwargs",
    [{"true_cfg_scale": float("inf")}, {"true_cfg_scale": float("nan")}, {"guidance_scale": float("inf")},
     {"guidance_scale": float("nan")}, {"true_cfg_scale": "4"}],
)
def test_non_finite_scales_are_refused(no_compute, kwargs):
    with pytest.raises(ValueError, match=r"must be a finite number \(e\.g\. 4\.0\)"):
        call(no_compute, image=tiny_image(0), prompt="x", negative_prompt=" ", **kwargs)


def test_non_finite_latents_end_the_turn_naming_it(pipe, session):
    from diffusers_editr2.pipeline_editr2 import NonFiniteLatentsError

    def diverge(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"] * float("nan")}

    with pytest.raises(NonFiniteLatentsError, match="Turn 2 produced non-finite latents"):
        call(pipe, session=session, prompt="now make it black", callback_on_step_end=diverge)
    assert issubclass(NonFiniteLatentsError, ValueError)


def test_non_finite_carried_and_given_latents_are_refused(no_compute, session):
    nan = session.turns[0].latents * float("nan")
    with pytest.raises(ValueError, match=r"session\.turns\[0\]\.latents holds NaN or inf.*truncate"):
        call(no_compute, session=replace(session, turns=(replace(session.turns[0], latents=nan),)), prompt="x")
    ints = session.turns[0].latents.to(torch.int32)
    with pytest.raises(ValueError, match=r"session\.turns\[0\]\.latents must be a floating-point tensor"):
        call(no_compute, session=replace(session, turns=(replace(session.turns[0], latents=ints),)), prompt="x")
    with pytest.raises(ValueError, match=r"`latents` must be finite packed noise.*NaN"):
        call(no_compute, session=session, prompt="x", latents=torch.full((1, 16, 64), float("nan")))


def test_load_session_checks_latents_against_the_model(pipe, session, tmp_path):
    session.save(tmp_path / "s")
    assert pipe.load_session(tmp_path / "s") == session
    bad = session.append(replace(session.turns[0], latents=torch.zeros(1, 9, 16)))
    bad.save(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"turns\[1\]\.latents has shape \(1, 9, 16\)"):
        pipe.load_session(tmp_path / "bad")


def test_prompt_over_max_sequence_length_is_refused_first(no_compute, session):
    long_prompt = "make the sign yellow and " * 400
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens long, above `max_sequence_length`=512 \(at most 1024"):
        call(no_compute, image=tiny_image(0), prompt=long_prompt)
    # max_sequence_length is the limit, for the prompt and for the "history" text (earlier instructions included)
    with pytest.raises(ValueError, match="above `max_sequence_length`=3"):
        call(no_compute, image=tiny_image(0), prompt="make the sign yellow", max_sequence_length=3)
    with pytest.raises(ValueError, match="above `max_sequence_length`=12"):
        call(no_compute, session=session, prompt="now black", reasoning="history", max_sequence_length=12)
    for bad in (2048, 0, 1.5):
        with pytest.raises(ValueError, match=r"`max_sequence_length` must be an int in \[1, 1024\]"):
            call(no_compute, image=tiny_image(0), prompt="x", max_sequence_length=bad)


def test_max_sequence_length_admits_what_fits(pipe, session):
    num_tokens = pipe.check_prompt_length("now make it black")
    out = call(pipe, session=session, prompt="now make it black", max_sequence_length=num_tokens)
    assert out.session.num_turns == 2
    # the generated intent is checked too, before it is encoded
    with pytest.raises(ValueError, match="conditioning text is"):
        pipe.prepare_conditioning(session, "now make it black", "intent", max_sequence_length=num_tokens - 1)


def test_text_beyond_the_rotary_positions_is_refused_before_the_transformer(pipe, session, monkeypatch):
    pos_embed = pipe.transformer.pos_embed
    monkeypatch.setattr(pos_embed, "pos_freqs", pos_embed.pos_freqs[:20])  # a table too short for the text
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: pytest.fail("the transformer ran"))
    with pytest.raises(ValueError, match=r"exceeds the transformer's 20 rotary positions; pass a smaller"):
        call(pipe, session=session, prompt="now make it black")


def test_exif_rotated_jpeg_is_edited_upright(pipe, tmp_path):
    from PIL import ImageOps

    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    photo = Image.open(tmp_path / "photo.jpg")
    upright = ImageOps.exif_transpose(photo)
    assert photo.size == (48, 32) and upright.size == (32, 48)
    out = call(pipe, image=photo, prompt="make it red", height=48, width=32)
    assert np.array_equal(np.asarray(out.session.source_image), np.asarray(upright))
    assert "original_size" not in out.session.meta  # the upright image is already the working size


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"generator": 0}, r"`generator` must be a torch\.Generator or None, got int; pass e\.g\. torch\.Generator"),
        ({"generator": [torch.Generator()]}, r"`generator` must be a torch\.Generator.*edit_session"),
        ({"sigmas": []}, r"`sigmas` must be a non-empty list .*numpy\.linspace"),
        ({"sigmas": [1.0, float("nan")]}, r"`sigmas` must hold finite noise levels in \(0, 1\]"),
        ({"sigmas": [2.0, 0.5]}, r"`sigmas` must hold finite noise levels"),
        ({"reference_area": 0}, r"`reference_area` must be a positive number of pixels, e\.g\. 1024 \* 1024, or None"),
        ({"reference_area": -5}, "`reference_area` must be a positive number"),
        ({"condition_area": 0}, r"`condition_area` must be a positive number of pixels, e\.g\. 384 \* 384"),
        ({"condition_area": 200}, r"`condition_area`=200 is too small for the session's 32x32 images.*at least 257"),
        ({"reference_area": 200}, r"`reference_area`=200 is too small"),
        ({"image": Image.new("RGB", (4000, 10))}, r"aspect ratio of 400:1.*at most 200:1\. Crop or pad"),
        ({"image": Image.new("RGB", (3000, 20)), "height": None, "width": None, "reference_area": 200},
         r"gives a working size of \d+x0; pass height= and width="),
        ({"template": "{oops} {instruction}"}, r"`template` must be a str with an \{instruction\}.*unknown fields"),
        ({"template": "Rewrite it."}, r"no \{instruction\} field"),
        ({"template": "{instruction"}, "does not parse"),
        ({"template": 5}, "got int"),
    ],
)
def test_deep_errors_are_caught_up_front(no_compute, kwargs, match):
    kwargs = {"image": tiny_image(0), "prompt": "make it red", "reasoning": "intent", **kwargs}
    with pytest.raises(ValueError, match=match):
        no_compute(**{**TINY_CALL_KWARGS, **kwargs})

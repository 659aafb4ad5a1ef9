"""EditR2Pipeline on tiny random components: peer parity with diffusers, multi-turn sessions, reasoning."""

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as upstream

from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_components, tiny_image, tiny_pipeline
from editr2.intent import Intent
from editr2.session import Session

# peer parity, reloads, chained vs scripted sessions: rerun under other CPU kernels by `make test-numerics`
pytestmark = pytest.mark.numerics


PROMPTS = ["make the sign yellow", "now make it black", "add a red ball on the left", "undo that"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Peer parity: reasoning="none" is diffusers' QwenImageEditPlusPipeline
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("cfg", [False, True])
def test_peer_parity_with_qwen_image_edit_plus(monkeypatch, cfg, steps):
    components = tiny_components(seed=0)
    reference = QwenImageEditPlusPipeline(**components)
    ours = EditR2Pipeline(**components)
    for p in (reference, ours):
        p.set_progress_bar_config(disable=True)
    # Upstream resizes references to 1 MP (VAE) and 384^2 (VLM); shrink its constants to our tiny sizes.
    monkeypatch.setattr(upstream, "VAE_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(upstream, "CONDITION_IMAGE_SIZE", 32 * 32)
    image = tiny_image(0)
    settings = dict(height=32, width=32, num_inference_steps=steps, true_cfg_scale=4.0 if cfg else 1.0)
    if cfg:
        settings["negative_prompt"] = "blurry"

    expected = reference(image=image, prompt=PROMPTS[0], generator=gen(3), output_type="np", **settings).images
    out = ours(
        image=image,
        prompt=PROMPTS[0],
        reasoning="none",
        generator=gen(3),
        output_type="np",
        reference_area=32 * 32,
        condition_area=32 * 32,
        **settings,
    )
    max_diff = np.abs(expected - out.images).max()
    assert out.images.shape == expected.shape == (1, 32, 32, 3)
    # Exactly equal, as the README says: both pipelines hold the same component objects (the same weights, in the same
    # memory) and run the same tensor operations in the same order, so every kernel computes the same sums.
    assert max_diff == 0.0, max_diff
    assert expected.std() > 0.01  # not a constant image

    latents_expected = reference(image=image, prompt=PROMPTS[0], generator=gen(3), output_type="latent", **settings)
    latents = ours(image=image, prompt=PROMPTS[0], reasoning="none", generator=gen(3), output_type="latent",
                   reference_area=32 * 32, condition_area=32 * 32, **settings)  # fmt: skip
    assert torch.equal(latents.images, latents_expected.images)  # the same computation (see above)
    # the session keeps exactly those latents, and the decoded image
    assert torch.equal(latents.session.turns[0].latents, latents.images)
    assert latents.session.turns[0].image.size == (32, 32)


@pytest.mark.parametrize("cfg", [False, True])
def test_public_pieces_with_editr2_flow_reproduce_the_call(pipe, cfg):
    """The RL trainer's path: prepare_conditioning + prepare_latents + prepare_timesteps + editr2.flow.sample (ODE)."""
    from editr2.flow import sample

    kwargs = dict(TINY_CALL_KWARGS, reasoning="none", num_inference_steps=5, output_type="latent")
    negative = "blurry" if cfg else None
    scale = 4.0 if cfg else 1.0
    out = pipe(image=tiny_image(1), prompt=PROMPTS[0], generator=gen(7), **{**kwargs, "true_cfg_scale": scale},
               negative_prompt=negative)  # fmt: skip

    session = pipe.start_session(tiny_image(1), 32, 32)
    conditioning = pipe.prepare_conditioning(session, PROMPTS[0], "none", negative, None, 32 * 32)
    noise = pipe.prepare_latents(1, 4, 32, 32, conditioning.prompt_embeds.dtype, "cpu", gen(7))
    timesteps, sigmas = pipe.prepare_timesteps(5, noise.shape[1])
    assert sigmas.shape == (6,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.equal(timesteps, sigmas[:-1] * 1000)
    latents = sample(pipe.velocity_fn(conditioning, scale), noise, sigmas).latents
    # Bit-equal: the same weights in the same memory, the same velocity function, and editr2.flow's Euler step is the
    # scheduler's operation for operation (test_flow.py), so the decoded images below are equal too.
    assert torch.equal(latents, out.images)
    session = pipe.finish_turn(conditioning, latents, PROMPTS[0], Intent(PROMPTS[0]))
    assert np.array_equal(np.asarray(session.current_image), np.asarray(out.session.current_image))


def _assert_same_weights(a, b):
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_save_pretrained_round_trip_identical(pipe, tiny_dir, tmp_path):
    image = tiny_image(1)
    before = pipe(image=image, prompt=PROMPTS[0], generator=gen(0), output_type="np", **TINY_CALL_KWARGS)
    pipe.save_pretrained(tmp_path / "again")
    # the saved weights come back bit for bit, in files byte-identical to the folder `pipe` was loaded from
    reloaded = EditR2Pipeline.from_pretrained(tmp_path / "again")
    reloaded.set_progress_bar_config(disable=True)
    _assert_same_weights(pipe, reloaded)
    for file in sorted(tiny_dir.rglob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "again" / file.relative_to(tiny_dir)).read_bytes(), file
    # Bit-equal outputs: both pipelines were loaded the same way from byte-identical files, so every weight has the
    # same memory layout (memory-mapped, at the same offsets) and every kernel runs the same computation.
    after = reloaded(image=image, prompt=PROMPTS[0], generator=gen(0), output_type="np", **TINY_CALL_KWARGS)
    assert np.array_equal(before.images, after.images)
    assert before.intents == after.intents
    # The in-memory pipeline of the same seed (the folder was built from tiny_pipeline(seed=0)) has the same weights
    # in another memory layout: a memory-mapped weight need not be 16-byte aligned, and BLAS kernels (MKL's
    # matrix-vector product) may sum in another order for unaligned operands. Equal to a tolerance, not bit for bit.
    built = tiny_pipeline(seed=0)
    _assert_same_weights(pipe, built)
    fresh = built(image=image, prompt=PROMPTS[0], generator=gen(0), output_type="np", **TINY_CALL_KWARGS)
    assert np.abs(before.images - fresh.images).max() <= 1e-5


def test_output_types_and_callback(pipe):
    image = tiny_image(2)
    kwargs = dict(TINY_CALL_KWARGS, reasoning="none")
    pil = pipe(image=image, prompt="x", generator=gen(0), **kwargs)
    np_out = pipe(image=image, prompt="x", generator=gen(0), output_type="np", **kwargs)
    pt_out = pipe(image=image, prompt="x", generator=gen(0), output_type="pt", **kwargs)
    assert np.array_equal(np.asarray(pil.images[0]), np.asarray(pil.session.current_image))
    assert np_out.images.shape == (1, 32, 32, 3) and pt_out.images.shape == (1, 3, 32, 32)
    assert np.allclose(pt_out.images.permute(0, 2, 3, 1).numpy(), np_out.images)

    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": tensors["latents"] * 0}  # zero the latents after every step

    zeroed = pipe(image=image, prompt="x", generator=gen(0), output_type="latent", callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kwargs)  # fmt: skip
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == (1, 16, 16)
    assert torch.count_nonzero(zeroed.images) == 0

    def interrupt(p, step, timestep, tensors):
        p._interrupt = True
        return {}

    pipe(image=image, prompt="x", generator=gen(0), callback_on_step_end=interrupt, **kwargs)
    assert pipe.num_timesteps == 3


def test_cfg_without_negative_prompt_warns(pipe, caplog):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    try:
        kwargs = dict(TINY_CALL_KWARGS, true_cfg_scale=4.0, reasoning="none")
        with caplog.at_level("WARNING"):
            pipe(image=tiny_image(0), prompt="x", **kwargs)
        assert "negative_prompt" in caplog.text and "drift" in caplog.text
    finally:
        diffusers_logging.disable_propagation()


# ---------------------------------------------------------------------------------------------------------------------
# Multi-turn sessions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reasoning", ["intent", "history"])
@pytest.mark.slow
def test_call_chain_equals_edit_session(pipe, reasoning):
    image = tiny_image(3)
    kwargs = dict(TINY_CALL_KWARGS, reasoning=reasoning)
    scripted = pipe.edit_session(image, PROMPTS, generator=[gen(10 + k) for k in range(4)], **kwargs)

    session, images = None, []
    for k, prompt in enumerate(PROMPTS):
        start = image if session is None else None
        out = pipe(image=start, prompt=prompt, session=session, generator=gen(10 + k), **kwargs)
        session = out.session
        images += out.images
    assert session.num_turns == scripted.session.num_turns == 4
    assert session.instructions == PROMPTS
    assert scripted.intents == session.intents
    for a, b in zip(images, scripted.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(session.turns, scripted.session.turns):
        assert torch.equal(a.latents, b.latents)
    if reasoning != "intent":
        return
    # one shared generator also gives the same as chaining with that generator
    shared = pipe.edit_session(image, PROMPTS[:2], generator=gen(5), **kwargs)
    g = gen(5)
    first = pipe(image=image, prompt=PROMPTS[0], generator=g, **kwargs)
    second = pipe(prompt=PROMPTS[1], session=first.session, generator=g, **kwargs)
    assert np.array_equal(np.asarray(shared.images[1]), np.asarray(second.images[0]))


def test_turn_latent_is_carried_without_decode_encode(pipe, monkeypatch):
    out = pipe(image=tiny_image(4), prompt=PROMPTS[0], generator=gen(0), **TINY_CALL_KWARGS)
    calls = []
    original = EditR2Pipeline.encode_image
    counting = lambda self, *args, **kwargs: calls.append(args) or original(self, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(EditR2Pipeline, "encode_image", counting)
    conditioning = pipe.prepare_conditioning(out.session, PROMPTS[1], reference_area=None, condition_area=32 * 32)
    assert calls == []  # neither the source nor the turn image is VAE-encoded again
    assert torch.equal(conditioning.image_latents, out.session.turns[0].latents)
    assert conditioning.img_shapes == [[(1, 4, 4), (1, 4, 4)]]

    history = pipe.prepare_conditioning(out.session, PROMPTS[1], "history", reference_area=None,
                                        condition_area=32 * 32, max_history_images=2)  # fmt: skip
    assert calls == []
    assert len(history.img_shapes[0]) == 3  # target, current image, source
    assert torch.equal(history.image_latents[:, :16], out.session.turns[0].latents)
    assert torch.equal(history.image_latents[:, 16:], out.session.source_latents)


def test_history_mode_limits_references(pipe):
    out = pipe.edit_session(tiny_image(5), PROMPTS, generator=gen(1), reasoning="history", max_history_images=2,
                            **TINY_CALL_KWARGS)  # fmt: skip
    last = out.session.turns[-1]
    assert last.intent.startswith("Earlier instructions: (1) make the sign yellow")
    assert last.intent.endswith("Current instruction: undo that")
    conditioning = pipe.prepare_conditioning(out.session, "x", "history", reference_area=None, condition_area=32 * 32,
                                             max_history_images=2)  # fmt: skip
    assert len(conditioning.img_shapes[0]) == 1 + 1 + 2
    none = pipe.prepare_conditioning(out.session, "x", "history", reference_area=None, max_history_images=0)
    assert len(none.img_shapes[0]) == 2


def test_save_load_continue_equals_uninterrupted(pipe, tmp_path):
    # Per-turn generators make turn k independent of how the earlier turns were run, so the first four turns of
    # the uninterrupted run are exactly what an interrupted run saved (test_call_chain_equals_edit_session).
    prompts = PROMPTS + ["make the background white"]
    full = pipe.edit_session(tiny_image(6), prompts, generator=[gen(20 + k) for k in range(5)], **TINY_CALL_KWARGS)

    full.session.truncate(4).save(tmp_path / "s")
    restored = Session.load(tmp_path / "s")
    assert restored == full.session.truncate(4)
    pipe.reasoning_prefix_cache.clear()  # a fresh process has no reasoning cache either
    fifth = pipe(prompt=prompts[4], session=restored, generator=gen(24), **TINY_CALL_KWARGS)
    # Bit-equal although the restored latents were read from a (memory-mapped) safetensors file: prepare_conditioning
    # copies every reference latent (torch.cat) before any kernel reads it, so both runs compute on the same values in
    # the same kind of memory. `make test-numerics` reruns this under kernels that would expose an unaligned operand.
    assert np.array_equal(np.asarray(fifth.images[0]), np.asarray(full.images[4]))
    assert torch.equal(fifth.session.turns[4].latents, full.session.turns[4].latents)
    assert fifth.intents[0] == full.intents[4]


def test_branching_does_not_mutate(pipe):
    base = pipe.edit_session(tiny_image(7), PROMPTS[:2], generator=gen(2), **TINY_CALL_KWARGS).session
    turns_before = base.turns
    latents_before = [t.latents.clone() for t in base.turns]

    a = pipe(prompt="make it green", session=base, generator=gen(3), **TINY_CALL_KWARGS).session
    b = pipe(prompt="make it purple and huge", session=base, generator=gen(4), **TINY_CALL_KWARGS).session
    assert base.num_turns == 2 and base.turns is turns_before
    assert all(torch.equal(t.latents, l) for t, l in zip(base.turns, latents_before))
    assert a.turns[:2] == base.turns and a.turns[0] is base.turns[0]  # shared, not copied
    assert a.turns[0].latents is base.turns[0].latents
    assert a.num_turns == b.num_turns == 3
    assert not torch.equal(a.turns[2].latents, b.turns[2].latents)

    # undo: continuing a truncated session equals continuing the session that had that many turns
    undone = pipe(prompt="make it green", session=a.truncate(2), generator=gen(3), **TINY_CALL_KWARGS).session
    assert torch.equal(undone.turns[2].latents, a.turns[2].latents)


# ---------------------------------------------------------------------------------------------------------------------
# Reasoning
# ---------------------------------------------------------------------------------------------------------------------


def test_unparsable_reasoning_falls_back_and_is_recorded(pipe):
    # The random tiny VLM never writes "</think>": the instruction is used and the reason recorded.
    out = pipe.edit_session(tiny_image(8), PROMPTS[:2], generator=gen(0), **TINY_CALL_KWARGS)
    for turn, prompt in zip(out.session.turns, PROMPTS):
        assert turn.intent == prompt
        assert turn.fallback_reason == "no_think_end_tag"
        assert turn.meta["reasoning"] == "intent"
        assert set(turn.timings) == {"reasoning", "encode", "denoise", "decode", "total"}


def test_parsed_intent_conditions_the_edit(pipe, monkeypatch):
    answer = "<think>Turn 1 made the sign yellow; it is the sign.</think>Make the sign black."
    answer_ids = pipe.tokenizer(answer, return_tensors="pt").input_ids
    real_generate = pipe.text_encoder.generate

    def scripted_generate(**kwargs):
        out = real_generate(**{**kwargs, "max_new_tokens": 1})
        out.sequences = torch.cat([kwargs["input_ids"], answer_ids], dim=1)
        return out

    monkeypatch.setattr(pipe.text_encoder, "generate", scripted_generate)
    first = pipe(image=tiny_image(9), prompt=PROMPTS[0], generator=gen(0), reasoning="none", **TINY_CALL_KWARGS)
    second = pipe(prompt=PROMPTS[1], session=first.session, generator=gen(1), **TINY_CALL_KWARGS)
    turn = second.session.turns[1]
    assert second.intents == ["Make the sign black."] and turn.intent == "Make the sign black."
    assert turn.reasoning == "Turn 1 made the sign yellow; it is the sign."
    assert turn.fallback_reason is None and turn.instruction == PROMPTS[1]
    # the intent, not the raw instruction, conditioned the edit
    as_none = pipe(prompt="Make the sign black.", session=first.session, generator=gen(1), reasoning="none",
                   **TINY_CALL_KWARGS)  # fmt: skip
    assert torch.equal(as_none.session.turns[1].latents, turn.latents)


def test_reasoning_request_holds_history_rules_and_image(pipe):
    kwargs = dict(TINY_CALL_KWARGS, reasoning="none")
    session = pipe.edit_session(tiny_image(10), PROMPTS[:2], generator=gen(0), **kwargs).session
    session = session.with_rule("keep the background white")
    inputs = pipe.prepare_reasoning_inputs(session, "make it blue", condition_area=32 * 32)
    text = pipe.tokenizer.decode(inputs["input_ids"][0])
    assert "Turn 1: make the sign yellow" in text and "Turn 2: now make it black" in text
    assert "keep the background white" in text and 'Current instruction: "make it blue"' in text
    assert text.index("make it blue") < text.index("<|vision_start|>")  # the image comes last
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_sampled_reasoning_is_seeded_by_the_generator(pipe):
    session = Session(source_image=tiny_image(11))
    kwargs = dict(max_new_tokens=12, temperature=1.5, condition_area=32 * 32)
    a = pipe.generate_reasoning(session, "make it blue", generator=gen(1), **kwargs)[2]
    b = pipe.generate_reasoning(session, "make it blue", generator=gen(1), **kwargs)[2]
    c = pipe.generate_reasoning(session, "make it blue", generator=gen(2), **kwargs)[2]
    greedy = pipe.generate_reasoning(session, "make it blue", max_new_tokens=12, condition_area=32 * 32)[2]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, greedy)


def test_reasoning_prefix_cache_is_used_and_exact(pipe):
    session = pipe.edit_session(tiny_image(12), PROMPTS[:3], generator=gen(0), reasoning="none",
                                **TINY_CALL_KWARGS).session  # fmt: skip
    te = pipe.text_encoder
    inputs = pipe.prepare_reasoning_inputs(session, "make it blue", condition_area=32 * 32)
    g = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    uncached = te.generate(**inputs, **g)

    # the previous turn's request leaves its text prefix in the cache
    pipe.reasoning_prefix_cache.clear()
    pipe.generate_reasoning(session.truncate(2), PROMPTS[2], max_new_tokens=2, condition_area=32 * 32)
    cache = pipe.reasoning_prefix_cache.lookup(te, inputs)
    assert cache is not None
    prefix_len = cache.get_seq_length()
    assert 100 < prefix_len < int((inputs["input_ids"][0] == te.config.vision_start_token_id).nonzero()[0])
    cached = te.generate(**inputs, past_key_values=cache, **g)
    assert torch.equal(cached.sequences, uncached.sequences)
    for x, y in zip(cached.scores, uncached.scores):
        assert torch.allclose(x, y, atol=1e-5)

    # a weight change invalidates it
    pipe.generate_reasoning(session.truncate(2), PROMPTS[2], max_new_tokens=2, condition_area=32 * 32)
    with torch.no_grad():
        te.lm_head.weight.mul_(1.0)
    assert pipe.reasoning_prefix_cache.lookup(te, inputs) is None

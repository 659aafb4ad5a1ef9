"""A separate reasoning model: it writes the intents with its own tokenizer and image size, the text encoder keeps
encoding the prompts; saved and loaded as two optional pipeline components."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig

from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
from diffusers_editr2.testing import (
    TINY_CALL_KWARGS,
    tiny_components,
    tiny_image,
    tiny_pipeline,
    tiny_reasoning_components,
)
from editr2.session import Session

# loaded (memory-mapped) vs in-memory reasoners compared: rerun under other CPU kernels by `make test-numerics`
pytestmark = pytest.mark.numerics

KWARGS = dict(TINY_CALL_KWARGS, output_type="np", max_new_tokens=6)
PROMPT = "make the square red"


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes():
    """The same tiny pipeline with and without a separate reasoner, and the reasoner alone as a pipeline's text
    encoder (with its own tokenizer and processor)."""
    with_reasoner = tiny_pipeline(seed=0, reasoning_model=True)
    without = tiny_pipeline(seed=0)
    parts = tiny_reasoning_components(seed=1)
    alone = EditR2Pipeline(**{**tiny_components(0), "text_encoder": parts["reasoning_model"],
                              "processor": parts["reasoning_processor"],
                              "tokenizer": parts["reasoning_processor"].tokenizer})
    for pipe in (with_reasoner, without, alone):
        pipe.set_progress_bar_config(disable=True)
    return with_reasoner, without, alone


def test_the_reasoning_model_writes_the_intents(pipes):
    with_reasoner, without, alone = pipes
    assert with_reasoner.reasoner is with_reasoner.reasoning_model
    assert without.reasoner is without.text_encoder and without.reasoner_processor is without.processor
    assert len(with_reasoner.reasoner_processor.tokenizer) != len(with_reasoner.tokenizer)  # its own vocabulary
    session = Session(source_image=tiny_image(3))
    ids = with_reasoner.generate_reasoning(session, PROMPT, max_new_tokens=12, condition_area=32 * 32)[2]
    # the same model, the same request: the same tokens as the reasoner asked on its own
    assert torch.equal(ids, alone.generate_reasoning(session, PROMPT, max_new_tokens=12, condition_area=32 * 32)[2])
    assert not torch.equal(ids, without.generate_reasoning(session, PROMPT, max_new_tokens=12,
                                                           condition_area=32 * 32)[2])


@pytest.mark.parametrize("reasoning", ["none", "history"])
def test_modes_without_reasoning_do_not_change(pipes, reasoning):
    """`none` and `history` never run the reasoner: the same images as the pipeline without one (same components,
    same operations)."""
    with_reasoner, without, _ = pipes
    a = with_reasoner.edit_session(tiny_image(1), [PROMPT, "now remove it"], generator=[gen(0), gen(1)],
                                   reasoning=reasoning, **KWARGS)
    b = without.edit_session(tiny_image(1), [PROMPT, "now remove it"], generator=[gen(0), gen(1)],
                             reasoning=reasoning, **KWARGS)
    assert np.array_equal(a.images, b.images)


def test_the_text_encoder_encodes_the_intent(pipes):
    """With `reasoning="intent"`, the transformer is conditioned on the reasoner's intent encoded by the text encoder:
    the same image as the intent passed as the prompt with `reasoning="none"`."""
    with_reasoner, _, _ = pipes
    out = with_reasoner(image=tiny_image(2), prompt=PROMPT, generator=gen(0), reasoning="intent", **KWARGS)
    intent = out.intents[0]
    same = with_reasoner(image=tiny_image(2), prompt=intent, generator=gen(0), reasoning="none", **KWARGS)
    assert np.array_equal(out.images, same.images)


@pytest.fixture
def reasoning_areas(monkeypatch):
    """The `condition_area` of every reasoning request (`prepare_reasoning_inputs` calls), in order."""
    seen = []
    original = EditR2Pipeline.prepare_reasoning_inputs

    def spy(self, session, prompt, template=None, condition_area=None, device=None):
        seen.append(condition_area)
        return original(self, session, prompt, template, condition_area, device)

    monkeypatch.setattr(EditR2Pipeline, "prepare_reasoning_inputs", spy)
    return seen


def test_reasoning_condition_area_sets_what_the_reasoner_sees(pipes, reasoning_areas):
    with_reasoner, _, _ = pipes
    seen = reasoning_areas
    with_reasoner(image=tiny_image(2), prompt=PROMPT, generator=gen(0), **KWARGS)
    with_reasoner(image=tiny_image(2), prompt=PROMPT, generator=gen(0), reasoning_condition_area=48 * 48, **KWARGS)
    assert seen == [KWARGS["condition_area"], 48 * 48]  # None: condition_area
    for bad in (0, -5, float("nan"), "big"):
        with pytest.raises(ValueError, match="reasoning_condition_area"):
            with_reasoner(image=tiny_image(2), prompt=PROMPT, reasoning_condition_area=bad, **KWARGS)
    assert len(seen) == 2  # refused before any model ran


def test_save_and_load_keep_the_reasoner(pipes, tmp_path):
    with_reasoner, _, _ = pipes
    with_reasoner.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["reasoning_model"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert (tmp_path / "m" / "reasoning_model" / "model.safetensors").is_file()
    loaded = EditR2Pipeline.from_pretrained(tmp_path / "m")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.reasoner is loaded.reasoning_model and loaded.reasoning_model is not loaded.text_encoder
    session = Session(source_image=tiny_image(3))
    ask = dict(max_new_tokens=12, condition_area=32 * 32)
    assert torch.equal(loaded.generate_reasoning(session, PROMPT, **ask)[2],
                       with_reasoner.generate_reasoning(session, PROMPT, **ask)[2])


def test_a_folder_without_a_reasoner_loads_as_before(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index.get("reasoning_model") in (None, [None, None])
    pipe = EditR2Pipeline.from_pretrained(tiny_dir)
    assert pipe.reasoning_model is None and pipe.reasoner is pipe.text_encoder


def test_a_reasoner_needs_its_processor():
    parts = tiny_reasoning_components()
    with pytest.raises(ValueError, match="both `reasoning_model` and `reasoning_processor`"):
        EditR2Pipeline(**tiny_components(0), reasoning_model=parts["reasoning_model"])


def test_a_reasoning_lora_goes_on_the_reasoner(tmp_path):
    pipe = tiny_pipeline(seed=0, reasoning_model=True)
    session = Session(source_image=tiny_image(2))
    ask = dict(max_new_tokens=10, condition_area=32 * 32)
    base_ids = pipe.generate_reasoning(session, PROMPT, **ask)[2]
    base_embeds, _ = pipe.encode_prompt(PROMPT, [tiny_image(2)])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        pipe.reasoning_model.add_adapter(config, adapter_name="reasoning")
    lora_ids = pipe.generate_reasoning(session, PROMPT, **ask)[2]
    assert not torch.equal(lora_ids, base_ids)
    assert torch.equal(pipe.encode_prompt(PROMPT, [tiny_image(2)])[0], base_embeds)
    with pytest.raises(ValueError, match="reasoning_model has a reasoning LoRA"):
        pipe.save_pretrained(tmp_path / "refused")
    pipe.save_reasoning_lora(tmp_path / "lora")
    fresh = tiny_pipeline(seed=0, reasoning_model=True)
    fresh.load_reasoning_lora(tmp_path / "lora")
    assert not getattr(fresh.text_encoder, "_hf_peft_config_loaded", False)
    assert torch.equal(fresh.generate_reasoning(session, PROMPT, **ask)[2], lora_ids)


# ---------------------------------------------------------------------------------------------------------------------
# RL: the reasoning LoRA trains the reasoner
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rl_trainer(tmp_path_factory):
    from trl_editr2.testing import pixel_hash_reward, tiny_trainer

    return tiny_trainer(tmp_path_factory.mktemp("reasoner_rl"), reward_funcs=(pixel_hash_reward,),
                        reasoning_model=True, reasoning_condition_area=48 * 48, reasoning_temperature=1.0,
                        trajectory_filter="none")


def test_the_trainer_adds_the_reasoning_lora_to_the_reasoner(rl_trainer):
    pipe = rl_trainer.policy.pipeline
    assert "reasoning" in pipe.reasoning_model.peft_config
    assert not getattr(pipe.text_encoder, "_hf_peft_config_loaded", False)
    assert rl_trainer.policy.text_encoder is pipe.reasoning_model  # the policy scores the reasoner's tokens
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_rollouts_ask_the_reasoner_at_its_area_and_stay_on_policy(rl_trainer, reasoning_areas):
    from trl_editr2.policy import LossWeights
    from trl_editr2.rollout import rollout_sessions
    from trl_editr2.testing import tiny_dataset

    policy = rl_trainer.policy
    with torch.no_grad():  # the reasoning adapter away from the identity, so the ratio check is not trivial
        generator = torch.Generator().manual_seed(1)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    policy.eval()
    (session,) = rollout_sessions(policy, [tiny_dataset()[0]], rl_trainer.args, [7])
    assert reasoning_areas and set(reasoning_areas) == {48 * 48}
    policy.train()
    try:
        ones = torch.ones(2, dtype=torch.bool)
        out = policy(session.turns[0], LossWeights(torch.tensor([1.0, -1.0]), ones, ones, 1.0))
        assert torch.equal(out["ratio_text"], torch.ones_like(out["ratio_text"]))
    finally:
        policy.eval()


def test_a_trained_reasoning_lora_loads_onto_the_reasoner(rl_trainer, tmp_path):
    from trl_editr2.trainer import REASONING_LORA_DIR

    rl_trainer.save_model(str(tmp_path / "out"))
    fresh = tiny_pipeline(seed=0, reasoning_model=True)
    fresh.load_reasoning_lora(str(tmp_path / "out" / REASONING_LORA_DIR))
    session = Session(source_image=tiny_image(2))
    ask = dict(max_new_tokens=8, condition_area=48 * 48)
    pipe = rl_trainer.policy.pipeline
    assert torch.equal(fresh.generate_reasoning(session, PROMPT, **ask)[2],
                       pipe.generate_reasoning(session, PROMPT, **ask)[2])


def test_a_fused_reasoning_lora_writes_the_same_intents_and_saves_as_plain_weights(tmp_path):
    pipe = tiny_pipeline(seed=0, reasoning_model=True)
    session = Session(source_image=tiny_image(2))
    ask = dict(max_new_tokens=10, condition_area=32 * 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        pipe.reasoning_model.add_adapter(config, adapter_name="reasoning")
    lora_ids = pipe.generate_reasoning(session, PROMPT, **ask)[2]
    tokens = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        lora_logits = pipe.reasoning_model(input_ids=tokens).logits
    pipe.fuse_reasoning_lora()
    assert not getattr(pipe.reasoning_model, "_hf_peft_config_loaded", False)
    assert not any("lora" in name for name, _ in pipe.reasoning_model.named_parameters())
    with torch.no_grad():  # merged weights: the same function, summed in another order
        torch.testing.assert_close(pipe.reasoning_model(input_ids=tokens).logits, lora_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(pipe.generate_reasoning(session, PROMPT, **ask)[2], lora_ids)
    pipe.save_pretrained(tmp_path / "fused")  # plain weights now: no refusal
    loaded = EditR2Pipeline.from_pretrained(tmp_path / "fused")
    assert torch.equal(loaded.generate_reasoning(session, PROMPT, **ask)[2], lora_ids)


def test_fusing_a_reasoning_lora_is_refused_where_it_would_lose_something():
    shared = tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match="also encodes the prompts"):
        shared.fuse_reasoning_lora()
    pipe = tiny_pipeline(seed=0, reasoning_model=True)
    with pytest.raises(ValueError, match="no adapter named 'reasoning'"):
        pipe.fuse_reasoning_lora()
    for name in ("reasoning", "other"):
        pipe.reasoning_model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name)
    with pytest.raises(ValueError, match="other adapters"):
        pipe.fuse_reasoning_lora()
    assert set(pipe.reasoning_model.peft_config) == {"reasoning", "other"}  # nothing changed


def test_a_reasoning_lora_loaded_by_transformers_itself_fuses_and_saves(tmp_path):
    """`reasoning_model.load_adapter` (not `load_reasoning_lora`) leaves the adapter's key renaming on the model; fusing
    drops it, so the saved reasoner has the base model's keys."""
    pipe = tiny_pipeline(seed=0, reasoning_model=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe.reasoning_model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=["q_proj"]), adapter_name="reasoning")
    pipe.save_reasoning_lora(tmp_path / "lora")
    fresh = tiny_pipeline(seed=0, reasoning_model=True)
    fresh.reasoning_model.load_adapter(str(tmp_path / "lora"), adapter_name="reasoning")
    session, ask = Session(source_image=tiny_image(2)), dict(max_new_tokens=10, condition_area=32 * 32)
    ids = fresh.generate_reasoning(session, PROMPT, **ask)[2]
    fresh.fuse_reasoning_lora()
    fresh.save_pretrained(tmp_path / "fused")
    assert torch.equal(EditR2Pipeline.from_pretrained(tmp_path / "fused").generate_reasoning(session, PROMPT, **ask)[2],
                       ids)

"""The tiny builders: a locally trained tokenizer, the image-only processor, and the six components."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline

from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor
from diffusers_editr2.testing import (
    QWEN_SPECIAL_TOKENS,
    THINK_TOKENS,
    qwen_image_scheduler_config,
    tiny_components,
    tiny_image,
    tiny_pipeline,
    tiny_processor,
    tiny_tokenizer,
)


def test_components_registered_like_qwen_image_edit_plus():
    pipe = tiny_pipeline(seed=0)
    upstream = inspect.signature(QwenImageEditPlusPipeline.__init__).parameters
    ours = inspect.signature(EditR2Pipeline.__init__).parameters
    # upstream's components in upstream's order, then the optional separate reasoner (None unless given)
    assert list(ours) == [*upstream, "reasoning_model", "reasoning_processor"]
    assert EditR2Pipeline._optional_components == ["reasoning_model", "reasoning_processor"]
    assert pipe.reasoning_model is None and pipe.reasoning_processor is None
    for name in upstream:
        if name != "self":
            assert isinstance(pipe.components[name], upstream[name].annotation), name  # the classes upstream annotates
    assert EditR2Pipeline.model_cpu_offload_seq == "reasoning_model->" + QwenImageEditPlusPipeline.model_cpu_offload_seq
    assert EditR2Pipeline._callback_tensor_inputs == QwenImageEditPlusPipeline._callback_tensor_inputs
    assert dict(pipe.scheduler.config).items() >= qwen_image_scheduler_config().items()
    for name in ("vae", "text_encoder", "transformer"):
        assert sum(p.numel() for p in pipe.components[name].parameters()) < 1_000_000, name  # tiny


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (tiny_components(seed) for seed in (0, 0, 1))
    for name in ("vae", "text_encoder", "transformer"):
        sa, sb, sc = (x[name].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point), name
    state = torch.random.get_rng_state()
    tiny_components(3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_tokenizer_files_are_deterministic(tmp_path):
    first = tiny_tokenizer(tmp_path / "a")
    second = tiny_tokenizer(tmp_path / "b")
    (dir_a,), (dir_b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert dir_a.name == dir_b.name and dir_a.name.startswith("tiny-qwen2-tokenizer-")
    files = sorted(p.name for p in dir_a.iterdir())
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    for name in files:
        assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes(), name
    assert first.get_vocab() == second.get_vocab() == tiny_tokenizer().get_vocab()
    assert tiny_tokenizer(tmp_path / "a").get_vocab() == first.get_vocab()  # loaded from the cache


def test_tokenizer_special_tokens_and_template():
    tok = tiny_tokenizer()
    assert 300 < len(tok) <= 1024
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + THINK_TOKENS]
    assert ids == list(range(len(ids)))  # single tokens, in Qwen's order
    text = "<|im_start|>user\nmake <|vision_start|><|image_pad|><|vision_end|> red<|im_end|>"
    encoded = tok(text).input_ids
    assert tok.convert_tokens_to_ids("<|image_pad|>") in encoded and len(encoded) < 15
    # <think> survives decoding without special tokens (the reasoning parser needs it); <|im_end|> does not
    answer = tok("<think>it is the sign</think>Make the sign red.<|im_end|>").input_ids
    assert tok.decode(answer, skip_special_tokens=True) == "<think>it is the sign</think>Make the sign red."
    content = [{"type": "text", "text": "hi"}, {"type": "image"}]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": content}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # the upstream prompt template's system prefix is >= 64 tokens, the number upstream drops
    pipe = tiny_pipeline(seed=0)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tok(prefix).input_ids) >= pipe.prompt_template_encode_start_idx


def test_processor_image_only_round_trip(tmp_path):
    processor = tiny_processor(tiny_tokenizer())
    text = ["Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it red"]
    out = processor(text=text, images=[tiny_image(0)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    n_image_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_image_tokens == 8 * 8 // 4 and out["pixel_values"].shape == (64, 3 * 2 * 4 * 4)

    processor.save_pretrained(tmp_path)
    reloaded = Qwen2VLImageOnlyProcessor.from_pretrained(tmp_path)
    again = reloaded(text=text, images=[tiny_image(0)], return_tensors="pt")
    for key in out:
        assert torch.equal(out[key], again[key]), key
    assert reloaded.chat_template == processor.chat_template
    with pytest.raises(ValueError, match="no video processor"):
        processor(text=text, videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])


def test_tiny_session_runs_in_seconds():
    from diffusers_editr2.testing import TINY_CALL_KWARGS

    out = tiny_pipeline(seed=0).edit_session(tiny_image(0), ["a", "b", "c", "d"], **TINY_CALL_KWARGS)
    assert out.session.num_turns == 4 and all(t.latents.shape == (1, 16, 16) for t in out.session.turns)

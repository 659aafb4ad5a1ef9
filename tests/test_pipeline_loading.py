"""EditR2Pipeline loading: the real Qwen-Image-Edit-2509 layout, and LoRAs (transformer and reasoning)."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor
from diffusers_editr2.testing import (
    QWEN_IMAGE_EDIT_PLUS_MODEL_INDEX,
    TINY_CALL_KWARGS,
    tiny_image,
    tiny_pipeline,
)
from editr2.session import Session

# loaded (memory-mapped) vs in-memory pipelines, LoRAs: rerun under other CPU kernels by `make test-numerics`
pytestmark = pytest.mark.numerics


KWARGS = dict(TINY_CALL_KWARGS, reasoning="none", output_type="np")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_real_qwen_image_edit_2509_layout_loads_unchanged(qwen_edit_plus_dir):
    folder = qwen_edit_plus_dir
    index_before = (folder / "model_index.json").read_text()
    assert json.loads(index_before) == QWEN_IMAGE_EDIT_PLUS_MODEL_INDEX
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {f"transformer/diffusion_pytorch_model-0000{k}-of-00005.safetensors" for k in range(1, 6)} <= files
    assert {f"text_encoder/model-0000{k}-of-00004.safetensors" for k in range(1, 5)} <= files
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "processor/preprocessor_config.json",
            "processor/video_preprocessor_config.json", "vae/diffusion_pytorch_model.safetensors"} <= files  # fmt: skip
    assert "tokenizer/tokenizer.json" not in files  # built from vocab.json + merges.txt, as upstream ships it

    pipe = EditR2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert (folder / "model_index.json").read_text() == index_before
    assert isinstance(pipe.processor, Qwen2VLImageOnlyProcessor)  # torchvision is absent here
    assert pipe.processor.image_processor.patch_size == 4

    image = tiny_image(0)
    built_pipe = tiny_pipeline(seed=0)
    for name in ("transformer", "vae", "text_encoder"):  # the sharded files hold exactly the built weights
        a, b = getattr(pipe, name).state_dict(), getattr(built_pipe, name).state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name
    loaded = pipe(image=image, prompt="make it red", generator=gen(0), **KWARGS)
    built = built_pipe(image=image, prompt="make it red", generator=gen(0), **KWARGS)
    # Same weights, other memory layout: memory-mapped weights need not be 16-byte aligned, and BLAS kernels (MKL's
    # matrix-vector product) may sum in another order for unaligned operands. Equal to a tolerance, not bit for bit.
    assert np.abs(loaded.images - built.images).max() <= 1e-5
    # intent mode runs too (generation through the loaded tokenizer, processor and chat template)
    assert pipe(image=image, prompt="make it red", generator=gen(0), **{**KWARGS, "reasoning": "intent"}).intents


def test_real_qwen_image_edit_2511_layout_loads_unchanged(qwen_edit_2511_dir, qwen_edit_plus_dir):
    folder = qwen_edit_2511_dir
    assert json.loads((folder / "model_index.json").read_text()) == QWEN_IMAGE_EDIT_PLUS_MODEL_INDEX
    assert json.loads((folder / "transformer" / "config.json").read_text())["zero_cond_t"] is True
    pipe = EditR2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.zero_cond_t is True
    assert all(block.zero_cond_t for block in pipe.transformer.transformer_blocks)

    image = tiny_image(0)
    loaded = pipe(image=image, prompt="make it red", generator=gen(0), **KWARGS)
    built = tiny_pipeline(seed=0, variant="2511")(image=image, prompt="make it red", generator=gen(0), **KWARGS)
    # memory-mapped (possibly unaligned) vs in-memory weights: equal to a tolerance (see the 2509 test above)
    assert np.abs(loaded.images - built.images).max() <= 1e-5
    # the same weights as the 2509 folder: only zero_cond_t differs, and it changes the edit
    pipe_2509 = EditR2Pipeline.from_pretrained(qwen_edit_plus_dir)
    pipe_2509.set_progress_bar_config(disable=True)
    for name, tensor in pipe_2509.transformer.state_dict().items():
        assert torch.equal(tensor, pipe.transformer.state_dict()[name]), name
    other = pipe_2509(image=image, prompt="make it red", generator=gen(0), **KWARGS)
    latent_diff = (other.session.turns[0].latents - loaded.session.turns[0].latents).abs().max()
    assert latent_diff > 1e-3, latent_diff
    # a multi-turn session with the reasoning step, guidance on (batched references through zero_cond_t)
    out = pipe.edit_session(image, ["make it red", "now make it blue"], generator=gen(1),
                            **{**KWARGS, "reasoning": "intent", "true_cfg_scale": 2.0, "negative_prompt": " "})
    assert out.session.num_turns == 2 and np.isfinite(out.images).all()


@pytest.mark.parametrize("cfg", [False, True])
def test_peer_parity_on_the_2511_layout(qwen_edit_2511_dir, monkeypatch, cfg):
    """reasoning="none" equals diffusers' QwenImageEditPlusPipeline for Qwen-Image-Edit-2511 (zero_cond_t) too."""
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as upstream

    ours = EditR2Pipeline.from_pretrained(qwen_edit_2511_dir)
    reference = QwenImageEditPlusPipeline.from_pipe(ours)  # the same component objects
    assert ours.transformer.config.zero_cond_t is True
    for p in (reference, ours):
        p.set_progress_bar_config(disable=True)
    monkeypatch.setattr(upstream, "VAE_IMAGE_SIZE", 32 * 32)  # upstream's reference sizes, shrunk to tiny
    monkeypatch.setattr(upstream, "CONDITION_IMAGE_SIZE", 32 * 32)
    image = tiny_image(0)
    settings = dict(height=32, width=32, num_inference_steps=3, true_cfg_scale=4.0 if cfg else 1.0)
    if cfg:
        settings["negative_prompt"] = "blurry"
    expected = reference(image=image, prompt="make it red", generator=gen(3), output_type="latent", **settings)
    out = ours(image=image, prompt="make it red", reasoning="none", generator=gen(3), output_type="latent",
               reference_area=32 * 32, condition_area=32 * 32, **settings)  # fmt: skip
    # the same computation on the same component objects: bit-equal
    assert torch.equal(out.images, expected.images)
    assert float(expected.images.std()) > 0.01


def test_tiny_components_refuse_an_unknown_variant():
    from diffusers_editr2.testing import tiny_components

    with pytest.raises(ValueError, match="2511"):
        tiny_components(variant="2512")


@pytest.mark.slow
def test_transformer_lora_save_load_reproduces_outputs(tmp_path):
    pipe = tiny_pipeline(seed=0)
    image = tiny_image(1)
    base = pipe(image=image, prompt="make it red", generator=gen(0), **KWARGS).images
    with torch.random.fork_rng():
        torch.manual_seed(0)
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        pipe.transformer.add_adapter(config)
    with_lora = pipe(image=image, prompt="make it red", generator=gen(0), **KWARGS).images
    assert np.abs(with_lora - base).max() > 1e-3

    pipe.save_transformer_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = tiny_pipeline(seed=0)
    fresh.load_lora_weights(tmp_path / "lora")
    reloaded = fresh(image=image, prompt="make it red", generator=gen(0), **KWARGS).images
    assert np.abs(reloaded - with_lora).max() <= 1e-6
    # diffusers' own call with the adapter config gives the same file
    EditR2Pipeline.save_lora_weights(
        tmp_path / "lora2",
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    again = tiny_pipeline(seed=0)
    again.load_lora_weights(tmp_path / "lora2")
    assert np.abs(again(image=image, prompt="make it red", generator=gen(0), **KWARGS).images - with_lora).max() <= 1e-6
    fresh.unload_lora_weights()
    assert np.abs(fresh(image=image, prompt="make it red", generator=gen(0), **KWARGS).images - base).max() <= 1e-6


def test_reasoning_lora_writes_but_does_not_encode(tmp_path):
    pipe = tiny_pipeline(seed=0)
    session = Session(source_image=tiny_image(2))
    kwargs = dict(max_new_tokens=10, condition_area=32 * 32)
    base_ids = pipe.generate_reasoning(session, "make it red", **kwargs)[2]
    base_embeds, _ = pipe.encode_prompt("make it red", [tiny_image(2)])

    with torch.random.fork_rng():
        torch.manual_seed(0)
        targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
        config = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False, target_modules=targets)
        pipe.text_encoder.add_adapter(config, adapter_name="reasoning")
    lora_ids = pipe.generate_reasoning(session, "make it red", **kwargs)[2]
    assert not torch.equal(lora_ids, base_ids)  # active while writing
    lora_embeds, _ = pipe.encode_prompt("make it red", [tiny_image(2)])
    assert torch.equal(lora_embeds, base_embeds)  # disabled while encoding
    with pytest.raises(ValueError, match="save_reasoning_lora"):
        pipe.save_pretrained(tmp_path / "refused")

    pipe.save_reasoning_lora(tmp_path / "reasoning")
    files = sorted(p.name for p in (tmp_path / "reasoning").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_pipeline(seed=0)
    fresh.load_reasoning_lora(tmp_path / "reasoning")
    assert torch.equal(fresh.generate_reasoning(session, "make it red", **kwargs)[2], lora_ids)
    assert torch.equal(fresh.encode_prompt("make it red", [tiny_image(2)])[0], base_embeds)
    # the whole turn: same intent, same image as the pipeline that trained the adapter
    a = pipe(image=tiny_image(2), prompt="make it red", generator=gen(0), **{**KWARGS, "reasoning": "intent"})
    b = fresh(image=tiny_image(2), prompt="make it red", generator=gen(0), **{**KWARGS, "reasoning": "intent"})
    assert a.session.turns[0].reasoning == b.session.turns[0].reasoning
    # bit-equal: both pipelines are built in memory, and load_reasoning_lora copies the adapter into new parameters
    assert np.array_equal(a.images, b.images)
    with pytest.raises(ValueError, match="no adapter named"):
        fresh.save_reasoning_lora(tmp_path / "x", adapter_name="other")


def test_from_pretrained_loads_every_component_in_one_dtype(tiny_dir, tmp_path):
    """A text encoder whose config names float16 (as the shipped checkpoint's does; Qwen-Image-Edit-2509's names
    bfloat16) loads in float32 like the rest unless `dtype` is given, so a call does not fail on mixed dtypes."""
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "half-config")
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float16"
    config_path.write_text(json.dumps(config))

    def dtypes(pipe):
        return {name: next(getattr(pipe, name).parameters()).dtype for name in ("text_encoder", "transformer", "vae")}

    pipe = EditR2Pipeline.from_pretrained(folder)
    assert set(dtypes(pipe).values()) == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=tiny_image(0), prompt="make it red", generator=gen(0), **{**KWARGS, "reasoning": "intent"})
    assert np.isfinite(out.images).all()
    assert set(dtypes(EditR2Pipeline.from_pretrained(folder, dtype=torch.bfloat16)).values()) == {torch.bfloat16}
    with pytest.warns(FutureWarning):  # diffusers' older name still works, and wins over the float32 default
        old_name = EditR2Pipeline.from_pretrained(folder, torch_dtype=torch.float16)
    assert set(dtypes(old_name).values()) == {torch.float16}


@pytest.mark.slow
def test_a_saved_pipeline_loads_in_a_fresh_process(tiny_dir):
    """Nothing but `from diffusers_editr2 import EditR2Pipeline` is needed to load a folder we saved."""
    import subprocess
    import sys

    code = (
        "import sys; from diffusers_editr2 import EditR2Pipeline; "
        "pipe = EditR2Pipeline.from_pretrained(sys.argv[1]); print(type(pipe.processor).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("Processor")

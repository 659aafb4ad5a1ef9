"""Memory features of diffusers on EditR2Pipeline: multi-turn sessions with the reasoning step, on tiny models.

On a CPU-only machine the offload tests onload to the CPU itself: they check that the hooks cover every component the
turn uses (the text encoder's `generate` included) and that the results do not change; the memory saving itself
needs an accelerator (`benchmarks/gpu_check.py` measures it per mode).
"""

import numpy as np
import pytest
import torch

from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_image, tiny_pipeline

PROMPTS = ["make the sign yellow", "now make it black", "undo that"]
KWARGS = dict(TINY_CALL_KWARGS, reasoning="intent", output_type="np", true_cfg_scale=2.0, negative_prompt=" ")


def run_session(pipe):
    generators = [torch.Generator().manual_seed(k) for k in range(len(PROMPTS))]
    return pipe.edit_session(tiny_image(0), PROMPTS, generator=generators, **KWARGS)


@pytest.fixture(scope="module")
def reference():
    return run_session(tiny_pipeline(seed=0))


def count_forwards(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def test_model_cpu_offload_covers_the_reasoning_step(reference):
    pipe = tiny_pipeline(seed=0)
    pipe.enable_model_cpu_offload(device="cpu")
    for name in ("text_encoder", "transformer", "vae"):
        assert hasattr(getattr(pipe, name), "_hf_hook"), name
    generate_calls = count_forwards(pipe.text_encoder)
    out = run_session(pipe)
    assert len(generate_calls) > len(PROMPTS)  # reasoning (generate) and prompt encoding ran through the hooks
    assert out.intents == reference.intents
    np.testing.assert_allclose(out.images, reference.images, atol=1e-6, rtol=0)


def test_model_cpu_offload_covers_a_separate_reasoner():
    """`reasoning_model` is first in `model_cpu_offload_seq`: its `generate` runs through its own offload hook."""
    reference = run_session(tiny_pipeline(seed=0, reasoning_model=True))
    pipe = tiny_pipeline(seed=0, reasoning_model=True)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.reasoning_model, "_hf_hook")
    reasoner_calls, encoder_calls = count_forwards(pipe.reasoning_model), count_forwards(pipe.text_encoder)
    out = run_session(pipe)
    assert len(reasoner_calls) > len(PROMPTS) and len(encoder_calls) >= len(PROMPTS)
    assert out.intents == reference.intents
    np.testing.assert_allclose(out.images, reference.images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_covers_the_reasoning_step(reference, offload_type):
    pipe = tiny_pipeline(seed=0)
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    cpu = torch.device("cpu")
    pipe.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **options)
    for name in ("text_encoder", "transformer", "vae"):
        assert getattr(getattr(pipe, name), "_diffusers_hook", None) is not None or any(
            getattr(m, "_diffusers_hook", None) is not None for m in getattr(pipe, name).modules()
        ), name
    out = run_session(pipe)
    assert out.intents == reference.intents
    np.testing.assert_allclose(out.images, reference.images, atol=1e-6, rtol=0)


def test_layerwise_fp8_storage_runs_a_session(reference):
    pipe = tiny_pipeline(seed=0)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    out = run_session(pipe)
    assert out.intents == reference.intents  # the text encoder is untouched
    assert np.isfinite(out.images).all()
    # fp8 weights move the edit a little, not a lot (tiny random weights: a loose bound)
    assert np.abs(out.images - reference.images).max() < 0.1
    assert out.session.turns[-1].latents.dtype == torch.float32


def test_torch_dtype_per_component(tiny_dir):
    pipe = EditR2Pipeline.from_pretrained(
        tiny_dir, torch_dtype={"transformer": torch.bfloat16, "default": torch.float32}
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    out = run_session(pipe)
    assert len(out.intents) == len(PROMPTS) and np.isfinite(out.images).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential CPU offload runs its layers on an accelerator")
def test_sequential_cpu_offload_runs_a_session(reference):
    pipe = tiny_pipeline(seed=0)
    pipe.enable_sequential_cpu_offload()
    out = run_session(pipe)
    assert len(out.intents) == len(PROMPTS) and np.isfinite(out.images).all()


@pytest.mark.slow
def test_gpu_check_memory_table_smoke(capsys):
    """`benchmarks/gpu_check.py --memory` (CPU dry run): a row per memory mode."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.memory_table(module.parse_args(["--smoke", "--memory"]))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 |")]
    assert {row.split("|")[2].strip() for row in rows} >= set(module.MEMORY_MODES)

"""benchmarks/gpu_plan_check.py at tiny size on CPU: the same code paths as the GPU check, measured next to the plan."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_plan_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_plan_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_plan_check_runs_tiny_on_cpu(capsys):
    result = _load().main(["--tiny", "--steps", "1"])
    rows = {row["part"]: row for row in result["rows"]}
    assert result["device"] == "CPU"
    for part in ("rollout peak (GiB)", "learning peak (GiB)"):
        row = rows[part]
        assert row["measured"] > 0 and row["planned"] > 0
        assert 0.5 <= row["measured"] / row["planned"] <= 2.0, row  # the planner within 2x on a whole tiny step
    assert rows["step (s)"]["measured"] > 0 and math.isfinite(rows["step (s)"]["planned"])
    out = capsys.readouterr().out
    assert "| learning peak (GiB) |" in out and "extrapolated to full depth" in out


def test_real_width_pipeline_builds_with_few_layers():
    """The GPU path's components: real widths, the requested layers, the tokenizer's vocabulary (built on meta)."""
    from argparse import Namespace

    import torch

    from diffusers_editr2.testing import tiny_tokenizer
    from trl_editr2.plan import load_model_configs

    module = _load()
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>",
                                                           "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    layers = Namespace(transformer_layers=2, text_layers=1, vision_layers=1)
    configs = module.check_configs(load_model_configs("qwen_image_edit_2509"), layers, len(tokenizer), ids)
    pipe = module.build_pipeline(configs, tokenizer, "meta", torch.bfloat16)
    assert len(pipe.transformer.transformer_blocks) == 2
    assert pipe.transformer.config.joint_attention_dim == 3584
    text = pipe.text_encoder.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (1, 3584, len(tokenizer))
    assert pipe.text_encoder.config.image_token_id == ids["<|image_pad|>"]

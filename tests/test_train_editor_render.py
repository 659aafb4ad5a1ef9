"""The editor stage's opt-in `render: torch` batch path: the PIL path's batch, rendered on the training device."""

import json

import pytest
import torch
from test_train_default import _assert_same, _editor_cfg, _weights, stages  # noqa: F401 (stages: a fixture)

from recipes.shapes_tiny import train_editor


def test_render_field_is_checked():
    assert train_editor.EditorConfig().render == "pil"  # the shipped configs' path
    with pytest.raises(ValueError, match="render='opengl': pass one of"):
        train_editor.EditorConfig(render="opengl")


@pytest.mark.numerics
@pytest.mark.parametrize("batch_text_encoding", [False, True])
@pytest.mark.slow
def test_torch_render_batch_matches_the_pil_batch(stages, batch_text_encoding):  # noqa: F811
    pil_cfg = _editor_cfg(stages, batch_size=4, batch_text_encoding=batch_text_encoding)
    torch_cfg = _editor_cfg(stages, batch_size=4, batch_text_encoding=batch_text_encoding, render="torch")
    pipe = train_editor.build_pipeline(pil_cfg)
    pil = train_editor.example_batch(pipe, pil_cfg, step=7)
    scenes = train_editor.example_batch(pipe, torch_cfg, step=7)
    assert "target_scenes" in scenes and "target_pixels" not in scenes  # the targets are drawn on the device
    ours = train_editor.render_examples(pipe, torch_cfg, scenes)
    for key in ("reference_pixels", "target_pixels"):
        assert ours[key].shape == pil[key].shape
        torch.testing.assert_close(ours[key], pil[key], atol=2.5 / 255, rtol=0)  # a rounding step at most
    cond_pil, x0_pil = train_editor.make_batch(pipe, pil_cfg, 7, pil)
    cond, x0 = train_editor.make_batch(pipe, torch_cfg, 7, scenes)
    torch.testing.assert_close(x0, x0_pil, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(cond.image_latents, cond_pil.image_latents, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(cond.prompt_embeds, cond_pil.prompt_embeds, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_editor_trains_and_resumes_exactly_with_torch_render(stages, tmp_path):  # noqa: F811
    cfg = _editor_cfg(stages, max_steps=2, render="torch", batch_text_encoding=True)
    train_editor.train(cfg, tmp_path / "full", show_progress=False, stop_after=2)
    rows = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert train_editor.train(cfg, tmp_path / "split", show_progress=False, stop_after=1) is None
    train_editor.train(cfg, tmp_path / "split", show_progress=False, stop_after=2)
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "split"))  # batches depend on (seed, step) only

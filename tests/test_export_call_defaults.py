"""recipes/shapes_tiny/export.call_defaults: an exported model is called as its reasoner was trained."""

import json

import pytest

from recipes.shapes_tiny import common
from recipes.shapes_tiny.export import call_defaults


def test_call_defaults_follow_the_reasoners_training(tmp_path):
    run = tmp_path / "reasoner_run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"condition_size": 64, "max_new_tokens": 112, "template": "short"}))
    kwargs = call_defaults(run)
    assert kwargs["condition_area"] == 64 * 64 and kwargs["max_new_tokens"] == 112
    assert kwargs["template"].startswith("History:")
    assert {k: v for k, v in kwargs.items() if k not in ("condition_area", "max_new_tokens", "template")} == \
        {k: v for k, v in common.CALL_KWARGS.items() if k not in ("condition_area", "max_new_tokens")}

    (run / "config.json").write_text(json.dumps({"condition_size": 32, "max_new_tokens": 64}))
    assert call_defaults(run) == common.CALL_KWARGS  # a shorter budget never lowers the default; default template

    exported = tmp_path / "model"
    exported.mkdir()
    (exported / "editr2_call_defaults.json").write_text(json.dumps({**common.CALL_KWARGS, "condition_area": 4096,
                                                                   "max_new_tokens": 112, "template": "T {instruction}"}))
    assert call_defaults(exported) == {**common.CALL_KWARGS, "condition_area": 4096, "max_new_tokens": 112,
                                       "template": "T {instruction}"}


def test_a_separate_reasoner_sets_how_the_intent_is_asked(tmp_path):
    """With a separate reasoning model, the request (template, budget) and its image size are the reasoner's; the
    text encoder's `condition_area` (the editor's conditioning) stays as the `--reasoner` stage had it."""
    encoder = tmp_path / "model"
    encoder.mkdir()
    (encoder / "editr2_call_defaults.json").write_text(json.dumps({**common.CALL_KWARGS, "template": "T {instruction}"}))
    reasoner = tmp_path / "reasoner_v3"
    reasoner.mkdir()
    (reasoner / "config.json").write_text(json.dumps({"condition_size": 64, "max_new_tokens": 112}))
    kwargs = call_defaults(encoder, reasoner)
    assert kwargs == {**common.CALL_KWARGS, "max_new_tokens": 112, "reasoning_condition_area": 64 * 64}
    assert "template" not in kwargs  # the reasoner was trained on the default request, not the encoder's template
    (reasoner / "config.json").write_text(json.dumps({"condition_size": 64, "template": "short"}))
    assert call_defaults(encoder, reasoner)["template"].startswith("History:")


def test_call_kwargs_override_is_checked_before_assembly(tmp_path):
    """`export --call-kwargs`: call arguments a folder can carry are set; per-call ones and unknown names and non-JSON
    stop the export before any stage is loaded (the stage folders here do not exist)."""
    from recipes.shapes_tiny.export import main, override_call_kwargs

    assert override_call_kwargs(None) == {}
    assert override_call_kwargs('{"num_inference_steps": 8, "keep_unedited": 0.2}') == {"num_inference_steps": 8,
                                                                                         "keep_unedited": 0.2}
    for bad, match in (('{"reasoning": "none"}', "not call defaults"), ('{"num_steps": 8}', "num_steps"),
                       ("[8]", "JSON object"), ("{8", "not JSON")):
        with pytest.raises(SystemExit, match=match):
            main(["--vae", str(tmp_path / "none"), "--call-kwargs", bad, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

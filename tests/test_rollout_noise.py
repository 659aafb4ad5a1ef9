"""`recipes.shapes_tiny.rollout_noise` at tiny scale: the same rollouts at every noise level, level 0 being the ODE
sampler, and the model folder's request template used as `rl_runs` trains."""

import json

import pytest
import yaml
from test_rl_demo import TINY_CALL_DEFAULTS, TINY_RL_CONFIG

from recipes.shapes_tiny import rollout_noise


@pytest.mark.slow
def test_levels_are_paired_and_level_zero_is_the_sampler(tmp_path, model_folder):
    model = model_folder({**TINY_CALL_DEFAULTS, "template": "T: {instruction}"})
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(TINY_RL_CONFIG), "model_name_or_path": str(model)}))
    assert rollout_noise.model_template_flags(config) == ["--reasoning_template", "T: {instruction}"]
    out = tmp_path / "noise.json"
    assert rollout_noise.main(["--config", str(config), "--noise-levels", "0", "0", "2", "--sessions", "2",
                               "--sessions-per-call", "1", "--json", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert list(levels) == ["0.0", "2.0"]  # a repeated level is run once
    assert set(levels["0.0"]) >= {"reward", "group_std", "IF", "CC", "GA"} and len(levels["0.0"]["reward"]) == 2
    assert levels["0.0"] != levels["2.0"]  # the SDE moved the samples
    # the same sessions, seeds and draws whatever else runs: level 0 alone gives the same numbers
    assert rollout_noise.main(["--config", str(config), "--noise-levels", "0", "--sessions", "2",
                               "--sessions-per-call", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["levels"]["0.0"] == levels["0.0"]


def test_bad_levels_are_refused():
    with pytest.raises(SystemExit, match=">= 0"):
        rollout_noise.main(["--noise-levels", "-1"])

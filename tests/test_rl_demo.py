"""The RL demonstration (recipes/shapes_tiny/rl_demo.py) end to end on the tiny random pipeline: SFT bench, two one-step RL
arms through the training script, arm benches with the saved adapters loaded, report and plot; a rerun skips the
finished arms; the target logic on hand-made numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses / training runs: `make test` runs them, `make test-fast` skips them

RUN_PY = Path(__file__).resolve().parents[1] / "recipes" / "shapes_tiny" / "rl_demo.py"
_spec = importlib.util.spec_from_file_location("rl_demo_run", RUN_PY)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

# The tiny model's call defaults: what its bench runs with (the shipped model has its own file like this).
TINY_CALL_DEFAULTS = {"height": 32, "width": 32, "reference_area": None, "condition_area": 1024,
                      "num_inference_steps": 2, "true_cfg_scale": 1.0, "max_new_tokens": 4}

# shapes_default_rl.yaml at tiny size. The oracle scores a random model ~0 everywhere (no spread, no gradient), so a
# pixel-hash reward is added to give the groups a spread, and the learning rate is large: one step moves the adapters.
TINY_RL_CONFIG = """
model_name_or_path: tiny
reward_funcs: [shapes_oracle, trl_editr2.testing.pixel_hash_reward]
reward_weights: {"IF": 0.3, "CC": 0.3, "GA": 0.4, "pixel_hash_reward": 1.0}
dataset_name: mice-shapes
shapes_family: mixed
shapes_num_sessions: 4
shapes_seed: 20000000
shapes_size: 32
num_generations: 2
num_turns: 2
num_inference_steps: 2
sde_window_size: 1
sde_window_range: [0, 1]
timestep_shift: null
true_cfg_scale: 1.0
reference_area: null
condition_area: 1024
max_reasoning_tokens: 4
trajectory_filter: if_zero
lora_r: 4
lora_alpha: 8
text_lora_r: 4
text_lora_alpha: 8
learning_rate: 1.0e-2
lr_scheduler_type: constant
max_steps: 3
logging_steps: 1
save_steps: 1
seed: 0
report_to: none
use_cpu: true
disable_tqdm: true
dataloader_num_workers: 0
"""


@pytest.fixture(scope="module")
def model_dir(model_folder):
    """The tiny pipeline folder with call defaults for 32 px, 2 steps, 4 reasoning tokens."""
    return model_folder(TINY_CALL_DEFAULTS)


@pytest.fixture(scope="module")
def demo(model_dir, tmp_path_factory):
    """One full run: `--max-steps 1` (the config says 3), 1 session x 2 turns per family."""
    root = tmp_path_factory.mktemp("rl-demo-run")
    config = root / "tiny_rl.yaml"
    config.write_text(TINY_RL_CONFIG)
    argv = ["--model", str(model_dir), "--config", str(config), "--run-dir", str(root / "runs"), "--sessions", "1",
            "--turns", "2", "--max-steps", "1", "--out-md", str(root / "docs" / "results_rl.md"), "--no-progress"]
    assert run.main(argv) == 0
    return root, argv


def test_report_table_targets_and_plot(demo):
    root, _ = demo
    md = (root / "docs" / "results_rl.md").read_text()
    png = root / "docs" / "results_rl.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](results_rl.png)" in md

    # the pooled per-turn table: header, separator, one row per arm
    section = md.split("## Per turn")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert len(rows) == 3
    assert [r.split("|")[1].strip() for r in rows] == [run.LABELS["sft"], f"{run.LABELS['rl']} at step 1",
                                                       f"{run.LABELS['rl_nofilter']} at step 1"]

    # the targets in the report are the ones computed from the cached benches
    benches = {arm: json.loads((root / "runs" / "bench" / f"{arm}.json").read_text())["result"]
               for arm in ("sft", "rl", "rl_nofilter")}
    per_turn = {arm: run.pool_families(b["families"]) for arm, b in benches.items()}
    assert [row["turn"] for row in per_turn["sft"]] == [1, 2]
    targets = run.compute_targets(per_turn)
    assert targets["rl_gain"] == pytest.approx(per_turn["rl"][1]["reward"] - per_turn["sft"][1]["reward"])
    assert f"RL - SFT = {run.fmt(targets['rl_gain'], 4)}" in md
    assert f"RL - RL without filtering = {run.fmt(targets['filter_margin'], 4)}" in md

    # each arm trained the requested single step, with its own filter, and logged its reward
    for arm, filter_name in run.ARMS.items():
        out = root / "runs" / arm
        assert run.finished_steps(out) == 1 and benches[arm]["step"] == 1
        assert json.loads((out / "editr2_config.json").read_text())["trajectory_filter"] == filter_name
        assert [e["step"] for e in run.training_log(out)] == [1]


def test_rerun_skips_finished_arms_and_cached_benches(demo, monkeypatch, capsys):
    root, argv = demo
    md = root / "docs" / "results_rl.md"
    md.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    def no_bench(*args, **kwargs):
        raise AssertionError("an unchanged arm was benched again")

    monkeypatch.setattr(run.subprocess, "Popen", no_training)
    monkeypatch.setattr(run, "bench", no_bench)
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "[rl] finished (1 steps): skipped" in out and "[rl_nofilter] finished (1 steps): skipped" in out
    assert md.is_file()


def test_train_command_resumes_from_newest_checkpoint(demo, tmp_path):
    root, _ = demo
    cmd = run.train_command("rl_nofilter", Path("c.yaml"), Path("m"), root / "runs" / "rl_nofilter", 5)
    assert cmd[cmd.index("--trajectory_filter") + 1] == "none"
    assert cmd[cmd.index("--max_steps") + 1] == "5"
    assert cmd[cmd.index("--resume_from_checkpoint") + 1].endswith("checkpoint-1")
    assert "--resume_from_checkpoint" not in run.train_command("rl", Path("c.yaml"), Path("m"), tmp_path, None)


def test_arm_editor_differs_from_sft_only_through_adapters(demo, model_dir):
    from diffusers_editr2.pipeline_editr2 import adapters_disabled
    from editr2.bench.shapes import generate_session
    from editr2.bench.shapes.runner import run_session

    root, _ = demo
    session = generate_session("cm", 2, 0, 32)
    sft = run.load_editor(model_dir)
    arm = run.load_editor(model_dir, root / "runs" / "rl")
    assert "default_0" in arm.pipe.transformer.peft_config and "reasoning" in arm.pipe.text_encoder.peft_config
    assert not hasattr(sft.pipe.transformer, "peft_config")

    # one step at lr 1e-2 moved the adapters: the edits differ ...
    sft_images, _ = run_session(sft, session)
    arm_images, _ = run_session(arm, session)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sft_images[1:], arm_images[1:]))
    # ... and with the adapters off, the arm's editor is the SFT editor exactly (bit-equal: both loaded the same
    # folder the same way, so their base weights have the same memory layout and every kernel runs the same sums)
    with adapters_disabled(arm.pipe.transformer), adapters_disabled(arm.pipe.text_encoder):
        off_images, _ = run_session(arm, session)
    for a, b in zip(sft_images, off_images):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_adapters_refuses_a_folder_without_adapters(model_dir, tmp_path):
    with pytest.raises(ValueError, match="holds no adapters"):
        run.load_adapters(None, tmp_path)


def test_targets_on_hand_made_numbers():
    def rows(*rewards):
        return [{"turn": t, "IF": 0.0, "CC": 0.0, "GA": 0.0, "reward": r} for t, r in enumerate(rewards, 1)]

    targets = run.compute_targets({"sft": rows(0.9, 0.20, 0.30), "rl": rows(0.0, 0.25, 0.35),
                                   "rl_nofilter": rows(0.9, 0.25, 0.35)})
    assert targets["late"] == pytest.approx({"sft": 0.25, "rl": 0.30, "rl_nofilter": 0.30})
    assert targets["rl_gain"] == pytest.approx(0.05) and targets["rl_gain_met"]  # exactly 0.05 (float 0.0499...) meets
    assert targets["filter_margin"] == pytest.approx(0.0) and targets["filter_met"]  # a tie meets
    assert targets["rl_wins"]

    targets = run.compute_targets({"sft": rows(0.1, 0.2, 0.3), "rl": rows(0.1, 0.24, 0.35),
                                   "rl_nofilter": rows(0.1, 0.3, 0.4)})
    assert targets["rl_gain"] == pytest.approx(0.045) and not targets["rl_gain_met"]
    assert targets["filter_margin"] == pytest.approx(-0.055) and not targets["filter_met"]
    assert not targets["rl_wins"]

    targets = run.compute_targets({"sft": rows(0.1, 0.2, 0.3), "rl": rows(0.1, 0.4, 0.5)})
    assert targets["rl_gain_met"] and targets["filter_margin"] is None and targets["filter_met"] is None
    assert not targets["rl_wins"]  # the filter target cannot be checked without the no-filter arm
    assert run.late_reward(rows(0.5)) != run.late_reward(rows(0.5))  # one turn: no turns 2-3 (NaN)


def test_smooth_and_pool_families():
    assert run.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    result = lambda n, r: {"config": {"sessions": n}, "per_turn": [{"turn": 1, "IF": r, "CC": r, "GA": r,  # noqa: E731
                                                                    "reward": r}]}
    pooled = run.pool_families({"cm": result(1, 0.0), "cu": result(3, 1.0)})
    assert pooled == [{"turn": 1, "IF": 0.75, "CC": 0.75, "GA": 0.75, "reward": 0.75}]


def test_shipped_config_parses_with_the_papers_settings():
    from trl_editr2.scripts.editr2 import make_parser

    script_args, config = make_parser().parse_args_and_config(["--config", str(run.DEFAULT_CONFIG)])
    assert script_args.model_name_or_path == "checkpoints/editr2-shapes-tiny-sft"  # the RL runs start from SFT
    assert script_args.shapes_seed >= 10_000_000 and script_args.shapes_num_sessions >= config.max_steps
    assert (config.num_generations, config.num_turns) == (6, 3)
    assert (config.sde_window_size, config.sde_window_range) == (2, [0, 3])  # high-noise steps of the model's 4
    assert (config.clip_range_text, config.clip_range_image, config.beta) == (1e-5, 1e-5, 0.01)
    assert config.noise_level == 0.5  # the paper's 1.3 is set for 15 steps; measured for 4 by rollout_noise
    assert config.reward_weights == {"IF": 0.3, "CC": 0.3, "GA": 0.4} and config.trajectory_filter == "if_zero"
    assert (config.num_inference_steps, config.condition_area, config.reference_area) == (4, 1024, None)
    assert config.logging_steps == 1 and config.save_steps == 25 and config.train_reasoning


def test_killing_the_script_stops_its_training_processes(tmp_path):
    # A `kill` of run.py once left an arm's trainer running unseen beside a rerun that trained the same arm again.
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    driver = f"""
import importlib.util, sys, types
from pathlib import Path
spec = importlib.util.spec_from_file_location("rl_demo_run", {str(RUN_PY)!r})
run = importlib.util.module_from_spec(spec); spec.loader.exec_module(run)
run.finished_steps = lambda output_dir: 0
run.train_command = lambda *a: [sys.executable, "-c",
    "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
run.stop_on_sigterm()
run.train_arms(["rl"], types.SimpleNamespace(threads=1, jobs=1, max_steps=5), None, None, 5, Path({str(tmp_path)!r}))
"""
    parent = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        assert parent.poll() is None, "the driver failed before starting its training process"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    for _ in range(100):  # the child is terminated and reaped by the parent before it exits
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the training process outlived the killed script")

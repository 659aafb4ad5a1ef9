"""Scale-out through accelerate: `accelerate launch --num_processes 2` on CPU (gloo) runs the script, with DDP
(multi_cpu_2proc.yaml) and with FSDP2 sharding (fsdp_cpu_2proc.yaml, the settings of the GPU fsdp.yaml), and one step
on 2 processes x 1 session equals one step on 1 process x 2 sessions (the same global batch).

Tolerance: the updated adapter weights agree to `atol=1e-6, rtol=1e-4` (plain SGD, so the update is the gradient
itself: the rollouts are bit-identical, only the order of the gradient sums differs between the all-reduce /
reduce-scatter and one process's accumulation); the gathered rewards agree exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses / training runs: `make test` runs them, `make test-fast` skips them

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "trl_editr2" / "scripts" / "editr2.py"
SHAPES_TINY = REPO / "examples" / "configs" / "shapes_tiny.yaml"
CONFIGS = REPO / "examples" / "accelerate_configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _argv(output_dir: Path, per_device: int) -> list[str]:
    return [
        "--config", str(SHAPES_TINY), "--output_dir", str(output_dir), "--max_steps", "1", "--save_strategy", "no",
        "--per_device_train_batch_size", str(per_device), "--num_turns", "1", "--num_inference_steps", "3",
        "--max_reasoning_tokens", "4", "--shapes_num_sessions", "4", "--optim", "sgd", "--learning_rate", "0.5",
        "--weight_decay", "0", "--max_grad_norm", "0", "--reward_funcs", "trl_editr2.testing.pixel_hash_reward",
        "--reward_weights", '{"pixel_hash_reward": 1.0}', "--trajectory_filter", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


def _step_log(output_dir: Path) -> dict:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return next(h for h in history if "reward" in h)


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on a timeout kill the whole group (launcher and workers)."""
    with subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{argv[:4]} timed out after 300 s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def initial_state(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapters before any step (same seed, same initialisation in every run)."""
    from trl_editr2.testing import tiny_trainer

    trainer = tiny_trainer(tmp_path_factory.mktemp("init"), num_turns=1)
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """One step on one process with both sessions."""
    output_dir = tmp_path_factory.mktemp("one")
    result = _run([sys.executable, str(SCRIPT), *_argv(output_dir, per_device=2)], ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.parametrize("config, port", [("multi_cpu_2proc.yaml", 29531), ("fsdp_cpu_2proc.yaml", 29532)])
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, initial_state, one, config, port):
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
              "--main_process_port", str(port), str(SCRIPT), *_argv(two, per_device=1)]
    result = _run(launch, ENV)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = _step_log(one), _step_log(two)
    assert a["reward"] == b["reward"] and a["reward_std"] == b["reward_std"]  # same rollouts, same gathered rewards
    assert a["frac_reward_zero_std"] == b["frac_reward_zero_std"] == 0
    torch.testing.assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), atol=1e-7, rtol=1e-5)

    state_one = load_file(one / "trainable_state.safetensors")
    state_two = load_file(two / "trainable_state.safetensors")
    assert state_one.keys() == state_two.keys()
    moved = 0
    for name in state_one:
        torch.testing.assert_close(state_two[name], state_one[name], atol=1e-6, rtol=1e-4, msg=name)
        key = name if name in initial_state else None
        if key is not None and not torch.equal(state_one[name], initial_state[key]):
            moved += 1
    assert moved > 0  # the step did update the adapters


def test_fsdp_resume_continues_like_an_uninterrupted_run(tmp_path):
    """Under FSDP2 the checkpoint's full tensors are distributed back onto the DTensor shards: a run resumed from step
    1 ends where the uninterrupted 2-step run ends."""
    import shutil

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp_cpu_2proc.yaml"),
              "--main_process_port", "29533", str(SCRIPT)]
    full = tmp_path / "full"
    argv = [*_argv(full, per_device=1), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    result = _run([*launch, *argv], ENV)
    assert result.returncode == 0, result.stderr[-3000:]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    argv = [*_argv(resumed, per_device=1), "--max_steps", "2", "--resume_from_checkpoint", str(resumed / "checkpoint-1")]
    result = _run([*launch, *argv], ENV)
    assert result.returncode == 0, result.stderr[-3000:]

    end, step_1 = load_file(full / "trainable_state.safetensors"), load_file(full / "checkpoint-1" / "trainable_state.safetensors")
    again = load_file(resumed / "trainable_state.safetensors")
    assert any(not torch.equal(end[k], step_1[k]) for k in end)  # step 2 did change the adapters
    for name in end:
        torch.testing.assert_close(again[name], end[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_accumulation_equals_one_batch_of_the_same_sessions(tmp_path, one):
    """1 process x 1 session x 2 micro-batches is one step over the same two sessions: the advantages are normalised
    over both micro-batches (the whole step), so the update equals the one-batch step's."""
    accumulated = tmp_path / "accumulated"
    argv = [*_argv(accumulated, per_device=1), "--gradient_accumulation_steps", "2"]
    result = _run([sys.executable, str(SCRIPT), *argv], ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _step_log(one), _step_log(accumulated)
    assert a["reward"] == b["reward"] and a["advantages/std_samples"] == b["advantages/std_samples"] == 4
    state_one = load_file(one / "trainable_state.safetensors")
    state_acc = load_file(accumulated / "trainable_state.safetensors")
    for name in state_one:
        torch.testing.assert_close(state_acc[name], state_one[name], atol=1e-6, rtol=1e-4, msg=name)

"""EditR2Config, the TRL-style script, save / resume, adapter formats and the Qwen-Image-Edit-2509 config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_editr2.config import PAPER_REWARD_WEIGHTS, EditR2Config

REPO = Path(__file__).resolve().parents[1]
SHAPES_TINY = REPO / "examples" / "configs" / "shapes_tiny.yaml"
QWEN_YAML = REPO / "examples" / "configs" / "qwen_image_edit_2509_lora.yaml"

TRL_METRICS = (
    "loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio/text", "clip_ratio/image",
    "rewards/IF/mean", "rewards/CC/mean", "rewards/GA/mean", "rewards/turn_1/mean", "rewards/turn_2/mean",
    "filter/frac_filtered", "reasoning/fallback_rate", "timing/rollout", "timing/reward", "timing/learn",
    "skipped_steps",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers(tmp_path):
    args = EditR2Config(output_dir=str(tmp_path), report_to="none")
    assert (args.num_generations, args.num_turns, args.num_inference_steps) == (6, 3, 15)
    assert (args.sde_window_size, args.sde_window_range, args.noise_level, args.timestep_shift) == (2, [0, 7], 1.3, 3.0)
    assert (args.clip_range_text, args.clip_range_image, args.beta) == (1e-5, 1e-5, 0.01)
    assert (args.reasoning_temperature, args.max_reasoning_tokens) == (0.7, 150)
    assert args.reward_weights == PAPER_REWARD_WEIGHTS and args.adv_clip_max == 5.0
    assert (args.group_key, args.trajectory_filter, args.filter_text, args.same_initial_noise) == (
        "session", "if_zero", False, True)
    assert (args.lora_r, args.lora_alpha, args.text_lora_r, args.text_lora_alpha) == (64, 128, 64, 128)
    assert args.train_reasoning and args.learning_rate == 1e-4 and not args.remove_unused_columns


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_key": "rollout"}, "group_key must be one of"),
        ({"trajectory_filter": "if_one"}, "trajectory_filter must be one of"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"sde_window_range": [0, 15]}, "lower sde_window_range's hi"),
        ({"sde_window_range": [3, 3]}, "0 <= lo < hi"),
        ({"reasoning": "none"}, "train_reasoning=True needs reasoning='intent'"),
        ({"reward_weights": {"IF": "high"}}, "reward_weights must map reward names to numbers"),
        ({"lora_dropout": 0.1}, "lora_dropout must be 0"),
        ({"resolution": 500}, "multiple of 16"),
        ({"reasoning_temperature": 0.0}, "reasoning_temperature must be > 0"),
        ({"reasoning_template": "History: {history}"}, "reasoning_template must contain {instruction}"),
        ({"keep_unedited": -1.0, "reference_area": None}, "keep_unedited must be a finite change"),
        ({"keep_unedited": float("nan"), "reference_area": None}, "keep_unedited must be a finite change"),
        ({"keep_unedited": 0.2}, "reference_area=None"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        EditR2Config(output_dir=str(tmp_path), report_to="none", **overrides)


def test_config_reads_reward_weights_from_json(tmp_path):
    args = EditR2Config(output_dir=str(tmp_path), report_to="none", reward_weights='{"IF": 1, "GA": 0.5}')
    assert args.reward_weights == {"IF": 1, "GA": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# The script: TrlParser + --config, trainer_state.json, checkpoints, bit-for-bit resume
# ---------------------------------------------------------------------------------------------------------------------


def _run_script(argv: list[str]):
    from trl_editr2.scripts.editr2 import main, make_parser

    script_args, training_args = make_parser().parse_args_and_config(argv)
    main(script_args, training_args)
    return training_args


def _tiny_argv(output_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(SHAPES_TINY), "--output_dir", str(output_dir), "--max_steps", "2",
            "--max_reasoning_tokens", "4", "--num_inference_steps", "3", "--shapes_num_sessions", "4",
            "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Two steps of the tiny config through the script, with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _run_script(_tiny_argv(out, "--save_steps", "1"))
    return out


@pytest.mark.slow
def test_script_writes_trl_metrics_to_trainer_state(uninterrupted):
    state = json.loads((uninterrupted / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "reward" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for key in TRL_METRICS:
        assert key in steps[0], key
    assert state["global_step"] == 2
    for name in ("pytorch_lora_weights.safetensors", "reasoning_lora/adapter_model.safetensors",
                 "reasoning_lora/adapter_config.json", "trainable_state.safetensors", "editr2_config.json"):
        assert (uninterrupted / name).is_file(), name
        assert (uninterrupted / "checkpoint-1" / name).is_file(), name
    assert (uninterrupted / "checkpoint-1" / "rng_state.pth").is_file()


@pytest.mark.slow
def test_resume_continues_bit_for_bit(uninterrupted, tmp_path):
    resumed = tmp_path / "resumed"
    _run_script(_tiny_argv(resumed, "--resume_from_checkpoint", str(uninterrupted / "checkpoint-1")))
    expected = load_file(uninterrupted / "trainable_state.safetensors")
    got = load_file(resumed / "trainable_state.safetensors")
    assert expected.keys() == got.keys()
    first = load_file(uninterrupted / "checkpoint-1" / "trainable_state.safetensors")
    assert any(not torch.equal(first[k], expected[k]) for k in expected)  # step 2 did change the adapters
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    def step_two(path: Path) -> dict:
        history = json.loads((path / "trainer_state.json").read_text())["log_history"]
        return next(h for h in history if h.get("step") == 2 and "reward" in h)

    a, b = step_two(uninterrupted), step_two(resumed)
    for key in ("loss", "reward", "rewards/CC/mean", "kl", "clip_ratio/image", "grad_norm", "learning_rate"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_saved_adapters_load_into_the_pipeline_and_reproduce_the_policy(uninterrupted):
    from diffusers_editr2.testing import tiny_pipeline
    from trl_editr2.rollout import rollout_session
    from trl_editr2.testing import tiny_dataset, tiny_trainer

    # the trained policy, restored from its exact trainable state
    trainer = tiny_trainer(uninterrupted / "scratch")
    trainer._load_from_checkpoint(str(uninterrupted))
    turn = rollout_session(trainer.policy, tiny_dataset()[0], trainer.args, seed=3).turns[1]
    # a fresh pipeline with the adapters loaded in the pipeline's own formats
    pipe = tiny_pipeline(0)
    pipe.load_lora_weights(str(uninterrupted))
    pipe.load_reasoning_lora(str(uninterrupted / "reasoning_lora"))
    x, t = turn.latents[0], turn.step_timesteps[0].expand(2)
    with torch.no_grad():
        expected = trainer.policy.velocity(x, t, turn.conditioning)
        base = trainer.policy.velocity(x, t, turn.conditioning, reference=True)
        got = pipe.predict_velocity(x, t, turn.conditioning, 1.0)
        assert not torch.allclose(expected, base)  # the adapter is not the identity any more
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        text = turn.text
        from trl_editr2.policy import completion_logps

        torch.testing.assert_close(
            completion_logps(pipe.text_encoder, text, 0.7), trainer.policy.token_logps(text), atol=1e-5, rtol=1e-5
        )


# ---------------------------------------------------------------------------------------------------------------------
# The Qwen-Image-Edit-2509 config, on a tiny folder with the real layout
# ---------------------------------------------------------------------------------------------------------------------


def test_qwen_image_edit_2509_config_builds_the_trainer_on_the_real_layout(tmp_path, monkeypatch, qwen_edit_plus_dir):
    from peft.tuners.lora import LoraLayer

    from trl_editr2 import EditR2Trainer
    from trl_editr2.scripts.editr2 import make_parser
    from trl_editr2.testing import tiny_dataset

    folder = qwen_edit_plus_dir
    judges = tmp_path / "judges.yaml"  # an OpenAI-compatible VLM judge (never called here)
    judges.write_text("vlm: {backend: openai, model: judge, base_url: 'http://127.0.0.1:9/v1'}\nmetrics: [IF, GA]\n")
    monkeypatch.setenv("EDITR2_JUDGE_CONFIG", str(judges))
    script_args, args = make_parser().parse_args_and_config(
        ["--config", str(QWEN_YAML), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none",
         "--reward_weights", '{"IF": 0.3, "GA": 0.4}']  # the judges here score IF and GA only: no weight for CC
    )
    monkeypatch.setenv("EDITR2_JUDGE_CONFIG", str(judges))  # the YAML's env: block set it to its own path
    assert script_args.model_name_or_path == "Qwen/Qwen-Image-Edit-2509"
    assert (args.num_generations, args.num_turns, args.noise_level, args.bf16) == (6, 3, 1.3, True)

    trainer = EditR2Trainer(str(folder), script_args.reward_funcs, args=args, train_dataset=tiny_dataset())
    assert trainer.reward_func_names == ["IF", "GA"]
    assert trainer.reward_weights == {"IF": 0.3, "GA": 0.4}
    policy = trainer.policy
    assert policy.transformer.dtype == torch.bfloat16
    lora = [n for n, m in policy.named_modules() if isinstance(m, LoraLayer)]
    assert any(n.startswith("transformer.transformer_blocks.") and n.endswith("attn.to_q") for n in lora)
    assert any(".language_model." in n and n.endswith("mlp.down_proj") for n in lora)
    assert not any(".visual." in n for n in lora)  # the reasoning LoRA stays off the vision tower
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert policy.transformer.peft_config["default"].r == 64


def test_rollouts_ask_with_the_configured_reasoning_template(tmp_path, monkeypatch):
    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
    from trl_editr2.testing import tiny_dataset, tiny_trainer

    template = 'History:\n{history}\nRules:\n{rules}\nInstruction: "{instruction}"'
    trainer = tiny_trainer(tmp_path, num_turns=1, max_reasoning_tokens=2, reasoning_template=template)
    seen = []
    original = EditR2Pipeline.prepare_reasoning_inputs

    def spy(self, session, prompt, template=None, condition_area=1024, device=None):
        seen.append(template)
        inputs = original(self, session, prompt, template, condition_area, device)
        seen.append(self.processor.tokenizer.decode(inputs["input_ids"][0]))
        return inputs

    monkeypatch.setattr(EditR2Pipeline, "prepare_reasoning_inputs", spy)
    trainer.rollout([tiny_dataset(num_turns=1)[0]])
    assert seen and seen[0] == template and 'Instruction: "' in seen[1]


# ---------------------------------------------------------------------------------------------------------------------
# Loud failures: reward weights, missing rewards, resume, whole-step advantages, turn-1 reasoning
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_weights_with_an_unknown_name_fail_before_the_model_loads(tmp_path):
    from trl_editr2 import EditR2Trainer
    from trl_editr2.testing import tiny_config, tiny_dataset

    args = tiny_config(tmp_path, reward_weights={"IF": 0.3, "CC": 0.3, "GAA": 0.4})
    with pytest.raises(ValueError, match=r"reward_weights has weights for \['GAA'\].*\['IF', 'CC', 'GA'\]"):
        EditR2Trainer(str(tmp_path / "no-such-model"), ["shapes_oracle"], args=args, train_dataset=tiny_dataset())


def test_default_reward_weights_apply_to_the_functions_they_name():
    from trl_editr2 import EditR2Trainer

    resolve = EditR2Trainer._resolve_weights
    assert resolve({"IF": 0.3, "CC": 0.3, "GA": 0.4}, ["IF", "GA"]) == {"IF": 0.3, "GA": 0.4}
    assert resolve({"IF": 0.3, "CC": 0.3, "GA": 0.4}, ["pixel_hash_reward"]) == {"pixel_hash_reward": 1.0}
    with pytest.raises(ValueError, match="GAA"):  # a dict the user wrote is checked key by key
        resolve({"IF": 0.3, "CC": 0.3, "GAA": 0.4}, ["IF", "CC", "GA"])


def _named(fn, name):
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("kind", ["none", "raises", "nan"])
@pytest.mark.slow
def test_a_step_without_any_valid_reward_stops_training(tmp_path, kind):
    from trl_editr2.testing import tiny_dataset, tiny_trainer

    def broken(prompts, images, **kwargs):
        if kind == "raises":
            raise RuntimeError("judge server down")
        return [None if kind == "none" else float("nan")] * len(prompts)

    trainer = tiny_trainer(tmp_path, reward_funcs=[_named(broken, "judge")], reward_weights={"judge": 1.0},
                           trajectory_filter="none", num_turns=1, dataset=tiny_dataset(num_turns=1), max_steps=3,
                           max_steps_without_reward=2, reward_retries=0, logging_steps=1)
    with pytest.raises(RuntimeError, match=r"No valid reward in 2 optimizer step\(s\) in a row.*judge: missing 100%"):
        trainer.train()
    assert trainer.state.global_step == 1  # the first empty step ran, the second stopped the run


@pytest.mark.slow
def test_missing_and_non_finite_rewards_are_counted_logged_and_warned(tmp_path, caplog):
    from trl_editr2.testing import tiny_dataset, tiny_trainer

    def flaky(prompts, images, **kwargs):  # 2 samples: a NaN (a flaky judge), then a valid score
        return [float("nan"), 0.5]

    trainer = tiny_trainer(tmp_path, reward_funcs=[_named(flaky, "judge")], reward_weights={"judge": 1.0},
                           trajectory_filter="none", num_turns=1, dataset=tiny_dataset(num_turns=1), max_steps=1,
                           logging_steps=1)
    with caplog.at_level("WARNING", logger="trl_editr2.trainer"):
        trainer.train()
    logged = next(h for h in trainer.state.log_history if "reward" in h)
    assert logged["rewards/missing_frac"] == pytest.approx(0.5)
    assert logged["rewards/judge/nonfinite"] == 1 and logged["rewards/judge/missing"] == pytest.approx(0.5)
    assert "50.0% of the rewards since the last log are missing" in caplog.text


@pytest.mark.slow
def test_advantages_are_normalised_over_every_micro_batch_of_the_step(tmp_path, monkeypatch):
    """Two sessions per optimizer step (gradient accumulation 2, one per micro-batch): one's rewards differ only by
    jitter, the other's by 1. With the std over the whole step, the jitter session's advantages stay ~0.002 / 0.5."""
    from trl_editr2.testing import tiny_dataset, tiny_trainer

    roles: dict = {}

    def reward(prompts, images, session_id, rollout, turn, **kwargs):
        out = []
        for sid, g, t in zip(session_id, rollout, turn):
            roles.setdefault(sid, "jitter" if not roles else "spread")
            out.append(0.5 + 0.002 * (1 if (g + t) % 2 else -1) if roles[sid] == "jitter" else float((g + t) % 2))
        return out

    trainer = tiny_trainer(tmp_path, reward_funcs=[_named(reward, "judge")], reward_weights={"judge": 1.0},
                           trajectory_filter="none", max_steps=1, gradient_accumulation_steps=2,
                           per_device_train_batch_size=1, global_std_min_samples=0)
    seen = []
    prepare = type(trainer)._prepare_inputs

    def spy(self, inputs):  # each micro-step's batch dict
        batch = prepare(self, inputs)
        seen.append({ro.record["session_id"]: batch["advantages"][i].clone() for i, ro in enumerate(batch["rollouts"])})
        return batch

    monkeypatch.setattr(type(trainer), "_prepare_inputs", spy)
    trainer.train()
    advantages = {sid: adv for step in seen for sid, adv in step.items()}
    assert len(seen) == 2 and len(advantages) == 2
    jitter = next(adv for sid, adv in advantages.items() if roles[sid] == "jitter")
    spread = next(adv for sid, adv in advantages.items() if roles[sid] == "spread")
    assert jitter.abs().mean() < 0.01, jitter
    assert spread.abs().mean() > 0.5
    assert trainer.state.log_history[0]["advantages/std_samples"] == 8


def test_too_few_samples_for_the_global_std_are_warned(tmp_path, caplog):
    from trl_editr2.testing import pixel_hash_reward, tiny_dataset, tiny_trainer

    trainer = tiny_trainer(tmp_path, reward_funcs=[pixel_hash_reward], reward_weights={"pixel_hash_reward": 1.0},
                           trajectory_filter="none", num_turns=1, dataset=tiny_dataset(num_turns=1))
    with caplog.at_level("WARNING", logger="trl_editr2.trainer"):
        trainer.score(trainer.rollout([tiny_dataset(num_turns=1)[0]]))
    assert "taken over 2 valid rewards (< global_std_min_samples=72" in caplog.text


def test_first_turn_reasoning_is_a_choice(tmp_path):
    from trl_editr2.testing import tiny_dataset, tiny_trainer

    assert EditR2Config(output_dir=str(tmp_path), report_to="none").reason_at_first_turn  # see docs/trainer.md
    trainer = tiny_trainer(tmp_path, reason_at_first_turn=False)
    record = tiny_dataset()[0]
    first, second = trainer.rollout([record])[0].turns
    assert not first.reasoned and first.text is None
    assert [i.text for i in first.intents] == [record["instruction"][0]] * 2  # the raw instruction conditions turn 1
    assert second.reasoned and second.text is not None


def _copy_checkpoint(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source, target)


def test_resume_picks_the_latest_complete_checkpoint(uninterrupted, tmp_path, caplog):
    from trl_editr2.trainer import resolve_checkpoint

    out = tmp_path / "out"
    _copy_checkpoint(uninterrupted / "checkpoint-1", out / "checkpoint-1")
    _copy_checkpoint(uninterrupted / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # killed before its last write
    _copy_checkpoint(uninterrupted / "checkpoint-1", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": ')  # killed during it
    with caplog.at_level("WARNING", logger="trl_editr2.trainer"):
        for value in (True, "true", "latest"):
            assert resolve_checkpoint(value, out) == str(out / "checkpoint-1")
    assert "Skipping incomplete checkpoint" in caplog.text and "trainer_state.json (unreadable)" in caplog.text
    assert resolve_checkpoint(None, out) is None and resolve_checkpoint("false", out) is None
    with pytest.raises(ValueError, match=r"checkpoint-2 is not a complete .*no trainer_state.json.*checkpoint-1"):
        resolve_checkpoint(str(out / "checkpoint-2"), out)
    with pytest.raises(ValueError, match="no complete checkpoint-N folder"):
        resolve_checkpoint(True, tmp_path / "empty")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "nowhere"), out)


@pytest.mark.slow
def test_script_resume_true_skips_a_half_written_checkpoint(uninterrupted, tmp_path):
    resumed = tmp_path / "resumed"
    _copy_checkpoint(uninterrupted / "checkpoint-1", resumed / "checkpoint-1")
    (resumed / "checkpoint-2").mkdir()  # a save killed right after it began
    (resumed / "checkpoint-2" / "trainable_state.safetensors").write_bytes(b"")
    _run_script(_tiny_argv(resumed, "--resume_from_checkpoint", "true"))
    expected = load_file(uninterrupted / "trainable_state.safetensors")
    got = load_file(resumed / "trainable_state.safetensors")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.slow
def test_a_restoring_rollout_trains_its_reasoning_but_not_an_image(tmp_path, monkeypatch):
    import trl_editr2.rollout as rollout_module
    from trl_editr2.testing import pixel_hash_reward, tiny_dataset, tiny_trainer

    real = rollout_module.generate_answers_batched

    def answers_with_an_undo(pipe, requests, args):
        out = []
        for (sessions, _, _), (answers, *rest) in zip(requests, real(pipe, requests, args)):
            if sessions[0].num_turns == 1:  # turn 2: rollout 0 takes turn 1 back, rollout 1 edits
                answers = ["<think>Take it back.</think>Undo the last edit.", "<think>Edit.</think>Make it blue."]
            out.append((answers, *rest))
        return out

    monkeypatch.setattr(rollout_module, "generate_answers_batched", answers_with_an_undo)
    trainer = tiny_trainer(tmp_path, reward_funcs=[pixel_hash_reward], reward_weights={"pixel_hash_reward": 1.0},
                           trajectory_filter="none", num_turns=2, dataset=tiny_dataset(num_turns=2), max_steps=1,
                           global_std_min_samples=0)
    (rollout,) = trainer.rollout([tiny_dataset(num_turns=2)[0]])
    first, second = rollout.turns
    assert first.restored == [False, False] and second.restored == [True, False]
    undone, edited = rollout.sessions
    assert undone.turns[1].restored_from == 0 and edited.turns[1].restored_from is None
    assert second.images[0].tobytes() == undone.source_image.tobytes()  # back to the source, exactly
    assert second.intents[0].restore == 0 and second.text is not None
    batch = trainer.score([rollout])
    assert batch["image_mask"][0, :, 1].tolist() == [False, True]  # no image steps of the undo are trained
    assert batch["text_mask"][0, :, 1].tolist() == [True, True]  # its reasoning tokens are
    assert batch["image_mask"][0, :, 0].tolist() == [True, True]
    trainer.train()  # a step with a restore turn trains (finite loss)
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)

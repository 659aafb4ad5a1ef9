"""Judges at scale: a training step's samples go to an OpenAI-compatible judge server as parallel requests, and the
step logs each judge's time. The server is a stand-in on loopback (`FakeChatServer`, with a per-request delay); the
detector and the DINO-style features are in-process stand-ins (they run next to the trainer, see docs/trainer.md)."""

import re
import time

import pytest

from editr2.bench.judges import OpenAIChatConfig, OpenAIChatVLM
from editr2.bench.judges.config import JudgeConfig, build_judges
from editr2.bench.judges.rewards import mice_reward_functions
from judge_fakes import FakeChatServer, PixelFeatures, ScriptedDetector, prompt_of
from trl_editr2.rewards import score_samples

DELAY_S = 0.1
CONCURRENCY = 6


def judge_answer(payload) -> str:
    """IF questions get "yes"; GA gets one verdict per turn it is shown."""
    text = prompt_of(payload)
    turns = sorted({int(k) for k in re.findall(r"Turn (\d+):", text)})
    if turns and "<final>" in text:
        return "".join(f"<turn_{k}>yes</turn_{k}>" for k in turns) + "<final>yes</final>"
    return "yes"


def judges_for(server, concurrency=CONCURRENCY):
    config = JudgeConfig.from_dict({
        "vlm": {"backend": "openai", "model": "stand-in-vlm", "base_url": server.base_url,
                "max_concurrency": concurrency, "timeout_s": 5.0},
        "detector": {"path": "stand-in"}, "features": {"path": "stand-in"},  # replaced by the stand-ins below
        "if": {"num_votes": 1}, "ga": {"num_votes": 1},
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.0},
    })
    return build_judges(config, detector=ScriptedDetector({}), features=PixelFeatures())


@pytest.fixture(scope="module")
def step_batch(tmp_path_factory):
    """The reward functions' arguments of one real tiny training step: 1 session x G=4 rollouts x T=2 turns."""
    from trl_editr2.testing import pixel_hash_reward, tiny_trainer

    trainer = tiny_trainer(tmp_path_factory.mktemp("judges"), reward_funcs=[pixel_hash_reward],
                           reward_weights={"pixel_hash_reward": 1.0}, trajectory_filter="none", num_generations=4)
    rollouts = trainer.rollout([trainer.train_dataset[0]])
    return trainer, trainer.reward_kwargs(rollouts)


def test_a_step_goes_out_as_parallel_requests_and_is_timed(step_batch):
    _, (prompts, images, kwargs) = step_batch
    with FakeChatServer(judge_answer, delay_s=DELAY_S) as server:
        functions, _ = mice_reward_functions(judges_for(server))
        timings = {}
        start = time.perf_counter()
        scores, failures, _ = score_samples(functions, prompts, images, 0, timings, **kwargs)
        wall = time.perf_counter() - start
        requests, in_flight = server.requests, server.max_in_flight
    assert failures == {}
    assert set(scores) == {"IF", "CC", "GA"} and all(len(v) == len(images) == 8 for v in scores.values())
    assert requests >= len(images)  # at least one VLM question per sample (IF), plus GA's
    assert 2 <= in_flight <= CONCURRENCY  # parallel, and never more than the back-end's limit
    assert wall < requests * DELAY_S * 0.75  # faster than one request at a time
    assert set(timings) == {"IF", "CC", "GA"} and timings["IF"] >= DELAY_S and timings["CC"] < timings["IF"]


def test_concurrency_one_sends_requests_one_at_a_time(step_batch):
    _, (prompts, images, kwargs) = step_batch
    with FakeChatServer(judge_answer, delay_s=0.02) as server:
        functions, _ = mice_reward_functions(judges_for(server, concurrency=1))
        score_samples(functions[:1], prompts, images, 0, **kwargs)
        assert server.max_in_flight == 1


@pytest.mark.slow
def test_trainer_logs_each_judge_time(tmp_path):
    from trl_editr2.testing import tiny_trainer

    with FakeChatServer(judge_answer, delay_s=0.01) as server:
        functions, weights = mice_reward_functions(judges_for(server))
        trainer = tiny_trainer(tmp_path, reward_funcs=functions, reward_weights=dict(zip(["IF", "CC", "GA"], weights)),
                               logging_steps=1)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "timing/reward" in h][-1]
    for name in ("IF", "CC", "GA"):
        assert logs[f"timing/reward/{name}"] > 0
    assert logs["timing/reward"] >= logs["timing/reward/IF"]
    assert server.requests > 0


def test_openai_config_is_what_the_yaml_names():
    vlm = OpenAIChatVLM(OpenAIChatConfig(model="m", base_url="http://127.0.0.1:9/v1", max_concurrency=16))
    assert vlm.max_concurrency == 16 and vlm.url.endswith("/v1/chat/completions")

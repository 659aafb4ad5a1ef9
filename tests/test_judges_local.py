"""Local transformers back-ends with tiny random models of the real classes (GroundingDINO, DINOv2, Qwen2.5-VL).

Random models give random answers: these tests check loading, shapes, parsing and missing handling; where an exact
value is asserted it is forced (identical images, or a generation bias that makes the VLM say "yes").
"""

import textwrap

import numpy as np
import pytest
from PIL import Image

from editr2.bench.judges import (
    CCJudge,
    IFConfig,
    IFJudge,
    LocalDetectorConfig,
    LocalModelConfig,
    LocalVLMConfig,
    RetryPolicy,
    TurnRequest,
    build_judges,
    load_judge_config,
)
from editr2.bench.judges.config import JudgeConfig
from judge_fakes import build_tiny_detector, build_tiny_features, build_tiny_vlm

pytest.importorskip("transformers")
FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.0)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_judges")
    return {"detector": build_tiny_detector(root / "det"), "features": build_tiny_features(root / "feat"),
            "vlm": build_tiny_vlm(root / "vlm")}


@pytest.fixture(scope="module")
def backends(tiny_dirs):
    from editr2.bench.judges.local import TransformersDetector, TransformersFeatures, TransformersVLM

    return {
        "detector": TransformersDetector(LocalDetectorConfig(path=str(tiny_dirs["detector"]), box_threshold=0.0)),
        "features": TransformersFeatures(LocalModelConfig(path=str(tiny_dirs["features"]))),
        "vlm": TransformersVLM(LocalVLMConfig(path=str(tiny_dirs["vlm"]), max_new_tokens=6)),
    }


def photo(seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_detector_returns_normalised_sorted_boxes(backends):
    found = backends["detector"].detect(photo(0), "red dog")
    assert found, "threshold 0 keeps every query"
    assert all(0.0 <= v <= 1.0 for d in found for v in d.box)
    assert all(d.box[0] <= d.box[2] and d.box[1] <= d.box[3] for d in found)
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert all(d.label == "red dog" for d in found)
    assert backends["detector"].detect(photo(0), "   ") == []


def test_features_tokens_and_grid(backends):
    tokens, prefix, grid = backends["features"].features([photo(1), photo(2)])
    # 64x48 input, shortest edge resized to 32 without centre crop -> 42x32 -> a 4x5 grid of 8-pixel patches
    assert prefix == 1 and grid == (4, 5) and tuple(tokens.shape) == (2, 1 + 20, 32)


def test_vlm_answers_text_and_can_be_forced(tiny_dirs, backends):
    vlm = backends["vlm"]
    answer = vlm.ask([photo(3), photo(4)], "Is the cup red? Answer yes or no.")
    assert isinstance(answer, str)
    assert vlm.ask([], "text only question") is not None
    from editr2.bench.judges.local import TransformersVLM

    tokenizer = vlm.processor.tokenizer
    yes, eos = tokenizer("yes")["input_ids"], tokenizer.eos_token_id
    forced = TransformersVLM(LocalVLMConfig(path=str(tiny_dirs["vlm"]), max_new_tokens=4, generate_kwargs={
        "sequence_bias": {tuple(yes): 100.0, tuple(yes + [eos]): 100.0}}))
    assert forced.ask([photo(5)], "Is it red?") == "yes"
    request = TurnRequest(turn=0, instruction="make the cup red", task_type="color_alter",
                          formatted_instruction="Change the color of [cup] to [red]", source_image=photo(6),
                          input_image=photo(6), output_image=photo(7), history_images=(photo(6),))
    judgement = IFJudge(forced, backends["detector"], IFConfig(num_votes=2), FAST).judge(request)
    assert judgement.status == "ok" and judgement.score == 1.0


def test_if_with_random_models_scores_or_reports_missing(backends):
    judge = IFJudge(backends["vlm"], backends["detector"], IFConfig(num_votes=2), FAST)
    src, out = photo(8), photo(9)
    for task, text in [("subject_add", "Add [dog] on the [left] of [tree]"), ("count_change",
                       "Change the count of [cup] to [2]"), ("subject_remove", "Remove [dog]"),
                       ("background_change", "Change the background to [gym]")]:
        r = TurnRequest(turn=0, instruction=text, task_type=task, formatted_instruction=text, source_image=src,
                        input_image=src, output_image=out, unchanged_objects=("cup",), history_images=(src,))
        j = judge.judge(r)
        if j.status == "ok":
            assert 0.0 <= j.score <= 1.0
        else:
            assert j.score is None and j.reason  # a random model's babble is missing, with the reason


def test_cc_with_tiny_models_identical_is_one(backends):
    judge = CCJudge(backends["features"], backends["detector"], retry=FAST)
    src = photo(10)
    r = TurnRequest(turn=0, instruction="x", task_type="subject_add", formatted_instruction="Add [x]",
                    source_image=src, input_image=src, output_image=src.copy(), unchanged_objects=("dog",),
                    all_objects=("dog", "tree"), bg_consistency=True, history_images=(src,))
    j = judge.judge(r)
    assert j.status == "ok" and j.score == pytest.approx(1.0, abs=1e-4)
    other = judge.judge(TurnRequest(**{**r.__dict__, "output_image": photo(11, (80, 60))}))
    assert other.status in ("ok", "skipped") and (other.score is None or other.score < 1.0 - 1e-4)


def test_yaml_config_builds_local_judges(tiny_dirs, tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text(textwrap.dedent(f"""
        vlm: {{backend: transformers, path: "{tiny_dirs['vlm']}", max_new_tokens: 4}}
        detector: {{path: "{tiny_dirs['detector']}", box_threshold: 0.3}}
        features: {{path: "{tiny_dirs['features']}"}}
        if: {{num_votes: 1}}
        ga: {{num_votes: 1, temperature: 0.0}}
        retry: {{max_attempts: 1, initial_backoff_s: 0}}
    """))
    config = load_judge_config(path)
    assert isinstance(config.vlm, LocalVLMConfig) and config.if_judge.num_votes == 1
    judges = build_judges(config)
    assert judges.metrics == ["IF", "CC", "GA"]
    assert judges.if_judge.detector is judges.cc_judge.detector  # one detector shared
    src = photo(12)
    ga = judges.ga_judge.judge_session([src, photo(13)], ["make it red"])
    assert len(ga) == 1 and (ga[0].status == "ok" or "judge failed" in ga[0].reason)


@pytest.mark.parametrize("data, message", [
    ({"vlm": {"backend": "magic"}}, "vlm.backend"),
    ({"vlm": {"backend": "openai", "model": "m", "base_url": "http://x/v1", "colour": 1}}, "unknown key"),
    ({"judges": {}}, "unknown judge config key"),
    ({"metrics": ["IF"]}, "IF and GA need a `vlm`"),
    ({"metrics": ["CC"]}, "CC needs a `features`"),
    ({"metrics": ["XX"]}, "unknown metric"),
    ({"features": {"device": "cpu"}, "metrics": ["CC"]}, "needs `path`"),
    ({"if": {"num_votes": 2, "min_valid_votes": 3}, "metrics": []}, "min_valid_votes"),
])
def test_config_errors_are_clear(data, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig.from_dict(data)

import numpy as np
import pytest

from editr2.rewards import DEFAULT_WEIGHTS, collect, combine


def test_combine_default_weights():
    scores = {"IF": [1.0, 0.0, 1.0], "CC": [1.0, 1.0, 0.5], "GA": [1.0, 0.0, 0.0]}
    assert combine(scores) == pytest.approx([1.0, 0.3, 0.45])
    assert DEFAULT_WEIGHTS == {"IF": 0.3, "CC": 0.3, "GA": 0.4}


def test_none_in_weighted_component_gives_none():
    scores = {"IF": [1.0, None, 1.0], "CC": [1.0, 1.0, 1.0], "GA": [1.0, 1.0, None]}
    assert combine(scores) == [pytest.approx(1.0), None, None]
    # a zero-weight component is not part of the sum, so its None does not matter
    assert combine({"IF": [1.0], "log_only": [None]}, {"IF": 1.0, "log_only": 0.0}) == [1.0]


def test_combine_errors():
    with pytest.raises(ValueError, match=r"no scores for \['GA'\]"):
        combine({"IF": [1.0], "CC": [1.0]})
    with pytest.raises(ValueError, match=r"no weight for \['ga'\]"):
        combine({"IF": [1.0], "CC": [1.0], "GA": [1.0], "ga": [1.0]})
    with pytest.raises(ValueError, match="differ in length"):
        combine({"IF": [1.0, 1.0], "CC": [1.0], "GA": [1.0]})
    with pytest.raises(ValueError, match=r"scores\['CC'\]\[0\]: expected a finite float or None, got nan"):
        combine({"IF": [1.0], "CC": [float("nan")], "GA": [1.0]})
    with pytest.raises(ValueError, match=r"scores\['IF'\]\[0\]: expected a float or None, got str"):
        combine({"IF": ["1"], "CC": [1.0], "GA": [1.0]})
    with pytest.raises(ValueError, match="scores is empty"):
        combine({})


def test_collect_calls_each_function():
    calls = []

    def instruction_following(prompts, images, **kwargs):
        calls.append(kwargs)
        return [1.0 if "red" in p else 0 for p in prompts]

    def judge(prompts, images, **kwargs):
        return [np.float32(0.5), None]

    out = collect({"IF": instruction_following, "CC": judge}, ["make it red", "add a cat"], [None, None], turn=2)
    assert out == {"IF": [1.0, 0.0], "CC": [0.5, None]} and calls == [{"turn": 2}]
    assert isinstance(out["IF"][1], float)
    assert list(collect([instruction_following], ["red"], [None])) == ["instruction_following"]


def test_collect_errors_name_the_function():
    with pytest.raises(ValueError, match=r"'short' returned 1 scores for 2 prompts"):
        collect({"short": lambda p, i: [1.0]}, ["a", "b"], [None, None])
    with pytest.raises(ValueError, match=r"'bad', sample 1: expected a finite float or None, got inf"):
        collect({"bad": lambda p, i: [1.0, float("inf")]}, ["a", "b"], [None, None])
    with pytest.raises(ValueError, match=r"'flag', sample 0: expected a float or None, got bool"):
        collect({"flag": lambda p, i: [True]}, ["a"], [None])
    with pytest.raises(ValueError, match=r"'scalar' returned float; it must return a list"):
        collect({"scalar": lambda p, i: 1.0}, ["a"], [None])


def test_trainer_scoring_marks_non_finite_scores_missing_and_counts_them():
    from trl_editr2.rewards import score_samples

    def flaky(prompts, images, **kwargs):
        return [1.0, float("nan"), float("inf"), 0.25]

    def steady(prompts, images, **kwargs):
        return [0.5] * len(prompts)

    scores, failures, nonfinite = score_samples([flaky, steady], ["a", "b", "c", "d"], [None] * 4)
    assert scores == {"flaky": [1.0, None, None, 0.25], "steady": [0.5] * 4}
    assert failures == {} and nonfinite == {"flaky": 2}
    assert combine(scores, {"flaky": 0.5, "steady": 0.5}) == [0.75, None, None, 0.375]

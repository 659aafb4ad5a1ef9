"""Judges with scripted back-ends: parsing, vote aggregation, retries -> missing, the cumulative GA rule, CC maths."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editr2.bench.judges import (
    CCJudge,
    GAConfig,
    GAJudge,
    IFConfig,
    IFJudge,
    JudgeReward,
    JudgeSet,
    Judgement,
    JudgeParseError,
    RetryPolicy,
    TurnRequest,
    aggregate_votes,
    mice_reward_functions,
    parse_formatted_instruction,
    parse_ga_answer,
    parse_yes_no,
)
from editr2.bench.judges.backends import Detection, count_distinct, iou
from editr2.bench.judges.cc_judge import masked_patch_similarity, pair_similarity
from editr2.bench.judges.protocol import BackendError, call_with_retries, parse_count, run_votes
from judge_fakes import PixelFeatures, ScriptedDetector, ScriptedVLM
from editr2.bench.mice import load_sessions

FIXTURE = Path(__file__).parent / "fixtures" / "mice_cm_sample.jsonl"
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.0)


def image(color=(120, 60, 30), size=(48, 40)):
    return Image.new("RGB", size, color)


def request(task_type, formatted, **kwargs):
    src = kwargs.pop("source", image())
    defaults = dict(turn=0, instruction=formatted, task_type=task_type, formatted_instruction=formatted,
                    source_image=src, input_image=kwargs.pop("input_image", src),
                    output_image=kwargs.pop("output_image", image((10, 200, 10))), history_images=(src,))
    defaults.update(kwargs)
    return TurnRequest(**defaults)


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and the protocol
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("yes", True), ("No.", False), ("  YES, it is red", True), ("no - it is blue", False),
    ("The answer is yes.", True), ("I think not: no", False), ("**Yes**", True),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


@pytest.mark.parametrize("text", ["maybe", "", "nothing here", "yesterday", "it could be yes or no", "nope"])
def test_parse_yes_no_refuses(text):
    with pytest.raises(JudgeParseError):
        parse_yes_no(text)


def test_parse_count():
    assert parse_count("3") == 3 and parse_count("There are 12 cups.") == 12 and parse_count("three") == 3
    with pytest.raises(JudgeParseError):
        parse_count("several")


def test_judgement_invariants():
    assert Judgement(0.5).status == "ok"
    assert Judgement.missing("x").score is None and Judgement.missing("x").is_missing
    with pytest.raises(ValueError):
        Judgement(None)  # ok needs a score
    with pytest.raises(ValueError):
        Judgement(0.5, "missing")  # missing has none
    with pytest.raises(ValueError):
        Judgement(1.0, "great")
    with pytest.raises(ValueError, match="finite"):
        Judgement(float("nan"))


def test_aggregate_votes_exact():
    j = aggregate_votes([1.0, 0.0, None, 1.0])
    assert j.score == pytest.approx(2 / 3) and j.votes == (1.0, 0.0, None, 1.0) and "1 failed" in j.reason
    assert aggregate_votes([0.0, 0.0, 0.0, 0.0]).score == 0.0
    assert aggregate_votes([None, None]).is_missing
    assert aggregate_votes([1.0, None, None], min_valid=2).is_missing
    assert aggregate_votes([1.0, 0.0, None], min_valid=2).score == 0.5


def test_retry_policy_and_backoff():
    assert RetryPolicy(4, 0.5, 2.0, 1.5).delays() == [0.5, 1.0, 1.5]
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise JudgeParseError("not yet")
        return "done"

    assert call_with_retries(flaky, RetryPolicy(3, 0.1), sleep=waits.append) == "done"
    assert waits == [0.1, 0.2]
    calls.clear()
    with pytest.raises(BackendError):  # a back-end error is not retried again
        call_with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(BackendError("down")), FAST)
    assert len(calls) == 1


def test_run_votes_retries_unparsable_then_counts_missing():
    answers = iter(["yes", "maybe", "no", "garbage", "garbage", "garbage", "yes"])
    judgement = run_votes(lambda i: (float(parse_yes_no(next(answers))), "x"), 4, FAST)
    # vote 1: yes; vote 2: maybe -> retried -> no; vote 3: 3 x garbage -> missing; vote 4: yes
    assert judgement.votes == (1.0, 0.0, None, 1.0)
    assert judgement.score == pytest.approx(2 / 3)
    failed = run_votes(lambda i: (float(parse_yes_no("???")), "x"), 2, FAST)
    assert failed.is_missing and failed.score is None and "answer is not yes/no" in failed.reason


# ---------------------------------------------------------------------------------------------------------------------
# IF
# ---------------------------------------------------------------------------------------------------------------------


def test_formatted_instruction_patterns_cover_the_fixture():
    sessions = load_sessions(FIXTURE)
    unmatched = [(s.line, t) for s in sessions for t in range(s.num_turns)
                 if parse_formatted_instruction(s.task_type[t], s.formatted_instruction[t]) is None]
    assert unmatched == [(47, 1), (48, 2)]  # the two sessions whose formatted instruction is leaked reasoning
    assert parse_formatted_instruction("subject_add", "Add [bowtie] on the [above] of [cotton white shirt]") == {
        "obj": "bowtie", "pos": "above", "ref": "cotton white shirt"}
    assert parse_formatted_instruction("text_change", "Replace the text '[ZETOR 5211]' on [metal red tractor] with "
                                       "'[FARM KING]'") == {"old": "ZETOR 5211", "obj": "metal red tractor",
                                                            "text": "FARM KING"}


def test_if_votes_are_averaged_exactly():
    vlm = ScriptedVLM(["yes", "no", "yes", "yes"])
    judge = IFJudge(vlm, None, IFConfig(num_votes=4), FAST)
    j = judge.judge(request("color_alter", "Change the color of [cup] to [red]"))
    assert j.status == "ok" and j.score == 0.75 and j.votes == (1.0, 0.0, 1.0, 1.0)
    assert len(vlm.calls) == 4 and vlm.calls[0][0] == 2  # before and after images
    assert "Is the cup now red?" in vlm.calls[0][1]


def test_if_unparsable_answers_are_retried_then_missing():
    vlm = ScriptedVLM(["I cannot tell"])
    j = IFJudge(vlm, None, IFConfig(num_votes=2), FAST).judge(request("color_alter", "Change the color of [a] to [b]"))
    assert j.is_missing and j.score is None and j.votes == (None, None)
    assert len(vlm.calls) == 2 * FAST.max_attempts
    assert "answer is not yes/no" in j.reason


def test_if_min_valid_votes():
    vlm = ScriptedVLM(["yes", "??", "??", "??"])
    cfg = IFConfig(num_votes=2, min_valid_votes=2)
    j = IFJudge(vlm, None, cfg, FAST).judge(request("material_alter", "Change the material of [a] to [wood]"))
    assert j.is_missing and j.votes == (1.0, None)


def box(x0, y0, x1, y1, label="x", score=0.9):
    return Detection(label, score, (x0, y0, x1, y1))


def test_if_subject_remove_with_detector():
    src, out = image(), image((1, 2, 3))
    boxes = {(id(src), "dog"): [box(0.1, 0.1, 0.4, 0.4)]}
    detector = ScriptedDetector(lambda im, phrase: boxes.get((id(im), phrase), []))
    judge = IFJudge(ScriptedVLM(["unused"]), detector, IFConfig(num_votes=3), FAST)
    r = request("subject_remove", "Remove [dog]", source=src, output_image=out)
    assert judge.judge(r).score == 1.0  # gone from the output
    boxes[(id(out), "dog")] = [box(0.12, 0.1, 0.4, 0.42)]
    assert judge.judge(r).score == 0.0  # still where it was
    boxes[(id(out), "dog")] = [box(0.7, 0.7, 0.9, 0.9)]
    assert judge.judge(r).score == 1.0  # a dog elsewhere is not the removed one
    skipped = judge.judge(request("subject_remove", "Remove [cat]", source=src, output_image=out))
    assert skipped.status == "skipped" and "not found in the input" in skipped.reason


def test_if_count_position_add_with_detector():
    src, out = image(), image((1, 2, 3))
    boxes = {
        (id(out), "cup"): [box(0.1, 0.1, 0.2, 0.2, score=0.9), box(0.1, 0.1, 0.2, 0.21, score=0.8),
                           box(0.5, 0.5, 0.6, 0.6)],
        (id(out), "dog"): [box(0.0, 0.4, 0.2, 0.6)],
        (id(out), "tree"): [box(0.6, 0.4, 0.9, 0.6)],
        (id(src), "dog"): [box(0.0, 0.4, 0.2, 0.6)],
        (id(src), "tree"): [box(0.6, 0.4, 0.9, 0.6)],
    }
    detector = ScriptedDetector(lambda im, phrase: boxes.get((id(im), phrase), []))
    judge = IFJudge(ScriptedVLM(["yes"]), detector, IFConfig(num_votes=2), FAST)
    assert count_distinct(boxes[(id(out), "cup")]) == 2  # the near-duplicate box is merged
    assert judge.judge(request("count_change", "Change the count of [cup] to [2]", output_image=out)).score == 1.0
    assert judge.judge(request("count_change", "Change the count of [cup] to [3]", output_image=out)).score == 0.0
    left = "Change the position of [dog] to [left] of [tree]"
    assert judge.judge(request("position_change", left, source=src, output_image=out)).score == 1.0
    right = "Change the position of [dog] to [right] of [tree]"
    assert judge.judge(request("position_change", right, source=src, output_image=out)).score == 0.0
    add = "Add [dog] on the [left] of [tree]"
    assert judge.judge(request("subject_add", add, source=src, output_image=out)).score == 1.0
    nope = IFJudge(ScriptedVLM(["no"]), detector, IFConfig(num_votes=2), FAST)
    assert nope.judge(request("subject_add", add, source=src, output_image=out)).score == 0.0


def test_if_text_background_and_generic():
    vlm = ScriptedVLM(lambda images, prompt, i: "The sign says: Summer 78" if "What text" in prompt else "yes")
    judge = IFJudge(vlm, None, IFConfig(num_votes=1), FAST)
    assert judge.judge(request("text_change", "Add text '[summer  78]' on the image")).score == 1.0
    assert judge.judge(request("text_change", "Add text '[Winter]' on the image")).score == 0.0
    assert judge.judge(request("background_change", "Change the background to [gym]")).score == 1.0
    session = load_sessions(FIXTURE)[46]  # formatted_instruction is leaked reasoning
    generic = judge.judge(request(session.task_type[1], session.formatted_instruction[1]))
    assert generic.status == "ok" and "generic check" in generic.reason
    assert "Was the edit applied" in vlm.calls[-1][1]


def test_if_detector_failure_is_missing_not_a_crash():
    def broken(im, phrase):
        raise RuntimeError("CUDA out of memory")

    judge = IFJudge(ScriptedVLM(["yes"]), ScriptedDetector(broken), IFConfig(num_votes=2), FAST)
    j = judge.judge(request("count_change", "Change the count of [cup] to [2]"))
    assert j.is_missing and "CUDA out of memory" in j.reason


# ---------------------------------------------------------------------------------------------------------------------
# GA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ("<turn_1>yes</turn_1><turn_2>yes</turn_2><turn_3>yes</turn_3><final>yes</final>", [1, 1, 1]),
    ("<turn_1>yes</turn_1><turn_2>no</turn_2><final>no</final>", [1, 0, 0]),
    ("<turn_1>no</turn_1><turn_2>yes</turn_2><turn_3>yes</turn_3>", [0, 0, 0]),  # later yes ignored: cumulative
    ("<answer_turn_1> yes </answer_turn_1>\n<answer_turn_2> no </answer_turn_2>", [1, 0, 0]),  # paper-style tags
    ("<final>yes</final>", [1, 1, 1]),
])
def test_parse_ga_answer_is_cumulative(answer, expected):
    assert parse_ga_answer(answer, 3) == expected


@pytest.mark.parametrize("answer", [
    "<turn_1>yes</turn_1><turn_3>yes</turn_3>",  # turn 2 has no verdict
    "all good",
    "<final>no</final>",  # which turn failed?
    "<turn_1>yes</turn_1><turn_2>yes</turn_2><turn_3>yes</turn_3><final>no</final>",  # contradiction
])
def test_parse_ga_answer_refuses(answer):
    with pytest.raises(JudgeParseError):
        parse_ga_answer(answer, 3)


def test_ga_votes_per_turn_and_missing_votes():
    answers = [
        "<turn_1>yes</turn_1><turn_2>yes</turn_2><turn_3>yes</turn_3>",
        "<turn_1>yes</turn_1><turn_2>no</turn_2>",
        "unparsable", "unparsable", "unparsable",  # vote 3: all attempts fail -> missing
        "<turn_1>no</turn_1><turn_2>yes</turn_2><turn_3>yes</turn_3>",
    ]
    vlm = ScriptedVLM(answers)
    images = [image((i * 40, 0, 0)) for i in range(4)]
    result = GAJudge(vlm, GAConfig(num_votes=4), FAST).judge_session(images, ["a", "b", "c"])
    assert [j.score for j in result] == [pytest.approx(2 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert result[1].votes == (1.0, 0.0, None, 0.0)
    assert len(vlm.calls) == 6 and all(n == 4 for n, _, _ in vlm.calls)  # the whole image sequence every time
    assert "Turn 3: c" in vlm.calls[0][1] and vlm.calls[0][2] == 0.6


def test_ga_all_votes_fail_is_missing_for_every_turn():
    result = GAJudge(ScriptedVLM(["??"]), GAConfig(num_votes=2), FAST).judge_session([image()] * 3, ["a", "b"])
    assert all(j.is_missing for j in result) and "no per-turn verdicts" in result[0].reason
    bad = GAJudge(ScriptedVLM(["??"]), GAConfig(num_votes=1), FAST).judge_session([image()] * 2, ["a", "b"])
    assert all(j.is_missing for j in bad) and "T + 1 images" in bad[0].reason


def test_ga_judge_of_one_turn_uses_the_prefix():
    vlm = ScriptedVLM(["<turn_1>yes</turn_1><turn_2>no</turn_2>"])
    imgs = [image((0, 0, 0)), image((50, 0, 0)), image((90, 0, 0))]
    r = request("subject_add", "Add [dog]", turn=1, instruction="second", source=imgs[0], input_image=imgs[1],
                output_image=imgs[2], history_images=tuple(imgs[:2]), history_instructions=("first",))
    j = GAJudge(vlm, GAConfig(num_votes=1), FAST).judge(r)
    assert j.score == 0.0 and vlm.calls[0][0] == 3 and "Turn 1: first\nTurn 2: second" in vlm.calls[0][1]


# ---------------------------------------------------------------------------------------------------------------------
# CC
# ---------------------------------------------------------------------------------------------------------------------


def test_pair_similarity_matches_the_formula():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 6, 5)
    cls = torch.nn.functional.cosine_similarity(tokens[0, 0], tokens[1, 0], dim=0)
    patch = torch.nn.functional.cosine_similarity(tokens[0, 1:].mean(0), tokens[1, 1:].mean(0), dim=0)
    assert pair_similarity(tokens, 1, 0.5) == pytest.approx(float(0.5 * cls + 0.5 * patch), abs=1e-6)
    same = torch.stack([tokens[0], tokens[0]])
    assert pair_similarity(same, 1) == pytest.approx(1.0, abs=1e-6)
    assert masked_patch_similarity(tokens, 1, torch.zeros(6, dtype=torch.bool)) is None


def test_iou():
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)


def cc_request(source, output, **kwargs):
    return request("subject_add", "Add [x]", source=source, output_image=output, **kwargs)


def test_cc_identical_images_score_one_and_changes_lower_it():
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    detector = ScriptedDetector({"cup": [box(0.0, 0.0, 0.5, 0.5)], "tree": [box(0.5, 0.5, 1.0, 1.0)]})
    judge = CCJudge(PixelFeatures(), detector, retry=FAST)
    same = judge.judge(cc_request(source, source.copy(), unchanged_objects=("cup",), all_objects=("cup", "tree"),
                                  bg_consistency=True))
    assert same.score == pytest.approx(1.0, abs=1e-6) and "background" in same.reason
    # Change only the tree region (masked out of the background, not an unchanged object): CC stays 1.
    edited = np.asarray(source).copy()
    edited[16:, 16:] = 255 - edited[16:, 16:]
    r = cc_request(source, Image.fromarray(edited), unchanged_objects=("cup",), all_objects=("cup", "tree"),
                   bg_consistency=True)
    assert judge.judge(r).score == pytest.approx(1.0, abs=1e-6)
    # Change the cup region: the object term drops; the background term (cup masked out) stays 1.
    edited = np.asarray(source).copy()
    edited[:16, :16] = 255 - edited[:16, :16]
    r = cc_request(source, Image.fromarray(edited), unchanged_objects=("cup",), all_objects=("cup", "tree"),
                   bg_consistency=True)
    tokens, prefix, _ = PixelFeatures().features([source.crop((0, 0, 16, 16)).resize((224, 224), Image.BICUBIC),
                                                  Image.fromarray(edited).crop((0, 0, 16, 16))
                                                  .resize((224, 224), Image.BICUBIC)])
    expected_object = pair_similarity(tokens, prefix)
    assert judge.judge(r).score == pytest.approx((expected_object + 1.0) / 2, abs=1e-5)
    assert expected_object < 0.9


def test_cc_object_term_only_without_bg_and_skipped_when_nothing_applies():
    source = image((200, 10, 10), (32, 32))
    detector = ScriptedDetector({"cup": [box(0.0, 0.0, 0.5, 0.5)]})
    judge = CCJudge(PixelFeatures(), detector, retry=FAST)
    j = judge.judge(cc_request(source, image((0, 0, 250), (64, 64)), unchanged_objects=("cup",)))
    assert j.status == "ok" and "background" not in j.reason
    nothing = judge.judge(cc_request(source, source, unchanged_objects=(), bg_consistency=False))
    assert nothing.status == "skipped" and nothing.score is None
    lost = judge.judge(cc_request(source, source, unchanged_objects=("unicorn",), bg_consistency=False))
    assert lost.status == "skipped" and "none of 1 unchanged object(s) located" in lost.reason
    no_detector = CCJudge(PixelFeatures(), None, retry=FAST)
    whole = no_detector.judge(cc_request(source, source, unchanged_objects=("cup",), bg_consistency=True))
    assert whole.score == pytest.approx(1.0, abs=1e-6) and "no detector" in whole.reason


# ---------------------------------------------------------------------------------------------------------------------
# Reward functions (TRL signature)
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_functions_trl_signature():
    vlm = ScriptedVLM(lambda images, prompt, i: "<turn_1>yes</turn_1>" if "<turn_i>" in prompt else
                      ("yes" if "red" in prompt else "maybe"), max_concurrency=4)
    judges = JudgeSet(IFJudge(vlm, None, IFConfig(num_votes=2), FAST), CCJudge(PixelFeatures(), None, retry=FAST),
                      GAJudge(vlm, GAConfig(num_votes=1), FAST))
    functions, weights = mice_reward_functions(judges)
    assert [f.__name__ for f in functions] == ["IF", "CC", "GA"] and weights == [0.3, 0.3, 0.4]
    src = image((5, 5, 5), (32, 32))
    outs = [image((200, 0, 0), (32, 32)), torch.zeros(3, 32, 32)]  # a tensor image is accepted too
    # The columns EditR2Trainer.reward_kwargs passes (extra ones are ignored).
    kwargs = dict(input_images=[src, src], source_images=[src, src], task_type=["color_alter", "color_alter"],
                  formatted_instruction=["Change the color of [cup] to [red]", "Change the color of [cup] to [blue]"],
                  unchanged_objects=[[], []], bg_consistency=[True, False], history_images=[[src], [src]],
                  history_prompts=[[], []], turn=[0, 0], rollout=[0, 1], completions=["intent a", "intent b"],
                  history_intents=[[], []], image=["a.jpg", "a.jpg"], trainer_state=object())
    if_fn, cc_fn, ga_fn = functions
    assert if_fn(["make the cup red", "make it blue"], outs, **kwargs) == [1.0, None]  # "maybe" -> missing
    assert if_fn.last_judgements[1].is_missing
    cc = cc_fn(["a", "b"], outs, **kwargs)
    assert cc[0] is not None and cc[0] < 1.0 and cc[1] is None  # CC does not apply to the second sample
    assert ga_fn(["a", "b"], outs, **kwargs) == [1.0, 1.0]
    conversational = [[{"role": "user", "content": [{"type": "text", "text": "make the cup red"}]}]]
    first = {k: v[:1] for k, v in kwargs.items() if isinstance(v, list)}
    assert if_fn(conversational, outs[:1], **first) == [1.0]
    with pytest.raises(ValueError, match="has 1 entries for 2 images"):
        if_fn(["a", "b"], outs, task_type=["color_alter"], input_images=[src, src])
    with pytest.raises(ValueError, match="input_images"):
        if_fn(["a"], outs[:1], task_type=["color_alter"])


def test_reward_from_sessions_and_turn():
    session = load_sessions(FIXTURE, limit=1)[0]
    vlm = ScriptedVLM(["yes"])
    reward = JudgeReward(IFJudge(vlm, None, IFConfig(num_votes=1), FAST))
    src = image()
    scores = reward([session.instruction[1]], [image((9, 9, 9))], sessions=[session], turn=[1],
                    input_images=[src])
    assert scores == [1.0]
    assert "Replace [plastic silver robot figurine] with [teapot]" in vlm.calls[0][1]
    assert not math.isnan(scores[0])

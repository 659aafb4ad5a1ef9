"""The IC-CoT contract: request building, answer parsing with fallbacks, and the rule-based reconstructor."""

import json
from pathlib import Path

import pytest

from editr2.bench.intent_score import score_intents, score_sessions
from editr2.bench.shapes.reconstruct import RuleBasedReconstructor
from editr2.intent import (
    FALLBACK_EMPTY,
    FALLBACK_EMPTY_AFTER_THINK,
    FALLBACK_NO_END_TAG,
    FALLBACK_TOO_LONG,
    Intent,
    build_messages,
    find_rules,
    format_answer,
    parse_answer,
    split_rule,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mice_cm_sample.jsonl"
RULE_TURN = (
    "Set a persistent rule for all following edits: peach color must be applied exclusively to the specific object "
    "being directly added or modified — do not colorize the background. With this rule active, Change the background "
    "to gym, remain the plastic silver robot figurine unchanged"
)


def test_parse_clean_answer_round_trips_format_answer():
    text = format_answer("Turn 1 set a rule.", "Make the teapot peach.")
    assert parse_answer(text, "raw") == Intent("Make the teapot peach.", "Turn 1 set a rule.", None)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("", FALLBACK_EMPTY),
        ("   ", FALLBACK_EMPTY),
        ("<think>still thinking", FALLBACK_NO_END_TAG),
        ("<think>done</think>   ", FALLBACK_EMPTY_AFTER_THINK),
        ("<think>x</think>" + "a" * 601, FALLBACK_TOO_LONG),
    ],
)
def test_malformed_answers_fall_back_to_the_raw_instruction(answer, reason):
    intent = parse_answer(answer, "make it red")
    assert intent.text == "make it red"
    assert intent.fallback_reason == reason


def test_build_messages_carries_history_rules_and_instruction():
    messages = build_messages([RULE_TURN, "Replace plastic silver robot figurine with teapot"], "Remove it", ["no blur"])
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Turn 2: Replace plastic silver robot figurine with teapot" in user
    assert "- no blur" in user and "peach color must be applied exclusively" in user
    assert 'Current instruction: "Remove it"' in user
    assert "{history}" not in build_messages([], "x", template="{instruction}|{history}|{rules}")[1]["content"]


def test_empty_instruction_is_refused():
    with pytest.raises(ValueError, match="instruction"):
        build_messages([], "  ")
    with pytest.raises(ValueError, match="instruction"):
        RuleBasedReconstructor()([], "")


def test_rules_are_found_and_split_from_the_edit():
    rule, edit = split_rule(RULE_TURN)
    assert (rule.attribute, rule.kind) == ("peach", "color")
    assert edit.startswith("Change the background to gym")
    assert split_rule("Remove the cat") == (None, "Remove the cat")
    assert find_rules([RULE_TURN, "Remove the cat"]) == [rule.text]
    material, _ = split_rule(
        "From now on, every edit must apply leather material only to the object that is being added or changed. "
        "With this rule active, Remove sofa"
    )
    assert (material.attribute, material.kind) == ("leather", "material")


def test_reconstructor_folds_rules_into_every_later_turn():
    r = RuleBasedReconstructor("mice")
    history = [RULE_TURN, "Replace plastic silver robot figurine with teapot"]
    intent = r(history, "Change the count of teapot to 3")
    assert intent.text.startswith("Change the count of teapot to 3;")
    assert "apply peach color only to the edited object" in intent.text
    assert "Turn 1 set a persistent rule" in intent.reasoning
    assert "peach" not in r(["Add a red hat"], "Remove the cat").text


def test_reconstructor_resolves_pronouns_but_not_quoted_text():
    r = RuleBasedReconstructor("mice")
    assert r(["Add a blue hat on the left of man"], "make it red").text == "Make the blue hat red."
    assert r(["Replace the dog with a cat"], "Change the count of them to 3").text == "Change the count of the cat to 3."
    quoted = r(["Add a red hat"], "Add text 'Call it a day' next to it").text
    assert quoted == "Add text 'Call it a day' next to the red hat."
    assert r([], "Remove the cat").text == "Remove the cat."


def test_intent_scoring_separates_reconstructor_from_raw_instructions():
    sessions = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    pairs = [(s["instruction"], s["formatted_instruction"]) for s in sessions]
    rule = score_sessions(pairs).summarise()["mean"]
    raw = score_sessions(pairs, lambda history, instruction: Intent(instruction)).summarise()["mean"]
    assert rule["resolved"] >= 0.98 and rule["rule_kept"] == 1.0
    assert raw["rule_kept"] < 0.5  # the raw later turns never restate the rule


def test_score_session_checks_lengths():
    with pytest.raises(ValueError, match="formatted_instruction"):
        score_intents(["a", "b"], ["a"], RuleBasedReconstructor("mice"))


def test_bench_intent_cli_scores_the_fixture(tmp_path, capsys):
    from editr2.cli import main

    out = tmp_path / "intent.json"
    assert main(["bench", "intent", "--sessions", str(FIXTURE), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["reconstructor"] == "rule" and summary["sessions"] >= 10
    assert summary["mean"]["rule_kept"] == 1.0
    assert [row["turn"] for row in summary["per_turn"]] == [1, 2, 3]

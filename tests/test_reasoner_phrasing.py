"""The reasoner stage on everyday phrasing (`phrasing: seen`, recipes/shapes_tiny/configs/reasoner_v2.yaml): its
targets, its config checks, the cheaper loss (answer logits, length buckets) and the seen / unseen evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from recipes.shapes_tiny import common, train_reasoner

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "shapes_tiny" / "configs"
MICRO = dict(tokenizer_sessions=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
             vision_hidden=16, batch_size=4, eval_every=100, eval_sessions=1, eval_turns=2, max_new_tokens=4,
             save_every=1, threads=1, template="short", phrasing="seen", grammar_fraction=0.25)


def test_everyday_targets_are_the_gold_intents_with_reader_traces():
    from editr2.bench.shapes import generate_session
    from editr2.intent import parse_answer

    notes = 0
    for family in ("cm", "cu"):
        for seed in range(6):
            session = generate_session(family, 5, seed, phrasing="seen")
            for turn in range(5):
                history, instruction, answer = common.reasoning_example(session, turn)
                assert history == session.instruction[:turn] and instruction == session.instruction[turn]
                parsed = parse_answer(answer, instruction)
                assert parsed.fallback_reason is None and parsed.text == session.gold_intent[turn]
                assert parsed.reasoning.startswith("Edit: ") and len(parsed.reasoning) < 300
                assert "—" not in parsed.reasoning.split(".")[0]  # the quote leaves a rule sentence out
                notes += "' = the " in parsed.reasoning or "Rule" in parsed.reasoning
    assert notes > 10  # the oracle reader's notes (references, places, rules) are in the traces
    session = generate_session("cm", 3, 1, phrasing="seen")
    assert common.natural_trace(session, 0, quote_edit=False).startswith("New rule: ")


def test_the_config_refuses_held_out_phrasing_and_unpaired_speedups():
    for phrasing in ("unseen", "all", "everyday"):
        with pytest.raises(ValueError, match="phrasing"):
            train_reasoner.ReasonerConfig(phrasing=phrasing)
    with pytest.raises(ValueError, match="answer_logits"):
        train_reasoner.ReasonerConfig(length_buckets=2)
    with pytest.raises(ValueError, match="length_buckets"):
        train_reasoner.ReasonerConfig(length_buckets=0)
    with pytest.raises(ValueError, match="grammar_fraction"):
        train_reasoner.ReasonerConfig(grammar_fraction=1.5)
    with pytest.raises(ValueError, match="phrasing"):
        common.tokenizer_corpus(2, phrasing="unseen")
    cfg = common.parse_args(train_reasoner.ReasonerConfig, "reasoner_short.yaml",
                            ["--config", str(CONFIGS / "reasoner_v2.yaml"), "--run_dir", "unused"])[0]
    assert (cfg.phrasing, cfg.answer_logits, cfg.length_buckets, cfg.template) == ("seen", True, 2, "short")
    assert cfg.hidden_size == 128 and cfg.save_every * 2 <= 600  # the editor's width; checkpoints every few minutes
    shipped = common.parse_args(train_reasoner.ReasonerConfig, "reasoner_short.yaml", ["--run_dir", "unused"])[0]
    assert (shipped.phrasing, shipped.answer_logits, shipped.length_buckets) == ("grammar", False, 1)


def test_answer_logits_and_length_buckets_give_the_models_loss(tmp_path):
    cfg = train_reasoner.ReasonerConfig(**{**MICRO, "batch_size": 5}, answer_logits=True)
    pipe = train_reasoner.build(cfg, tmp_path)
    model = pipe.text_encoder
    batch, copies = train_reasoner.make_batch(pipe, cfg, 0), train_reasoner.copy_batch(pipe.tokenizer, cfg, 0, 3)
    buckets = train_reasoner.make_batch(pipe, dataclasses.replace(cfg, length_buckets=3), 0)
    assert isinstance(buckets, list) and len(buckets) == 3
    lengths = [b["input_ids"].shape[1] for b in buckets]
    assert lengths == sorted(lengths) and lengths[-1] == batch["input_ids"].shape[1]
    assert sum(b["attention_mask"].numel() for b in buckets) < batch["attention_mask"].numel()
    assert sum(b["input_ids"].shape[0] for b in buckets) == 5
    with torch.no_grad():
        reference = model(**batch).loss
        # two computations of the same mean (fewer rows, another summation order): equal up to float rounding
        torch.testing.assert_close(train_reasoner.step_loss(model, batch, cfg), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(train_reasoner.step_loss(model, buckets, cfg), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(train_reasoner.answer_loss(model, copies), model(**copies).loss, rtol=1e-5,
                                   atol=1e-5)
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    with pytest.raises(ValueError, match="no trained position"):
        train_reasoner.answer_loss(model, empty)


@pytest.mark.slow
def test_everyday_reasoner_trains_and_reports_seen_and_unseen(tmp_path):
    cfg = train_reasoner.ReasonerConfig(**MICRO, max_steps=2, answer_logits=True, length_buckets=2)
    metrics = train_reasoner.train(cfg, tmp_path / "run", show_progress=False, final_sessions=1)
    assert set(metrics) >= {"grammar", "seen", "unseen", "exact_match", "step"}
    assert metrics["exact_match"] == metrics["unseen"]["exact_match"]
    for phrasing in ("seen", "unseen"):
        for family in ("cm", "cu"):
            block = metrics[phrasing][family]
            assert len(block["exact_per_turn"]) == 2 and block["exact_per_op"]
            assert "rule_kept" in block and "reference_exact" in block
    assert "exact_per_op" not in metrics["grammar"]["cm"]
    samples = json.loads((tmp_path / "run" / "eval_samples.json").read_text())
    assert {s["phrasing"] for s in samples} == {"grammar", "seen", "unseen"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    corpus = common.tokenizer_corpus(cfg.tokenizer_sessions, phrasing="seen")  # the run's tokenizer learned from it
    assert corpus != common.tokenizer_corpus(cfg.tokenizer_sessions)
    assert any("' = the " in line for line in corpus)  # the oracle reader's traces
    with pytest.raises(ValueError, match="phrasing"):  # the run folder keeps its phrasing
        train_reasoner.train(dataclasses.replace(cfg, phrasing="grammar", max_steps=3), tmp_path / "run",
                             show_progress=False)


def test_the_profile_measures_every_variant(tmp_path):
    from recipes.shapes_tiny import profile_reasoner

    cfg = train_reasoner.ReasonerConfig(**MICRO, aux_copy=((1.0, 2),))
    result = profile_reasoner.profile(cfg, tmp_path, steps=1)
    assert set(result["forward_backward_s_per_step"]) == set(profile_reasoner.VARIANTS)
    assert 0.0 <= result["padded_fraction"] < 1.0 and result["data_s_per_step"] > 0
    with pytest.raises(ValueError, match="steps"):
        profile_reasoner.profile(cfg, tmp_path, steps=0)


@pytest.mark.slow
def test_everyday_reasoner_resumes_exactly(tmp_path):
    """Length-bucketed batches and the answer-only loss resume bit for bit (the same computation on the same values)."""
    from safetensors.torch import load_file

    cfg = train_reasoner.ReasonerConfig(**{**MICRO, "eval_turns": 1}, max_steps=2, answer_logits=True,
                                        length_buckets=2)
    train_reasoner.train(cfg, tmp_path / "whole", show_progress=False, final_sessions=1)
    assert train_reasoner.train(cfg, tmp_path / "split", show_progress=False, stop_after=1) is None
    train_reasoner.train(cfg, tmp_path / "split", show_progress=False, final_sessions=1)
    a, b = (load_file(str(common.latest_checkpoint(tmp_path / n) / "model.safetensors")) for n in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_learning_rate_schedule_runs_past_warmup():
    """Warm-up, then cosine decay to a tenth (the micro runs never leave warm-up; a real run does at step `warmup`)."""
    assert common.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert common.lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert common.lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)
    assert common.lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_error_kinds_of_wrong_intents():
    from recipes.shapes_tiny.reasoner_errors import error_kind

    gold = "Move the large purple cross to the top left."
    assert error_kind(gold, "Remove the large purple cross.") == "wrong operation"
    assert error_kind(gold, "Move the small blue cross to the top left.") == "wrong object"
    assert error_kind("Move the small purple cross to the bottom center, swapping it with the large blue square "
                      "there.", "Move the small purple cross to the bottom center.") == "occupied-cell policy"
    assert error_kind(gold, "Move the large purple cross to the top right.") == "other"


@pytest.mark.slow
def test_reasoner_errors_reads_a_run_and_its_checkpoints(tmp_path, capsys):
    from recipes.shapes_tiny import reasoner_errors

    cfg = train_reasoner.ReasonerConfig(**MICRO, max_steps=1)
    train_reasoner.train(cfg, tmp_path / "run", show_progress=False, final_sessions=1)
    for extra in ([], ["--checkpoint", "step_0000001"]):
        assert reasoner_errors.main(["--run", str(tmp_path / "run"), "--sessions", "1", "--turns", "2",
                                     "--json", str(tmp_path / "errors.json"), *extra]) == 0
        out = json.loads((tmp_path / "errors.json").read_text())
        assert len(out["records"]) == 4 and sum(out["counts"].values()) == sum(not r["exact"] for r in out["records"])
    assert "exact match cm" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="config.json"):
        reasoner_errors.main(["--run", str(tmp_path)])


@pytest.mark.slow
def test_a_run_starts_from_another_runs_checkpoint_at_another_image_size(tmp_path):
    """`init_from`: the weights and tokenizer of another run's checkpoint, checked against the architecture; the image
    size may differ (reasoner_v3.yaml reads reasoner_v2's weights at 64 x 64)."""
    from safetensors.torch import load_file

    cfg = train_reasoner.ReasonerConfig(**MICRO, max_steps=2)
    assert train_reasoner.train(cfg, tmp_path / "base", show_progress=False, stop_after=1) is None
    checkpoint = tmp_path / "base" / "checkpoints" / "step_0000001"
    follow = dataclasses.replace(cfg, init_from=str(checkpoint), condition_size=64, max_steps=1)
    pipe = train_reasoner.build(follow, tmp_path / "next")
    state = load_file(str(checkpoint / "model.safetensors"))
    params = pipe.text_encoder.state_dict()
    assert all(torch.equal(params[k], v) for k, v in state.items())
    assert (tmp_path / "next" / "tokenizer" / "tokenizer.json").read_text() == \
        (tmp_path / "base" / "tokenizer" / "tokenizer.json").read_text()
    assert train_reasoner.train(follow, tmp_path / "next", show_progress=False, stop_after=1) is None

    with pytest.raises(ValueError, match="architecture differs"):
        train_reasoner.build(dataclasses.replace(follow, num_layers=2), tmp_path / "other")
    with pytest.raises(ValueError, match="checkpoint folder"):
        train_reasoner.build(dataclasses.replace(follow, init_from=str(tmp_path / "base")), tmp_path / "other2")
    with pytest.raises(ValueError, match="pass one"):
        train_reasoner.ReasonerConfig(**MICRO, init_from=str(checkpoint), base_run=str(tmp_path / "base"))


@pytest.mark.slow
def test_cu_fraction_sets_the_family_mix_and_half_keeps_the_earlier_draw():
    import random

    with pytest.raises(ValueError, match="cu_fraction"):
        train_reasoner.ReasonerConfig(cu_fraction=1.2)
    half = train_reasoner.ReasonerConfig(phrasing="seen", grammar_fraction=0.2, max_turns=4)
    draws = [train_reasoner.draw_example(random.Random(7), half)[0] for _ in range(3)]
    rng = random.Random(7)  # 0.5 draws the family with rng.choice, as the shipped runs did
    assert draws[0].family == rng.choice(("cm", "cu"))
    cu = train_reasoner.ReasonerConfig(phrasing="seen", grammar_fraction=0.2, max_turns=4, cu_fraction=0.75)
    rng = random.Random(0)
    families = [train_reasoner.draw_example(rng, cu)[0].family for _ in range(200)]
    assert 0.65 < families.count("cu") / 200 < 0.85
    v5 = common.parse_args(train_reasoner.ReasonerConfig, "reasoner_short.yaml",
                           ["--config", str(CONFIGS / "reasoner_v5.yaml"), "--run_dir", "unused"])[0]
    assert (v5.cu_fraction, v5.max_turns, v5.condition_size) == (0.75, 16, 64)
    assert v5.init_from.startswith("runs/reasoner_v4/")

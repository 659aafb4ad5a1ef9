"""recipes/shapes_tiny/reasoner_report.py: intent exact match per turn / operation / phrasing family, resumable."""

import json

import pytest

from recipes.shapes_tiny import reasoner_report, train_reasoner

MICRO = dict(tokenizer_sessions=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
             vision_hidden=16, batch_size=4, eval_every=100, eval_sessions=1, eval_turns=2, max_new_tokens=4,
             save_every=1, threads=1, template="short", phrasing="seen", grammar_fraction=0.25)


@pytest.mark.slow
def test_report_of_a_run_and_of_a_pipeline_folder(tmp_path, model_folder, capsys):
    cfg = train_reasoner.ReasonerConfig(**MICRO, max_steps=1)
    train_reasoner.train(cfg, tmp_path / "run", show_progress=False, final_sessions=1)
    out = tmp_path / "run.json"
    argv = ["--reasoner", str(tmp_path / "run"), "--sessions", "2", "--turns", "2", "--seed", "5", "--json", str(out),
            "--phrasings", "grammar", "unseen"]
    assert reasoner_report.main(argv) == 0
    data = json.loads(out.read_text())
    assert sorted(data["records"]) == ["grammar/cm", "grammar/cu", "unseen/cm", "unseen/cu"]
    for key, records in data["records"].items():
        assert len(records) == 4 and {r["seed"] for r in records} == {5, 6}
        assert all({"operation", "words", "reference", "rule_kept", "exact"} <= set(r) for r in records)
        if key.startswith("unseen"):
            assert {r["words"] for r in records} <= {"wish", "shorthand"}
    text = capsys.readouterr().out
    assert "## Exact match per turn" in text and "| grammar | cm |" in text and "## Per phrasing family" in text
    assert "| exact, turns 1-3 (each) |" in text  # the held-out targets, checked

    # resumed: nothing is evaluated again; another evaluation into the same file is refused
    assert reasoner_report.main(argv) == 0 and json.loads(out.read_text()) == {**data, "command": data["command"]}
    with pytest.raises(SystemExit, match="another evaluation"):
        reasoner_report.main([*argv[:3], "3", *argv[4:]])  # --sessions 3

    folder = model_folder({"condition_area": 32 * 32, "max_new_tokens": 4})
    md = tmp_path / "r.md"
    assert reasoner_report.main(["--reasoner", str(folder), "--sessions", "1", "--turns", "1", "--phrasings", "seen",
                                 "--json", str(tmp_path / "f.json")]) == 0
    assert reasoner_report.main(["--from-json", str(out), str(tmp_path / "f.json"), "--out", str(md)]) == 0
    table = md.read_text().split("## Per operation")[0]
    assert str(folder) in table and str(tmp_path / "run") in table


def test_the_vocabulary_gap_names_words_no_training_family_uses():
    gap = reasoner_report.vocabulary_gap(train_sessions=40, test_sessions=10, turns=3)
    assert set(gap["share"]) == {"wish", "shorthand"} and all(0 <= v <= 1 for v in gap["share"].values())
    assert gap["top"] and all(n > 0 for _, n in gap["top"])
    text = "\n".join(reasoner_report.vocabulary_section(gap))
    assert "## Words the training families never use" in text and f"`{gap['top'][0][0]}`" in text


def test_rates_are_ratios_over_sessions_with_intervals():
    records = [{"seed": s, "turn": t, "exact": (s + t) % 2 == 0} for s in range(10) for t in (1, 2)]
    value, (low, high), n = reasoner_report.rate(records)
    assert value == 0.5 and n == 20 and low <= 0.5 <= high
    assert reasoner_report.rate(records, lambda r: r["turn"] == 1)[0] == 0.5
    assert reasoner_report.rate(records, lambda r: False) is None
    assert reasoner_report.fmt(None) == "–"


@pytest.mark.slow
def test_a_model_benched_with_another_reasoners_intents(tmp_path, model_folder):
    from recipes.shapes_tiny import reasoner_swap

    cfg = train_reasoner.ReasonerConfig(**MICRO, max_steps=1)
    train_reasoner.train(cfg, tmp_path / "run", show_progress=False, final_sessions=1)
    folder = model_folder({"height": 64, "width": 64, "reference_area": None, "condition_area": 32 * 32,
                           "num_inference_steps": 2, "true_cfg_scale": 1.0})
    out = tmp_path / "bench"
    argv = ["--reasoner", str(tmp_path / "run"), "--model", str(folder), "--family", "cu", "--sessions", "2",
            "--turns", "2", "--out", str(out)]
    assert reasoner_swap.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["reasoner"] == str(tmp_path / "run") and len(results["per_turn"]) == 2
    assert len((out / "session_results.jsonl").read_text().splitlines()) == 2
    records = [json.loads(line) for line in (out / "intents.jsonl").read_text().splitlines()]
    assert [len(r["intent"]) for r in records] == [2, 2]
    with pytest.raises(SystemExit, match="text_encoder"):
        reasoner_swap.main([*argv[:1], str(tmp_path), *argv[2:]])


def test_a_pipeline_folder_is_asked_through_its_separate_reasoner(tmp_path):
    """An exported folder with a separate reasoning model is measured through it, at its own image size."""
    from diffusers_editr2.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0, reasoning_model=True)
    pipe.call_defaults = {"condition_area": 32 * 32, "reasoning_condition_area": 48 * 48, "max_new_tokens": 7}
    pipe.save_pretrained(tmp_path / "model")
    loaded, cfg = reasoner_report.load_reasoner(tmp_path / "model")
    assert loaded.reasoner is loaded.reasoning_model and cfg.condition_size == 48 and cfg.max_new_tokens == 7

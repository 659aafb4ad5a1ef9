"""`editr2 bench shapes --model`: a saved EditR2Pipeline scored on MICE-Shapes (diffusers_editr2.bench)."""

import json
import sys

import pytest

from editr2.cli import main

pytest.importorskip("diffusers")

DEFAULTS = {"height": 64, "width": 64, "reference_area": None, "condition_area": 32 * 32, "num_inference_steps": 2,
            "true_cfg_scale": 1.0, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def model_dir(model_folder):
    """The tiny pipeline folder with an `editr2_call_defaults.json` (2 steps, 64x64)."""
    return model_folder(DEFAULTS)


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every `EditR2Pipeline.__call__` (the real call still runs)."""
    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    seen, original = [], EditR2Pipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EditR2Pipeline, "__call__", spy)
    return seen


@pytest.mark.parametrize("reasoning, family", [("intent", "cm"), ("history", "cu"), ("none", "cm")])
@pytest.mark.slow
def test_bench_shapes_scores_a_model(model_dir, tmp_path, calls, reasoning, family, capsys):
    from diffusers_editr2.pipeline_editr2 import history_prompt

    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--model", str(model_dir), "--reasoning", reasoning, "--family", family,
                 "--sessions", "2", "--turns", "2", "--seed", "5", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"per_turn", "mean", "restores", "config", "drift"}
    assert [row["turn"] for row in results["per_turn"]] == [1, 2]
    vae = results["drift"]["vae"]  # the model's VAE alone: carried latent vs re-encoding each turn
    assert vae["sessions"] == 2 and [row["turn"] for row in vae["per_turn"]] == [1, 2]
    assert vae["per_turn"][0]["carried_bg_mean"] == vae["per_turn"][0]["reencoded_bg_mean"]
    assert "VAE re-encoded bg mean" in (out / "report.md").read_text()
    for row in [*results["per_turn"], results["mean"]]:
        assert {k for k in row if k != "turn" and not k.endswith("_ci")} == {"IF", "CC", "GA", "reward"}
        assert all(0.0 <= row[k] <= 1.0 for k in ("IF", "CC", "GA", "reward"))
    assert results["config"] == {"editor": f"editr2-{reasoning}", "family": family, "sessions": 2, "turns": 2,
                                 "seed": 5, "size": 64, "model": str(model_dir), "reasoning": reasoning,
                                 "sample_seed": 0, "call_kwargs": DEFAULTS}
    assert "| turn | IF | CC | GA | reward |" in (out / "report.md").read_text()
    assert f"editr2-{reasoning}" in capsys.readouterr().out

    # Every turn ran with the folder's call defaults; turn 1 starts a session, turn 2 continues it, seeds 0 and 1.
    assert len(calls) == 4
    for k, kwargs in enumerate(calls):
        assert {key: kwargs[key] for key in DEFAULTS} == DEFAULTS and kwargs["reasoning"] == reasoning
        assert ("image" in kwargs, "session" in kwargs) == ((True, False) if k % 2 == 0 else (False, True))
        assert kwargs["generator"].initial_seed() == k % 2
        if k % 2:
            assert len(kwargs["session"].turns) == 1  # the previous turn's session, carried latent and all

    records = [json.loads(line) for line in (out / "intents.jsonl").read_text().splitlines()]
    assert [(r["family"], r["seed"]) for r in records] == [(family, 5), (family, 6)]
    for r in records:
        assert len(r["intent"]) == len(r["instruction"]) == len(r["gold_intent"]) == len(r["fallback"]) == 2
        assert all(isinstance(text, str) and text.strip() for text in r["intent"])
        if reasoning == "none":
            assert r["intent"] == r["instruction"] and r["fallback"] == [None, None]
        if reasoning == "history":
            assert r["intent"] == [r["instruction"][0], history_prompt(r["instruction"][:1], r["instruction"][1])]


@pytest.mark.slow
def test_bench_shapes_model_options_override_the_call_defaults(model_dir, tmp_path, calls):
    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--model", str(model_dir), "--sessions", "1", "--turns", "1", "--steps", "3",
                 "--sample-seed", "7", "--threads", "1", "--pipeline-kwargs", '{"max_new_tokens": 2}',
                 "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["editor"] == "editr2-intent" and config["sample_seed"] == 7  # reasoning defaults to intent
    assert config["call_kwargs"] == {**DEFAULTS, "num_inference_steps": 3, "max_new_tokens": 2}
    assert len(calls) == 1 and calls[0]["num_inference_steps"] == 3 and calls[0]["max_new_tokens"] == 2
    assert calls[0]["reasoning"] == "intent" and calls[0]["generator"].initial_seed() == 7


def test_bench_shapes_refuses_model_options_without_a_model(model_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "x")
    for extra in (["--reasoning", "history"], ["--steps", "4"], ["--sample-seed", "1"], ["--threads", "2"]):
        with pytest.raises(SystemExit, match="pass --model PATH"):
            main(["bench", "shapes", "--editor", "literal", "--out", out, *extra])
    with pytest.raises(SystemExit):  # argparse: --editor and --model are mutually exclusive
        main(["bench", "shapes", "--editor", "oracle", "--model", str(model_dir), "--out", out])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no model_index.json"):
        main(["bench", "shapes", "--model", str(tmp_path), "--out", out])
    with pytest.raises(SystemExit, match="JSON object"):
        main(["bench", "shapes", "--model", str(model_dir), "--pipeline-kwargs", "[1]", "--out", out])
    monkeypatch.setitem(sys.modules, "diffusers_editr2.bench", None)  # as if diffusers were not installed
    with pytest.raises(SystemExit, match=r"pip install 'editr2\[diffusers\]'"):
        main(["bench", "shapes", "--model", str(model_dir), "--out", out])
    assert not (tmp_path / "x").exists()


def test_call_defaults_and_editor_api(model_dir, tiny_dir, tmp_path):
    import torch

    from diffusers_editr2.bench import PipelineEditor, load_bench_editor
    from diffusers_editr2.call_defaults import CALL_DEFAULTS_FILE, read_call_defaults
    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
    from editr2.bench.shapes import generate_session
    from editr2.bench.shapes.runner import run_session

    assert read_call_defaults(model_dir) == DEFAULTS
    assert load_bench_editor(tiny_dir).call_kwargs == {"reference_area": None}  # no file: work at the image's size
    assert read_call_defaults(tiny_dir) == {}  # no file, upstream's defaults (real Qwen folders)
    assert load_bench_editor(tiny_dir, fallback={}).call_kwargs == {}
    assert load_bench_editor(model_dir, fallback={}).call_kwargs == DEFAULTS
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CALL_DEFAULTS_FILE).write_text("[64, 64]")
    with pytest.raises(ValueError, match="JSON object"):
        read_call_defaults(bad)

    editor = load_bench_editor(model_dir, "none", seed=3, call_kwargs={"max_new_tokens": 1})
    assert editor.name == "editr2-none" and editor.call_kwargs == {**DEFAULTS, "max_new_tokens": 1}
    assert editor.pipe.transformer.dtype == torch.float32 and editor.pipe._progress_bar_config.get("disable") is True
    # without explicit call arguments, the editor uses those of the folder the pipeline was loaded from
    assert PipelineEditor(EditR2Pipeline.from_pretrained(str(model_dir)), "intent").call_kwargs == DEFAULTS
    with pytest.raises(ValueError, match="pass one of"):
        PipelineEditor(editor.pipe, "memory")

    session = generate_session("cu", 2, seed=11)
    images, scores = run_session(editor, session)
    assert [im.size for im in images] == [(64, 64)] * 3 and len(scores) == 2
    assert len(editor.session.turns) == 2 and [t.seed for t in editor.session.turns] == [3, 4]
    assert [t.meta.get("num_inference_steps") for t in editor.session.turns] == [2, 2]
    assert editor.intents == list(session.instruction) and len(editor.records) == 1


@pytest.mark.slow
def test_bench_shapes_model_run_resumes_and_refuses_another_model(model_dir, model_folder, tmp_path, calls):
    args = ["bench", "shapes", "--model", str(model_dir), "--family", "cu", "--turns", "2", "--seed", "4",
            "--no-progress"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*args, "--sessions", "3", "--out", str(whole)]) == 0
    assert main([*args, "--sessions", "1", "--out", str(resumed)]) == 0  # "killed" after one session
    del calls[:]
    assert main([*args, "--sessions", "3", "--out", str(resumed)]) == 0
    assert len(calls) == 4  # only the two sessions left ran, two turns each
    for name in ("results.json", "report.md", "intents.jsonl", "session_results.jsonl"):
        assert (resumed / name).read_text() == (whole / name).read_text(), name
    assert len((resumed / "intents.jsonl").read_text().splitlines()) == 3

    recorded = json.loads((resumed / "bench_config.json").read_text())
    assert recorded["reasoning"] == "intent" and len(recorded["model_fingerprint"]) == 64
    del calls[:]
    with pytest.raises(SystemExit, match=r'reasoning: "intent" \(recorded\) vs "none" \(now\)'):
        main([*args, "--reasoning", "none", "--sessions", "3", "--out", str(resumed)])
    with pytest.raises(SystemExit, match=r"(?s)call_kwargs: .*--force"):
        main([*args, "--steps", "3", "--sessions", "3", "--out", str(resumed)])
    other = model_folder({**DEFAULTS, "num_inference_steps": 3})  # same weights, other call defaults
    with pytest.raises(SystemExit, match="model_fingerprint: "):
        main([*args[:3], str(other), *args[4:], "--sessions", "3", "--out", str(resumed)])
    assert calls == []  # refused before any model ran
    assert (resumed / "results.json").read_text() == (whole / "results.json").read_text()


@pytest.mark.slow
def test_bench_shapes_gold_prompts_every_turn_with_the_gold_intent(model_dir, tmp_path, calls, capsys):
    from editr2.bench.shapes import generate_session

    out = tmp_path / "gold"
    args = ["bench", "shapes", "--model", str(model_dir), "--family", "cm", "--sessions", "2", "--turns", "2",
            "--seed", "5", "--out", str(out), "--no-progress"]
    assert main([*args, "--prompts", "gold"]) == 0
    sessions = [generate_session("cm", 2, seed) for seed in (5, 6)]
    assert len(calls) == 4
    for k, kwargs in enumerate(calls):  # the gold intent, no reasoning, turn 2 from turn 1's carried session
        assert kwargs["prompt"] == sessions[k // 2].gold_intent[k % 2] != sessions[k // 2].instruction[k % 2]
        assert kwargs["reasoning"] == "none"
        assert ("image" in kwargs, "session" in kwargs) == ((True, False) if k % 2 == 0 else (False, True))
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["editor"] == "editr2-gold" and config["prompts"] == "gold" and config["reasoning"] == "none"
    recorded = json.loads((out / "bench_config.json").read_text())
    assert recorded["prompts"] == "gold" and recorded["editor"] == "editr2-gold"
    for record in map(json.loads, (out / "intents.jsonl").read_text().splitlines()):
        assert record["intent"] == record["gold_intent"]
    assert "editr2-gold" in capsys.readouterr().out

    # The other prompt source into the same --out is refused, before the model runs; --reasoning none is the same run.
    del calls[:]
    with pytest.raises(SystemExit, match=r'(?s)another configuration.*prompts: "gold" \(recorded\) vs'):
        main(args)
    assert calls == []
    assert main([*args, "--prompts", "gold", "--reasoning", "none"]) == 0 and calls == []  # all recorded: resumed


def test_bench_shapes_gold_refusals(model_dir, tmp_path):
    from diffusers_editr2.bench import PipelineEditor
    from editr2.bench.shapes import generate_session

    out = str(tmp_path / "x")
    with pytest.raises(SystemExit, match="pass --reasoning none or leave it out"):
        main(["bench", "shapes", "--model", str(model_dir), "--prompts", "gold", "--reasoning", "intent", "--out", out])
    for editor in (["--editor", "literal"], []):  # a symbolic editor (named or the default oracle)
        with pytest.raises(SystemExit, match="--prompts only apply to a model: pass --model PATH"):
            main(["bench", "shapes", *editor, "--prompts", "gold", "--out", out])
    assert not (tmp_path / "x").exists()

    pipe = object()  # refused before the pipeline is used
    with pytest.raises(ValueError, match="pass reasoning='none'"):
        PipelineEditor(pipe, "intent", prompts="gold")
    with pytest.raises(ValueError, match="pass one of instruction, gold"):
        PipelineEditor(pipe, "none", prompts="intent")
    editor = PipelineEditor(pipe, "none", prompts="gold")
    assert editor.name == "editr2-gold"
    with pytest.raises(ValueError, match="needs the bench session"):
        editor.edit_session(None, ["add a circle"])
    session = generate_session("cm", 2, 0)
    with pytest.raises(ValueError, match="2 gold intents for 3 instructions"):
        editor.edit_session(None, [*session.instruction, "one more"], session)
    assert editor.turn_prompts(session.instruction, session) == list(session.gold_intent)


@pytest.mark.slow
def test_gold_prompts_restore_an_undo_exactly(model_dir, calls):
    import numpy as np

    from diffusers_editr2.bench import load_bench_editor
    from editr2.bench.shapes import generate_session
    from editr2.intent import parse_restore

    session, undo = next((s, t) for s in (generate_session("cu", 4, seed) for seed in range(200))
                         for t, gold in enumerate(s.gold_intent) if parse_restore(gold, t) is not None)
    editor = load_bench_editor(model_dir, reasoning="none", prompts="gold")
    images = editor.edit_session(session.source_image(), session.instruction, session)
    restored = parse_restore(session.gold_intent[undo], undo)
    assert editor.session.turns[undo].restored_from == restored
    earlier = session.source_image() if restored == 0 else images[restored - 1]
    assert np.array_equal(np.asarray(images[undo]), np.asarray(earlier))
    assert len(calls) == len(session.gold_intent) - sum(  # no model call on restore turns
        parse_restore(g, t) is not None for t, g in enumerate(session.gold_intent))
    assert editor.intents == list(session.gold_intent)

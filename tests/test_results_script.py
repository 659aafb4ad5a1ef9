"""recipes/shapes_tiny/results.py: the results grid on the tiny pipeline, resumed, rewritten from JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / training runs: `make test` runs them, `make test-fast` skips them

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "shapes_tiny" / "results.py"
DEFAULTS = {"height": 64, "width": 64, "reference_area": None, "condition_area": 32 * 32, "num_inference_steps": 2,
            "true_cfg_scale": 1.0, "max_new_tokens": 4}
EDITORS = ("literal", "oracle", "editr2-none", "editr2-intent")


def load_script():
    spec = importlib.util.spec_from_file_location("train_default_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = load_script()


@pytest.fixture(scope="module")
def model_dir(model_folder):
    """The tiny pipeline folder with 2-step, 64x64 call defaults."""
    return model_folder(DEFAULTS)


def grid_args(model_dir, out_dir) -> list[str]:
    return ["--model", str(model_dir), "--out", str(out_dir / "docs" / "results.md"), "--json",
            str(out_dir / "raw" / "results.json"), "--sessions", "2", "--long-sessions", "1", "--turns", "2",
            "--long-turns", "3", "--modes", "none", "intent", "--threads", "1", "--no-progress"]


@pytest.fixture
def count_runs(monkeypatch):
    """Counts `run_bench` calls (the real one still runs); `fail_at` makes that call raise, as an interruption."""
    from editr2.bench.shapes import runner

    calls, original = {"n": 0, "fail_at": None}, runner.run_bench

    def spy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_bench", spy)
    return calls


def test_results_grid_resumes_and_regenerates(model_dir, tmp_path, count_runs):
    argv = grid_args(model_dir, tmp_path)
    json_path, md_path = tmp_path / "raw" / "results.json", tmp_path / "docs" / "results.md"

    # An interrupted run keeps the cells it finished; the same command continues with the others only.
    count_runs["fail_at"] = 3
    with pytest.raises(KeyboardInterrupt):
        results.main(argv)
    assert sorted(json.loads(json_path.read_text())["cells"]) == ["cm/2/literal", "cm/2/oracle"]
    count_runs.update(n=0, fail_at=None)
    assert results.main(argv) == 0
    assert count_runs["n"] == 16 - 2

    data = json.loads(json_path.read_text())
    expected = {f"{f}/{t}/{e}" for f in ("cm", "cu") for t in (2, 3) for e in EDITORS}
    assert set(data["cells"]) == expected
    for key, cell in data["cells"].items():
        family, turns, editor = key.split("/")
        sessions = 2 if turns == "2" else 1
        assert cell["config"] == {"editor": editor, "family": family, "sessions": sessions, "turns": int(turns),
                                  "seed": 0, "size": 64}
        assert [row["turn"] for row in cell["per_turn"]] == list(range(1, int(turns) + 1))
        for row in [*cell["per_turn"], cell["mean"]]:
            assert all(0.0 <= row[m] <= 1.0 for m in ("IF", "CC", "GA", "reward"))
        assert cell["seconds"] >= 0 and cell["date"].endswith("UTC")
        assert ("fallback_rate" in cell) == editor.startswith("editr2")
    # The oracle paints the ground truth: it follows every instruction.
    assert all(row["IF"] == 1.0 for key in expected if key.endswith("oracle") for row in data["cells"][key]["per_turn"])
    assert data["model"] == str(model_dir) and data["call_kwargs"] == DEFAULTS and data["seed"] == 0
    assert data["command"].startswith("python -m recipes.shapes_tiny.results --model")

    text = md_path.read_text()
    assert (tmp_path / "docs" / "results_per_turn.png").stat().st_size > 1000
    assert "![Per-turn IF / CC / GA / reward per editor and family](results_per_turn.png)" in text
    assert json.dumps(DEFAULTS) in text and data["command"] in text
    for family, sessions, turns in (("cm", 2, 2), ("cu", 2, 2), ("cm", 1, 3), ("cu", 1, 3)):
        heading = f"## {family}, {sessions} sessions x {turns} turns (seeds 0..{sessions - 1})\n"
        section = text.split(heading)[1].split("\n\n")[0].strip()
        header, _, *rows = section.splitlines()
        assert header.split(" | ")[1:4] == ["t1 IF", "t1 CC", "t1 GA"] and header.endswith(" | mean reward |")
        assert [row.split(" | ")[0] for row in rows] == [f"| {e}" for e in EDITORS]
        cell = data["cells"][f"{family}/{turns}/oracle"]
        oracle_row = rows[1].strip("| ").split(" | ")
        assert len(oracle_row) == 1 + 3 * turns + 1
        assert oracle_row[1 + 3 * (turns - 1) + 2] == f"{cell['per_turn'][-1]['GA']:.3f}"
        assert oracle_row[-1] == f"{cell['mean']['reward']:.3f}"

    # Every target is listed with the status its numbers give; intent - history is not measured (mode not run).
    targets = results.check_targets(data["cells"])
    assert len(targets) == 14
    for t in targets:
        assert t["turns"] == (3 if t["turn"] == 3 else None)  # turn 3 exists only in the 3-turn sessions here
        if "history" in t["name"] or t["turn"] == 6:
            assert t["value"] is None and t["status"] == "not measured"
        else:
            assert t["status"] == ("met" if t["value"] >= t["threshold"] - 1e-9 else "missed")
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        status = t["status"] if t["status"] == "not measured" else f"**{t['status']}**"
        turns = "3 turns" if t["turns"] else "–"
        assert f"| {t['name']} | {turns} | {value} | >= {t['threshold']:.2f} |" in text
        assert [line for line in text.splitlines() if line.startswith(f"| {t['name']} |")][0].endswith(f"| {status} |")

    # A rerun skips every finished cell (and never loads the model); a cell run with other settings is run again.
    assert results.main(argv) == 0 and count_runs["n"] == 14
    data["cells"]["cu/3/editr2-none"]["config"]["sessions"] = 5
    json_path.write_text(json.dumps(data))
    assert results.main(argv) == 0 and count_runs["n"] == 15
    assert json.loads(json_path.read_text())["cells"]["cu/3/editr2-none"]["config"]["sessions"] == 1
    assert results.main([*argv, "--modes", "intent", "--families", "cm", "--sample-seed", "1"]) == 0
    assert count_runs["n"] == 17  # cm/2 and cm/3 of intent: other sampling seeds

    # --from-json rewrites the same page without the model.
    again = tmp_path / "again" / "results.md"
    assert results.main(["--json", str(json_path), "--out", str(again), "--from-json", "--model", "nowhere"]) == 0
    assert count_runs["n"] == 17
    assert again.read_text() == md_path.read_text()
    assert (again.parent / "results_per_turn.png").is_file()

    # --notes appends a section after the targets and is kept in the JSON, so a later --from-json keeps it.
    notes = tmp_path / "notes.md"
    notes.write_text("## What limits it\n\nCompounding errors.\n")
    assert results.main(["--json", str(json_path), "--out", str(again), "--from-json", "--notes", str(notes)]) == 0
    assert again.read_text().rstrip().endswith("## What limits it\n\nCompounding errors.")
    assert results.main(["--json", str(json_path), "--out", str(again), "--from-json"]) == 0
    assert "Compounding errors." in again.read_text() and count_runs["n"] == 17


def test_everyday_wording_cells_sit_beside_the_grammar(model_dir, tmp_path, count_runs):
    """`--phrasings grammar unseen`: the model's modes also run on the same sessions typed in held-out everyday
    phrasing; their tables and the side-by-side section are written, the grammar's tables and targets unchanged."""
    json_path, md_path = tmp_path / "raw.json", tmp_path / "results.md"
    argv = ["--model", str(model_dir), "--out", str(md_path), "--json", str(json_path), "--sessions", "1",
            "--turns", "2", "--long-sessions", "0", "--modes", "intent", "--families", "cm", "--threads", "1",
            "--no-progress", "--phrasings", "grammar", "unseen"]
    assert results.main(argv) == 0 and count_runs["n"] == 4
    data = json.loads(json_path.read_text())
    assert set(data["cells"]) == {"cm/2/literal", "cm/2/oracle", "cm/2/editr2-intent", "cm/2/editr2-intent/unseen"}
    assert data["cells"]["cm/2/editr2-intent/unseen"]["config"]["phrasing"] == "unseen"
    assert "phrasing" not in data["cells"]["cm/2/editr2-intent"]["config"]
    text = md_path.read_text()
    assert "| editor | cm 1x2 | cm 1x2 unseen |" in text  # wall time per cell
    everyday = text.split("## Everyday wording\n")[1]
    table = everyday.split("### cm, 1 sessions x 2 turns\n\n")[1].split("\n\n")[0]
    rows = [line.split(" | ")[0] for line in table.splitlines()]
    assert rows[2:] == ["| editr2-intent, grammar", "| editr2-intent, unseen"]
    grammar = text.split("## cm, 1 sessions x 2 turns (seeds 0..0)\n")[1].split("\n\n")[0]
    assert "unseen" not in grammar and grammar.count("\n| ") == 4  # header + literal, oracle, editr2-intent
    assert results.main(argv) == 0 and count_runs["n"] == 4  # everything stored: nothing runs again
    with pytest.raises(ValueError, match="phrasings"):
        results.plan_cells(["cm"], ["intent"], 1, 2, 0, 3, phrasings=("all",))


def cells_of(values: dict, turns: int = 3, turn: int = 3) -> dict:
    """Hand-made cells: `values[(family, editor)] = {metric: value at turn}` (at the last turn of shorter sessions;
    other turns and metrics 0)."""
    cells = {}
    for (family, editor), metrics in values.items():
        per_turn = [{"turn": t, "IF": 0.0, "CC": 0.0, "GA": 0.0, "reward": 0.0} for t in range(1, turns + 1)]
        per_turn[min(turns, turn) - 1].update(metrics)
        cells[f"{family}/{turns}/{editor}"] = {
            "per_turn": per_turn, "mean": dict.fromkeys(("IF", "CC", "GA", "reward"), 0.0),
            "config": {"editor": editor, "family": family, "sessions": 1, "turns": turns, "seed": 0, "size": 64}}
    return cells


def test_targets_on_hand_made_results():
    cells = cells_of({
        ("cm", "editr2-intent"): {"IF": 0.85, "CC": 0.919, "GA": 0.70},
        ("cm", "editr2-none"): {"GA": 0.55},  # 0.70 - 0.55 = 0.1499999... in floats: exactly 0.15 counts as met
        ("cm", "editr2-history"): {"GA": 0.56},
        ("cm", "oracle"): {"IF": 1.0, "CC": 0.95, "GA": 1.0},
        ("cu", "editr2-intent"): {"IF": 0.95, "CC": 0.95, "GA": 0.80},
        ("cu", "editr2-none"): {"IF": 0.80},
    })
    cells.update(cells_of({("cu", "editr2-history"): {"IF": 0.10}}, turns=6))  # longer: not the one read at turn 3
    cells.update(cells_of({("cu", "editr2-intent"): {"IF": 0.75, "GA": 0.3}}, turns=6, turn=6))  # read at turn 6
    cells.update(cells_of({("cu", "editr2-history"): {"IF": 0.90}}, turns=2))  # no turn 3
    got = {t["name"]: (t["value"], t["status"]) for t in results.check_targets(cells)}
    assert got == {
        "cm IF of intent, turn 3": (0.85, "met"),
        "cm CC of intent, turn 3": (0.919, "missed"),
        "cm GA of intent, turn 3": (0.70, "met"),
        "cm IF of intent, turn 6": (None, "not measured"),
        "cm GA of intent, turn 6": (None, "not measured"),
        "cu IF of intent, turn 6": (0.75, "met"),
        "cu GA of intent, turn 6": (0.3, "missed"),
        "cu IF of intent, turn 3": (0.95, "met"),
        "cu CC of intent, turn 3": (0.95, "met"),
        "cu GA of intent, turn 3": (0.80, "met"),
        "cm GA of intent - none, turn 3": (pytest.approx(0.15), "met"),
        "cm GA of intent - history, turn 3": (pytest.approx(0.14), "missed"),
        "cu IF of intent - none, turn 3": (pytest.approx(0.15), "met"),
        "cu IF of intent - history, turn 3": (None, "not measured"),
    }
    oracle = {t["name"]: t["oracle"] for t in results.check_targets(cells)}
    assert oracle["cm CC of intent, turn 3"] == 0.95 and oracle["cu CC of intent, turn 3"] is None
    assert 0.70 - 0.55 < 0.15  # the float gap really is under 0.15: the tolerance is what makes it "met"
    assert all(t["status"] == "not measured" for t in results.check_targets(cells_of({}, turns=3)))

    md = results.targets_section(results.check_targets(cells))
    assert "| cm CC of intent, turn 3 | 3 turns | 0.919 | >= 0.92 | 0.950 | **missed** |" in md
    assert "| cu IF of intent, turn 6 | 6 turns | 0.750 | >= 0.75 | – | **met** |" in md
    assert "| cu IF of intent - history, turn 3 | 3 turns | – | >= 0.15 | – | not measured |" in md
    assert "**8 of 14 targets met** (11 measured)." in md


def test_bad_settings_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        results.plan_cells(["cm"], ["intent"], 2, 3, 1, 3)
    with pytest.raises(ValueError, match="--from-json"):
        results.main(["--from-json", "--json", str(tmp_path / "none.json"), "--out", str(tmp_path / "r.md")])
    with pytest.raises(ValueError, match="training seeds"):
        results.parse_args(["--seed", "9999990"])


def test_sessions_dir_keeps_per_session_scores_that_pair(model_dir, tmp_path, count_runs):
    """`--sessions-dir`: each model cell is also an `editr2 bench shapes` folder (per-session scores, results.json),
    which `editr2 bench compare` pairs with another run of the same sessions."""
    from editr2.bench.compare_cli import compare_runs
    from editr2.bench.resume import read_results

    sessions = tmp_path / "sessions"
    argv = ["--model", str(model_dir), "--out", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json"),
            "--sessions", "2", "--turns", "2", "--long-sessions", "0", "--modes", "none", "intent", "--families",
            "cm", "--threads", "1", "--no-progress", "--sessions-dir", str(sessions)]
    assert results.main(argv) == 0
    folders = sorted(p.name for p in sessions.iterdir())
    assert folders == ["cm_2_editr2-intent", "cm_2_editr2-none", "cm_2_literal", "cm_2_oracle"]
    for name in folders:
        assert len(read_results(sessions / name / "session_results.jsonl")) == 2
    data = json.loads((tmp_path / "r.json").read_text())
    stored = json.loads((sessions / "cm_2_editr2-intent" / "results.json").read_text())
    assert stored["per_turn"] == data["cells"]["cm/2/editr2-intent"]["per_turn"]
    assert stored["config"]["reasoning"] == "intent" and stored["config"]["call_kwargs"] == data["call_kwargs"]
    paired = compare_runs(sessions / "cm_2_editr2-intent", sessions / "cm_2_editr2-none")
    assert paired["sessions"]["sessions"] == 2 and len(paired["per_turn"]) == 2
    # another model's cells cannot resume in these folders
    other = results.parse_args([*argv, "--json", str(tmp_path / "other.json")])
    with pytest.raises(Exception, match="model_sha256"):
        results.run_cell({"family": "cm", "sessions": 2, "turns": 2, "editor": "editr2-none", "mode": "none"},
                         None, 0, False, sessions / "cm_2_editr2-none", {"model_sha256": "another", "sample_seed": 0})
    assert other.sessions_dir == str(sessions)


def test_merge_adds_the_cells_of_parallel_runs(tmp_path):
    """Parts of a grid run as separate processes (own --json each) merge into one page listing every command."""
    def run_file(name, values, **extra):
        cells = {key: {**cell, "seconds": 1.0} for key, cell in cells_of(values).items()}
        data = {"cells": cells, "model": "m", "model_sha256": "abc", "seed": 0, "sample_seed": 0,
                "command": f"python -m recipes.shapes_tiny.results --json {name}", **extra}
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return path

    a = run_file("a.json", {("cm", "oracle"): {"IF": 1.0}, ("cm", "editr2-intent"): {"IF": 0.6}})
    b = run_file("b.json", {("cu", "editr2-intent"): {"IF": 0.5}})
    merged, md = tmp_path / "merged.json", tmp_path / "r.md"
    assert results.main(["--json", str(merged), "--out", str(md), "--merge", str(a), str(b)]) == 0
    data = json.loads(merged.read_text())
    assert set(data["cells"]) == {"cm/3/oracle", "cm/3/editr2-intent", "cu/3/editr2-intent"}
    assert data["commands"] == [f"python -m recipes.shapes_tiny.results --json {n}" for n in ("a.json", "b.json")]
    assert "--json a.json`; `python -m recipes.shapes_tiny.results --json b.json`" in md.read_text()
    with pytest.raises(ValueError, match="other scores"):  # the same cell twice, with other scores
        changed = run_file("b2.json", {("cu", "editr2-intent"): {"IF": 0.1}})
        results.main(["--json", str(merged), "--out", str(md), "--merge", str(changed)])
    same = run_file("d.json", {("cm", "oracle"): {"IF": 1.0}, ("cu", "editr2-none"): {"IF": 0.2}})
    assert results.main(["--json", str(merged), "--out", str(md), "--merge", str(same)]) == 0  # oracle kept once
    assert len(json.loads(merged.read_text())["cells"]) == 4
    other = run_file("c.json", {("cm", "literal"): {"IF": 1.0}}, model_sha256="def")
    with pytest.raises(ValueError, match="model_sha256"):
        results.main(["--json", str(merged), "--out", str(md), "--merge", str(other)])

"""recipes/shapes_tiny/turn_breakdown.py: IF per operation and scene size, from a bench folder alone."""

import json

import pytest

from editr2.bench.shapes import generate_session
from recipes.shapes_tiny import turn_breakdown


def _bench_folder(tmp_path, family="cu", turns=3, seeds=(0, 1, 2)):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "bench_config.json").write_text(json.dumps({"bench": "shapes", "family": family, "turns": turns,
                                                          "seed": seeds[0], "size": 64}))
    rows = [{"seed": seed, "turns": [{"turn": t, "IF": float(t % 2)} for t in range(1, turns + 1)]} for seed in seeds]
    (folder / "session_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_breakdown_counts_every_turn_by_its_operation_and_scene(tmp_path, capsys):
    folder = _bench_folder(tmp_path)
    config, rows = turn_breakdown.load_run(folder)
    tables = turn_breakdown.breakdown(config, rows)
    expected = {}
    for seed in (0, 1, 2):
        session = generate_session("cu", 3, seed)
        for k in range(3):
            key = (session.task_type[k], turn_breakdown.band(k + 1))
            total, n = expected.get(key, (0.0, 0))
            expected[key] = (total + float((k + 1) % 2), n + 1)
    assert {k: tuple(v) for k, v in tables["operation"].items()} == expected
    assert sum(n for _, n in tables["scene"].values()) == 9
    assert turn_breakdown.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "## run: cu, 3 sessions x 3 turns" in out and "IF, turns 3-4 (n)" in out


def test_a_folder_without_bench_files_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not an `editr2 bench shapes` folder"):
        turn_breakdown.load_run(tmp_path)

"""`editr2 bench shapes`: writes results.json (per_turn / mean / config), report.md and per_turn.png."""

import argparse
import json
import re

import pytest

from editr2.bench import shapes_cli


def _run(argv):
    parser = argparse.ArgumentParser()
    shapes_cli.add_arguments(parser)
    return shapes_cli.run(parser.parse_args(argv))


@pytest.mark.parametrize("editor, family", [("oracle", "cm"), ("literal", "cu")])
@pytest.mark.slow
def test_cli_writes_the_three_files(tmp_path, editor, family, capsys):
    out = tmp_path / "bench"
    assert _run(["--editor", editor, "--family", family, "--sessions", "4", "--turns", "3", "--seed", "7",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"per_turn", "mean", "restores", "config", "drift"}
    assert [row["turn"] for row in results["drift"]["per_turn"]] == [1, 2, 3]
    assert [row["turn"] for row in results["per_turn"]] == [1, 2, 3]
    metrics = {"IF", "CC", "GA", "reward"}
    assert all(set(row) == {"turn", *metrics, *(f"{m}_ci" for m in metrics)} for row in results["per_turn"])
    assert set(results["mean"]) == {*metrics, *(f"{m}_ci" for m in metrics)}
    for row in [*results["per_turn"], results["mean"]]:
        assert all(row[f"{m}_ci"][0] <= row[m] <= row[f"{m}_ci"][1] for m in metrics)
    assert results["config"] == {"editor": editor, "family": family, "sessions": 4, "turns": 3, "seed": 7,
                                 "size": 64}
    if editor == "oracle":
        assert results["mean"] == {**{m: 1.0 for m in metrics}, **{f"{m}_ci": [1.0, 1.0] for m in metrics}}
    report = (out / "report.md").read_text()
    assert "| turn | IF | CC | GA | reward |" in report and "**mean**" in report
    low, high = results["per_turn"][0]["IF_ci"]
    assert f"| 1 | {results['per_turn'][0]['IF']:.3f} [{low:.3f}, {high:.3f}] |" in report
    assert "95% percentile bootstrap interval over 4 sessions" in report
    assert "## Drift per turn (4 sessions)" in report and "## Decay summary" in report
    assert (out / "per_turn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_cli_is_registered_and_validates():
    from editr2.cli import COMMANDS

    assert COMMANDS[("bench", "shapes")] == "editr2.bench.shapes_cli"
    assert shapes_cli.__doc__.strip().splitlines()[0]
    with pytest.raises(SystemExit):
        _run(["--turns", "17", "--out", "x"])
    with pytest.raises(SystemExit):
        _run(["--editor", "magic", "--out", "x"])


def _files(out):
    return {name: (out / name).read_text() for name in ("results.json", "report.md")}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_report(tmp_path, capsys):
    args = ["--editor", "literal", "--family", "cu", "--turns", "3", "--seed", "3", "--no-progress"]
    whole = tmp_path / "whole"
    assert _run([*args, "--sessions", "6", "--out", str(whole)]) == 0
    lines = (whole / "session_results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["session_id"] == "cu_3"

    # "Killed" after 2 sessions (a run with fewer), then the full command again: only the 4 others run.
    resumed = tmp_path / "resumed"
    assert _run([*args, "--sessions", "2", "--out", str(resumed)]) == 0
    assert _run([*args, "--sessions", "6", "--out", str(resumed)]) == 0
    assert (resumed / "session_results.jsonl").read_text().splitlines() == lines
    assert _files(resumed) == _files(whole)

    # Killed mid-write after 4 sessions (the tail deleted, a cut last line): the same report again.
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("session_results.jsonl", "bench_config.json"):
        (cut / name).write_text((whole / name).read_text())
    (cut / "session_results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
    assert _run([*args, "--sessions", "6", "--out", str(cut)]) == 0
    assert (cut / "session_results.jsonl").read_text().splitlines() == lines
    assert _files(cut) == _files(whole)

    # Fewer sessions than recorded: the report covers the ones asked for, as an uninterrupted run of 2 would.
    two = tmp_path / "two"
    assert _run([*args, "--sessions", "2", "--out", str(two)]) == 0
    assert _run([*args, "--sessions", "2", "--out", str(whole)]) == 0
    assert _files(whole) == _files(two)
    capsys.readouterr()


@pytest.mark.slow
def test_another_configuration_is_refused_unless_forced(tmp_path):
    out = tmp_path / "bench"
    assert _run(["--editor", "literal", "--sessions", "2", "--turns", "2", "--out", str(out), "--no-progress"]) == 0
    recorded = json.loads((out / "bench_config.json").read_text())
    assert recorded == {"bench": "shapes", "editor": "literal", "family": "cm", "turns": 2, "seed": 0, "size": 64}
    before = (out / "session_results.jsonl").read_text()
    for other, named in ((["--editor", "oracle"], 'editor: "literal" (recorded) vs "oracle" (now)'),
                         (["--editor", "literal", "--turns", "3"], "turns: 2 (recorded) vs 3 (now)"),
                         (["--editor", "literal", "--family", "cu"], "family:")):
        with pytest.raises(SystemExit, match=r"(?s)another configuration.*" + re.escape(named) + ".*--force"):
            _run(["--sessions", "2", "--turns", "2", *other, "--out", str(out), "--no-progress"])
    assert (out / "session_results.jsonl").read_text() == before
    assert _run(["--editor", "oracle", "--sessions", "2", "--turns", "2", "--out", str(out), "--no-progress",
                 "--force"]) == 0
    assert json.loads((out / "results.json").read_text())["mean"]["reward"] == 1.0
    assert json.loads((out / "bench_config.json").read_text())["editor"] == "oracle"
    # A results folder written before the configuration was recorded is refused as well.
    (out / "bench_config.json").unlink()
    with pytest.raises(SystemExit, match="no bench_config.json"):
        _run(["--editor", "oracle", "--sessions", "2", "--turns", "2", "--out", str(out), "--no-progress"])

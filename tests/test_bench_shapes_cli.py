"""`editr2 bench shapes`: writes results.json (per_turn / mean / config), report.md and per_turn.png."""

import argparse
import json

import pytest

from editr2.bench import shapes_cli


def _run(argv):
    parser = argparse.ArgumentParser()
    shapes_cli.add_arguments(parser)
    return shapes_cli.run(parser.parse_args(argv))


@pytest.mark.parametrize("editor, family", [("oracle", "cm"), ("literal", "cu")])
def test_cli_writes_the_three_files(tmp_path, editor, family, capsys):
    out = tmp_path / "bench"
    assert _run(["--editor", editor, "--family", family, "--sessions", "4", "--turns", "3", "--seed", "7",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"per_turn", "mean", "config"}
    assert [row["turn"] for row in results["per_turn"]] == [1, 2, 3]
    assert all(set(row) == {"turn", "IF", "CC", "GA", "reward"} for row in results["per_turn"])
    assert set(results["mean"]) == {"IF", "CC", "GA", "reward"}
    assert results["config"] == {"editor": editor, "family": family, "sessions": 4, "turns": 3, "seed": 7,
                                 "size": 64}
    if editor == "oracle":
        assert results["mean"] == {"IF": 1.0, "CC": 1.0, "GA": 1.0, "reward": 1.0}
    report = (out / "report.md").read_text()
    assert "| turn | IF | CC | GA | reward |" in report and "**mean**" in report
    assert (out / "per_turn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_cli_is_registered_and_validates():
    from editr2.cli import COMMANDS

    assert COMMANDS[("bench", "shapes")] == "editr2.bench.shapes_cli"
    assert shapes_cli.__doc__.strip().splitlines()[0]
    with pytest.raises(SystemExit):
        _run(["--turns", "9", "--out", "x"])
    with pytest.raises(SystemExit):
        _run(["--editor", "magic", "--out", "x"])

"""One bench stack: the editor protocol, runner core and report writer shared by `bench shapes` and `bench mice`."""

import pytest

from editr2.bench import mice_cli, report
from editr2.bench.editors import IdentityEditor
from editr2.bench.runner import EditorOutputError, run_sessions
from editr2.bench.shapes import generate_session
from editr2.bench.shapes.runner import run_bench, run_session


class SourceEditor:
    """A session-level editor (no turn-level call): returns the source at every turn."""

    name = "source"

    def edit_session(self, source, instructions, session):
        return [source.copy() for _ in instructions]


@pytest.mark.slow
def test_both_benches_take_the_same_editors():
    assert mice_cli.EDITORS["identity"] is IdentityEditor
    assert run_bench(SourceEditor(), "cu", 3, 2, seed=1, progress=False)["per_turn"] == \
        run_bench(IdentityEditor(), "cu", 3, 2, seed=1, progress=False)["per_turn"]


def test_an_editor_must_return_one_image_per_turn():
    class Short(SourceEditor):
        def edit_session(self, source, instructions, session):
            return [source]

    with pytest.raises(EditorOutputError, match=r"editor source returned 1 item\(s\) for 2 turns"):
        run_session(Short(), generate_session("cm", 2, 0))


def test_run_sessions_appends_new_records_and_passes_the_recorded_ones(tmp_path):
    path = tmp_path / "results.jsonl"
    steps = []

    def step(session_id, session, earlier):
        steps.append((session_id, earlier))
        return (None, "reused") if earlier else ({"session_id": session_id, "value": session}, "run")

    assert run_sessions([("a", 1), ("b", 2)], step, path) == {"run": 2}
    assert run_sessions([("a", 1), ("c", 3)], step, path) == {"reused": 1, "run": 1}
    assert steps[2] == ("a", {"session_id": "a", "value": 1}) and len(path.read_text().splitlines()) == 3


def test_one_report_writer_and_plot(tmp_path):
    rows = [{"turn": 1, "IF": 0.5, "reward": None}, {"turn": 2, "IF": 1.0, "reward": 0.3}]
    paths = report.write_report({"per_turn": rows}, tmp_path, markdown="# r\n", json_name="summary.json",
                                plot={"title": "t", "keys": ["IF", "reward"]}, plot_section=True)
    assert paths["report"].read_text() == "# r\n\n## Plot\n\n![per-turn scores](per_turn.png)\n"
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG" and paths["results"].name == "summary.json"

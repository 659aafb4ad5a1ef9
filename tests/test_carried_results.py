"""docs/results_carried.md is rewritten from committed bench folders alone (recipes/shapes_tiny/carried_results.py)."""

import pytest

from editr2.cli import main as editr2_main
from recipes.shapes_tiny import carried_results


def _bench(out, editor, family="cm", sessions=3, turns=2):
    args = ["bench", "shapes", "--editor", editor, "--family", family, "--sessions", str(sessions), "--turns",
            str(turns), "--out", str(out), "--no-progress"]
    assert editr2_main(args) == 0


@pytest.mark.slow
def test_page_pairs_the_arms_of_each_setting(tmp_path):
    _bench(tmp_path / "shipped_gold_cm6", "literal")
    _bench(tmp_path / "carried_gold_cm6", "oracle")
    _bench(tmp_path / "shipped_intent_cu3", "literal", family="cu")  # no carried arm: left out
    out = tmp_path / "page.md"
    assert carried_results.main(["--runs", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## carried vs shipped: the editor alone, cm, 100 x 6 turns" in text
    assert "intent_cu3" not in text and "the full model" not in text
    assert "**Paired difference**" in text and "| 1 |" in text
    assert "**Drift per turn**" not in text  # only for the arms in DRIFT_ARMS


@pytest.mark.slow
def test_keep_arm_shows_the_drift_per_turn(tmp_path):
    _bench(tmp_path / "default_gold_cm16", "literal", turns=3)
    _bench(tmp_path / "keep_gold_cm16", "oracle", turns=3)
    out = tmp_path / "page.md"
    assert carried_results.main(["--runs", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## keep vs default: the editor alone, cm, 50 x 16 turns" in text and "**Drift per turn**" in text
    table = text.split("**Drift per turn**")[1].split("\n\n")[1]
    header, _, *rows = table.splitlines()
    assert header.startswith("| turn | default bg_mean |") and "keep position_shift" in header
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2", "| 3"]
    oracle = rows[0].strip("| ").split(" | ")[5:9]
    assert oracle[:2] == ["0.0000", "0.0000"]  # the oracle paints the truth: no background error


@pytest.mark.slow
def test_page_needs_a_complete_comparison(tmp_path):
    _bench(tmp_path / "shipped_gold_cm6", "literal")
    with pytest.raises(SystemExit, match="no comparison has both of its folders"):
        carried_results.main(["--runs", str(tmp_path), "--out", str(tmp_path / "page.md")])
    with pytest.raises(SystemExit, match="no such folder"):
        carried_results.main(["--runs", str(tmp_path / "missing")])

"""benchmarks/drift_real.py: its photo drift measures on known answers, and the whole script at tiny size on CPU."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "drift_real.py"


@pytest.fixture(scope="module")
def drift_real():
    spec = importlib.util.spec_from_file_location("drift_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photo(size: int = 64) -> np.ndarray:
    """A smooth textured image (a stand-in photo) in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    return np.stack([0.5 + 0.3 * np.sin(7 * x + 3 * y), 0.5 + 0.3 * np.cos(5 * y - 2 * x),
                     0.5 + 0.2 * np.sin(4 * x * y + 1)], -1).astype(np.float32)


def test_measures_on_known_answers(drift_real):
    src = _photo()
    mask = drift_real.untouched_mask(64, 64, [(0.0, 0.0, 0.25, 0.25)])
    assert mask.sum() == 64 * 64 - 16 * 16 and not mask[:16, :16].any()
    same = drift_real.measure(src, src, mask)
    assert same == {"bg_mean": 0.0, "bg_worst": 0.0, "color_shift": 0.0, "shift_px": 0.0, "zoom": 0.0}
    moved = np.roll(src, (3, 4), axis=(0, 1))
    assert drift_real.translation(moved, src, mask) == pytest.approx(5.0)
    zoomed = drift_real._rescale(src, 1.03)
    assert drift_real.zoom_change(zoomed, src, mask) == pytest.approx(0.03, abs=1e-6)
    brighter = drift_real.measure(np.clip(src + 0.04, 0, 1), src, mask)
    assert brighter["bg_mean"] == pytest.approx(0.04, abs=1e-3)
    assert brighter["color_shift"] == pytest.approx(0.04 * np.sqrt(3), abs=2e-3)
    assert brighter["shift_px"] == 0.0 and brighter["zoom"] == 0.0


def test_edits_and_arguments(drift_real):
    assert len(drift_real.EDITS) == 12
    union = drift_real.untouched_mask(64, 64, [box for _, box in drift_real.EDITS])
    assert 0.4 < union.mean() < 0.7  # most of the photo should be left alone
    with pytest.raises(SystemExit):
        drift_real.parse_args(["--tiny", "--turns", "13"])
    with pytest.raises(SystemExit):
        drift_real.parse_args(["--tiny", "--size", "50"])


@pytest.mark.slow
def test_tiny_run_on_cpu(drift_real, tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "drift.json"
    results = drift_real.main(["--tiny", "--turns", "2", "--size", "32", "--steps", "2", "--json", str(out)])
    assert json.loads(out.read_text())["config"]["turns"] == 2
    assert set(results["per_turn"]) == set(drift_real.VARIANTS)
    for rows in results["per_turn"].values():
        assert [r["turn"] for r in rows] == [1, 2]
        assert all(np.isfinite(r[k]) for r in rows for k in drift_real.MEASURES)
    carried = [r["bg_mean"] for r in results["per_turn"]["vae-carried"]]
    reencoded = results["per_turn"]["vae-reencoded"]
    assert reencoded[0]["bg_mean"] == carried[0]  # one round trip either way at turn 1 (the same computation)
    assert "**bg_mean**" in capsys.readouterr().out

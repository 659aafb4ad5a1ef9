"""recipes/shapes_tiny/vae_roundtrip.py: the oracle parser on a VAE's round trips, with intervals and error kinds."""

import json

import pytest

from editr2.bench.shapes.world import Obj, Scene
from recipes.shapes_tiny import vae_roundtrip


def test_misread_names_what_went_wrong():
    cross = Obj("cross", "red", "small", (0, 1))
    assert vae_roundtrip.misread(cross, Scene(objects=(cross,))) is None
    assert vae_roundtrip.misread(cross, Scene()) == "small cross -> missing"
    diamond = Obj("diamond", "red", "small", (0, 1))
    assert vae_roundtrip.misread(cross, Scene(objects=(diamond,))) == "small cross -> shape diamond"
    both = Obj("diamond", "blue", "large", (0, 1))
    wrong = "small cross -> shape diamond, color blue, size large"
    assert vae_roundtrip.misread(cross, Scene(objects=(both,))) == wrong


def test_summary_counts_objects_over_scenes():
    rows = [{"objects": 2, "objects_exact": 2, "scene_exact": True, "psnr": 30.0, "background_kept": 1.0},
            {"objects": 3, "objects_exact": 1, "scene_exact": False, "psnr": 20.0, "background_kept": 0.5}]
    out = vae_roundtrip.summarize(rows, vae_roundtrip.collections.Counter({"small cross -> shape diamond": 2}))
    assert out["objects"] == 5 and out["object_accuracy"] == pytest.approx(3 / 5)
    assert out["scene_accuracy"] == 0.5 and out["psnr"] == 25.0
    lo, hi = out["object_accuracy_ci"]
    assert lo <= 3 / 5 <= hi
    assert out["errors"] == {"small cross -> shape diamond": 2}


@pytest.mark.slow
def test_command_on_a_vae_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "rt.json"
    assert vae_roundtrip.main(["--vae", str(tiny_dir / "vae"), "--images", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    result = data["vaes"][str(tiny_dir / "vae")]
    misread = sum(v for k, v in result["errors"].items() if k != "spurious object")
    assert round(result["object_accuracy"] * result["objects"]) + misread == result["objects"]
    assert data["command"].startswith("python -m recipes.shapes_tiny.vae_roundtrip --vae")
    assert "| VAE | objects exact" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="config.json"):
        vae_roundtrip.main(["--vae", str(tmp_path)])

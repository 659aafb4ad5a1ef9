"""`editr2 demo` (what `make demo` runs): the symbolic run without a model, scored and reported."""

import json

import pytest

from editr2.cli import main


@pytest.mark.slow
def test_demo_without_a_model_scores_the_symbolic_editors(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "missing"), "--sessions", "4"]) == 0
    printed = capsys.readouterr().out
    assert "No model at" in printed and "| cm | oracle | 3 | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    for family in ("cm", "cu"):
        for editor in ("oracle", "literal", "identity"):
            folder = out / f"{family}_{editor}"
            assert {p.name for p in folder.iterdir()} >= {"results.json", "report.md", "per_turn.png"}
        oracle = json.loads((out / f"{family}_oracle" / "results.json").read_text())
        identity = json.loads((out / f"{family}_identity" / "results.json").read_text())
        assert oracle["mean"]["GA"] == 1.0 and identity["mean"]["IF"] == 0.0


@pytest.mark.slow
def test_demo_with_a_model_uses_its_call_defaults(tmp_path, model_folder, capsys):
    defaults = {"height": 64, "width": 64, "reference_area": None, "num_inference_steps": 2, "max_new_tokens": 4}
    model = model_folder(defaults)
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model), "--out", str(out), "--turns", "2"]) == 0
    printed = capsys.readouterr().out
    assert "== cm session" in printed and "== cu session" in printed and printed.count("IF=") == 6
    assert "everyday words (held-out phrasing)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [len(summary[f]) for f in ("cm", "cu", "cu_everyday")] == [2, 2, 2]
    for family in ("cm", "cu", "cu_everyday"):
        assert (out / family / "filmstrip.png").is_file()
        assert json.loads((out / family / "session.json").read_text())["turns"][1]["meta"]["num_inference_steps"] == 2


def test_filmstrip_captions_have_no_missing_glyph_boxes():
    # MICE-Shapes rules use an em dash; Pillow's default font has no glyph for it and would print a box
    from editr2.filmstrip import _font, _wrap

    font = _font(11)
    def glyph(ch):
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    box = glyph("\uffff")  # what a missing glyph renders as
    assert glyph("\u2014") == box  # the font still lacks the em dash (else this test and _PLAIN can go)
    lines = _wrap("only on the object \u2014 leave \u201cthe rest\u201d as it\u2019s \u2013 unchanged", font, 600, 3)
    assert lines == ["only on the object - leave \"the rest\" as it's - unchanged"]
    assert all(glyph(ch) != box for ch in lines[0])

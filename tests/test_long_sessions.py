"""Sessions of up to 16 turns: references and the colour rule stay coherent, the oracle still scores 1, and sessions
of at most 8 turns are exactly those generated before 16 turns were allowed (recorded results stay valid)."""

import hashlib
import json
from pathlib import Path

import pytest

from editr2.bench.editors import make_editor
from editr2.bench.shapes import generate_session
from editr2.bench.shapes.grammar import REFERENCES, check_command
from editr2.bench.shapes.reconstruct import reconstruct
from editr2.bench.shapes.runner import run_bench
from editr2.bench.shapes.sessions import MAX_TURNS

# sha256 of the sorted-key JSON of every session (cm then cu, turns 1..8, seeds 0..39), as generated when sessions
# stopped at 8 turns.
SHORT_SESSIONS_SHA256 = "7b24d19f8775645d3d4d7808fdc64b44504f3fbc109257434ed9308281ef49ec"


@pytest.fixture(scope="module")
def long_sessions():
    return {fam: [generate_session(fam, 16, seed) for seed in range(60)] for fam in ("cm", "cu")}


def test_max_turns_is_16():
    assert MAX_TURNS == 16
    assert generate_session("cu", 16, 0).num_turns == 16
    with pytest.raises(ValueError, match="num_turns"):
        generate_session("cu", 17, 0)


def test_sessions_up_to_8_turns_are_unchanged():
    digest = hashlib.sha256()
    for fam in ("cm", "cu"):
        for turns in range(1, 9):
            for seed in range(40):
                digest.update(json.dumps(generate_session(fam, turns, seed).to_json(), sort_keys=True).encode())
    assert digest.hexdigest() == SHORT_SESSIONS_SHA256


def test_every_reference_resolves_uniquely_over_16_turns(long_sessions):
    late = {key: 0 for key in REFERENCES}
    for group in long_sessions.values():
        for s in group:
            for t in range(s.num_turns):
                cmd = s.commands[t]
                if cmd.op != "undo":  # the referent is the one object of that description in the scene
                    assert check_command(s.scenes[t], cmd) is None
                if s.references[t] in REFERENCES:
                    assert len(s.scenes[t].find(cmd.target)) == 1
                    late[s.references[t]] += t + 1 >= 12
                # the text alone (history + instruction) resolves to the gold intent, at every turn
                assert reconstruct(s.instruction[:t], s.instruction[t])[1] == s.gold_intent[t], (s.family, s.seed, t)
    assert all(n >= 3 for n in late.values()), late  # "the one you added first" etc. still occur after 12 edits


def test_a_turn_1_rule_still_binds_at_turn_16(long_sessions):
    late_adds = 0
    for s in long_sessions["cm"]:
        rule = s.rule_color
        assert all(f"apply {rule} color only" in g for g in s.gold_intent)  # turn 16's intent carries the rule
        for t, cmd in enumerate(s.commands, start=1):
            assert cmd.op != "color_alter"
            if cmd.op in ("subject_add", "subject_replace"):
                assert cmd.color == rule and cmd.color_from_rule
                late_adds += t >= 12
    assert late_adds >= 10


@pytest.mark.parametrize("family", ["cm", "cu"])
@pytest.mark.slow
def test_oracle_scores_one_on_16_turns(family):
    results = run_bench(make_editor("oracle"), family=family, num_sessions=6, num_turns=16, seed=0, progress=False)
    assert len(results["per_turn"]) == 16
    assert all(row[k] == 1.0 for row in results["per_turn"] for k in ("IF", "CC", "GA"))


@pytest.mark.slow
def test_long_sessions_section_is_written_between_markers(tmp_path):
    from recipes.shapes_tiny import long_sessions as script

    cells = {}
    for family in ("cm", "cu"):
        for mode, editor in (("intent", "oracle"), ("none", "literal")):
            results = run_bench(make_editor(editor), family=family, num_sessions=2, num_turns=12, seed=0,
                                progress=False)
            cells[script.cell_key(family, mode)] = {**results, "wall_s": 3.0, "date": "2026-12-06 16:00 UTC"}
    vae_row = {"carried_bg_mean": 0.004, "carried_bg_worst": 0.01, "reencoded_bg_mean": 0.02,
               "reencoded_bg_worst": 0.05}
    vae = {"per_turn": [{"turn": t, **vae_row} for t in range(1, 13)], "summary": {"slope": 0.001,
                                                                                 "slope_ci": [0.0, 0.002]},
           "sessions": 2}
    data = {"command": "python -m recipes.shapes_tiny.long_sessions --turns 12", "model": "m", "turns": 12,
            "sessions": 2, "seed": 0, "cells": cells, "vae": {"cm": vae, "cu": vae}, "json": "docs/r.json"}
    text = script.section(data, "r.png")
    assert text.startswith(script.BEGIN) and text.rstrip().endswith(script.END)
    assert "| editr2-intent | 1.00 | 1.00 | 1.00 |" in text  # the oracle stands in for a mode here: IF = CC = GA = 1
    assert "VAE only, re-encoded each turn" in text and "Not run yet" in text
    assert "turn 12 IF 1.00 (>= 0.7: met)" in text and "](r.json)" in text
    data["json"] = "runs/long_sessions/results.json"  # a page elsewhere links the raw results relative to itself
    assert "](../runs/long_sessions/results.json)" in script.section(data, None, Path("docs"))
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nintro\n")
    script.write_section(page, text)
    script.write_section(page, text)  # rewriting replaces the section, it does not append a second one
    assert page.read_text().count(script.BEGIN) == 1 and page.read_text().startswith("# Results\n\nintro\n")
    script.plot(data, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_16_turns(tmp_path):
    import argparse

    from editr2.bench import shapes_cli

    parser = argparse.ArgumentParser()
    shapes_cli.add_arguments(parser)
    out = tmp_path / "bench"
    args = parser.parse_args(["--editor", "oracle", "--family", "cu", "--sessions", "1", "--turns", "16",
                              "--out", str(out), "--no-progress"])
    assert shapes_cli.run(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["per_turn"]) == len(results["drift"]["per_turn"]) == 16
    assert (out / "drift.png").is_file() and "| 16 |" in (out / "report.md").read_text()

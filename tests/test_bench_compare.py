"""Bootstrap intervals of bench shapes results, the paired bootstrap, and `editr2 bench compare` of two runs."""

import json

import numpy as np
import pytest

from editr2.bench.stats import bootstrap_ci, paired_bootstrap_ci
from editr2.cli import main

ARGS = ["--family", "cm", "--sessions", "5", "--turns", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three bench shapes folders over the same 5 cm sessions (oracle, literal, identity) and one over other seeds."""
    root = tmp_path_factory.mktemp("runs")
    for editor in ("oracle", "literal", "identity"):
        assert main(["bench", "shapes", "--editor", editor, *ARGS, "--out", str(root / editor)]) == 0
    assert main(["bench", "shapes", "--editor", "oracle", *ARGS[:-3], "--seed", "0", "--no-progress",
                 "--out", str(root / "other_seeds")]) == 0
    return root


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=40)
    b = a + 0.1 + rng.normal(scale=0.01, size=40)  # a small shift, nearly the same on every session
    low, high = paired_bootstrap_ci(a, b)
    assert low <= float(np.mean(b - a)) <= high and 0.09 < low and high < 0.11
    assert paired_bootstrap_ci(a, b) == (low, high)  # seeded
    # Paired, the session-to-session spread cancels: far narrower than the two arms' own intervals.
    a_low, a_high = bootstrap_ci(a, np.mean)
    assert high - low < (a_high - a_low) / 5
    # The same draws as bootstrap_ci over as many rows.
    assert paired_bootstrap_ci(np.zeros(40), b) == bootstrap_ci(b, np.mean)
    # Rows are resampled whole: a (sessions, turns) matrix with a per-session statistic.
    assert paired_bootstrap_ci(np.ones((3, 2)), np.full((3, 2), 2.0)) == (1.0, 1.0)
    assert paired_bootstrap_ci([0.5], [0.75]) == (0.25, 0.25)  # one session: the difference itself


def test_paired_bootstrap_ci_refuses_bad_input():
    with pytest.raises(ValueError, match="same sessions"):
        paired_bootstrap_ci(np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match="at least one row"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="coverage in"):
        paired_bootstrap_ci(np.zeros(4), np.zeros(4), level=95)
    with pytest.raises(ValueError, match="at least 1"):
        paired_bootstrap_ci(np.zeros(4), np.zeros(4), num_resamples=0)


@pytest.mark.slow
def test_results_carry_session_bootstrap_intervals(runs):
    from editr2.bench.metrics import METRICS, TurnScore
    from editr2.bench.resume import read_results

    results = json.loads((runs / "literal" / "results.json").read_text())
    records = read_results(runs / "literal" / "session_results.jsonl")
    scores = np.array([[[turn[m] for m in METRICS] for turn in r["turns"]] for r in records])  # (5, 2, 4)
    for k, metric in enumerate(METRICS):
        for t, row in enumerate(results["per_turn"]):
            assert row[f"{metric}_ci"] == list(bootstrap_ci(scores[:, t, k], np.mean))
        # The mean's interval resamples whole sessions: all of a session's turns together.
        low, high = results["mean"][f"{metric}_ci"]
        expected = bootstrap_ci(scores[:, :, k].mean(1), np.mean)
        assert low == pytest.approx(expected[0], abs=1e-12) and high == pytest.approx(expected[1], abs=1e-12)
    assert TurnScore(**records[0]["turns"][0]).turn == 1


@pytest.mark.slow
def test_compare_runs_paired(runs, tmp_path, capsys):
    from editr2.bench.compare_cli import compare_runs

    out_md, out_json = tmp_path / "cmp" / "literal_vs_oracle.md", tmp_path / "cmp" / "literal_vs_oracle.json"
    assert main(["bench", "compare", str(runs / "literal"), str(runs / "oracle"), "--out", str(out_md),
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    text = out_md.read_text()
    assert text in printed and "| turn | metric | A | B | B - A | 95% CI |" in text
    assert '- editor: `"literal"` (A) vs `"oracle"` (B)' in text
    result = json.loads(out_json.read_text())
    assert result == json.loads(json.dumps(compare_runs(runs / "literal", runs / "oracle")))
    assert result["sessions"] == {"family": "cm", "seed": 3, "sessions": 5, "turns": 2, "size": 64,
                                  "phrasing": "grammar"}
    assert result["differs"] == {"editor": ["literal", "oracle"]}
    literal = json.loads((runs / "literal" / "results.json").read_text())
    for row, mine in zip(result["per_turn"], literal["per_turn"]):
        for metric in ("IF", "CC", "GA", "reward"):
            cell = row[metric]
            assert cell["a"] == pytest.approx(mine[metric]) and cell["b"] == 1.0  # the oracle scores 1 everywhere
            assert cell["diff"] == pytest.approx(1.0 - mine[metric])
            low, high = cell["diff_ci"]
            assert low <= cell["diff"] <= high
            # B is constant: the paired interval is 1 minus A's own interval.
            a_low, a_high = mine[f"{metric}_ci"]
            assert (low, high) == pytest.approx((1.0 - a_high, 1.0 - a_low))
            assert (f"| {row['turn']} | {metric} | {cell['a']:.3f} | 1.000 | {cell['diff']:+.3f} "
                    f"| [{low:+.3f}, {high:+.3f}]") in text
    assert result["mean"]["GA"]["diff"] == pytest.approx(1.0 - literal["mean"]["GA"])
    # A run against itself: no difference, an interval of zero width.
    same = compare_runs(runs / "identity", runs / "identity")
    assert all(same["mean"][m]["diff_ci"] == [0.0, 0.0] for m in ("IF", "CC", "GA", "reward"))


def _fake_run(folder, seed=3, sessions=3, turns=2, value=0.5, **config):
    """A bench shapes --out folder written by hand: results.json's config and one session_results.jsonl line per
    session (every score `value`)."""
    folder.mkdir(parents=True)
    config = {"editor": "literal", "family": "cm", "sessions": sessions, "turns": turns, "seed": seed, "size": 64,
              **config}
    family = config["family"]
    (folder / "results.json").write_text(json.dumps({"per_turn": [], "mean": {}, "config": config}))
    turn = {"IF": value, "CC": value, "GA": value, "reward": value, "rule": 1.0, "background": 1.0, "restore_CC": None}
    lines = [json.dumps({"session_id": f"{family}_{seed + i}", "family": family, "seed": seed + i,
                         "turns": [{"turn": t, **turn} for t in range(1, turns + 1)]}) for i in range(sessions)]
    (folder / "session_results.jsonl").write_text("\n".join(lines) + "\n")
    return folder, lines


def test_compare_of_constant_runs(tmp_path, capsys):
    (a, _), (b, _) = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", value=0.75, editor="oracle")
    assert main(["bench", "compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "| 1 | IF | 0.500 | 0.750 | +0.250 | [+0.250, +0.250] * |" in text
    assert "| all | reward | 0.500 | 0.750 | +0.250 | [+0.250, +0.250] * |" in text


def test_compare_refuses_other_sessions_and_unfinished_runs(tmp_path):
    from editr2.cli import COMMANDS

    assert COMMANDS[("bench", "compare")] == "editr2.bench.compare_cli"
    good, lines = _fake_run(tmp_path / "good")
    for name, kwargs, named in (("seeds", {"seed": 0}, r"seed: 3 \(A\) vs 0 \(B\)"),
                                ("turns", {"turns": 3}, r"turns: 2 \(A\) vs 3 \(B\)"),
                                ("count", {"sessions": 4}, r"sessions: 3 \(A\) vs 4 \(B\)"),
                                ("family", {"family": "cu"}, r'family: "cm" \(A\) vs "cu" \(B\)'),
                                ("phrasing", {"phrasing": "unseen"}, r'phrasing: "grammar" \(A\) vs "unseen" \(B\)')):
        other, _ = _fake_run(tmp_path / name, **kwargs)
        with pytest.raises(SystemExit, match=r"not over the same sessions \(" + named + r"\); pass two runs"):
            main(["bench", "compare", str(good), str(other)])
    with pytest.raises(SystemExit, match="no results.json there"):
        main(["bench", "compare", str(good), str(tmp_path / "missing")])

    # A folder whose session_results.jsonl lacks a session its results.json reports (or has a broken line).
    broken, _ = _fake_run(tmp_path / "broken")
    (broken / "session_results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(SystemExit, match="lacks session cm_5"):
        main(["bench", "compare", str(good), str(broken)])
    (broken / "session_results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    with pytest.raises(SystemExit, match="session_results.jsonl:3: .*run the same `editr2 bench shapes` command"):
        main(["bench", "compare", str(good), str(broken)])
    assert (broken / "session_results.jsonl").read_text().endswith(lines[2][:20])  # read only, nothing repaired
    (broken / "results.json").write_text("[]")
    with pytest.raises(SystemExit, match="not an `editr2 bench shapes` results.json"):
        main(["bench", "compare", str(broken), str(good)])


def test_seed_session_bootstrap_ci_holds_the_seed_spread():
    from editr2.bench.stats import seed_session_bootstrap_ci

    rng = np.random.default_rng(2)
    sessions = rng.uniform(size=200)
    a = np.stack([sessions + rng.normal(scale=0.01, size=200) for _ in range(3)])  # (3 seeds, 200 sessions)
    same = np.stack([sessions + 0.1 + rng.normal(scale=0.01, size=200) for _ in range(3)])  # every seed +0.1
    low, high = seed_session_bootstrap_ci(a, same)
    assert 0.09 < low <= high < 0.11 and seed_session_bootstrap_ci(a, same) == (low, high)
    # seeds that disagree (+0.0, +0.1, +0.2): the session-paired interval of the pooled means stays narrow, this one
    # widens to the seeds' spread
    spread = np.stack([sessions + shift for shift in (0.0, 0.1, 0.2)])
    low, high = seed_session_bootstrap_ci(a, spread)
    pooled_low, pooled_high = paired_bootstrap_ci(a.mean(0), spread.mean(0))
    assert low < pooled_low and pooled_high < high and high - low > 0.1
    assert seed_session_bootstrap_ci(a[:1], same[:2]) is not None  # seed counts may differ
    with pytest.raises(ValueError, match="same sessions"):
        seed_session_bootstrap_ci(np.zeros((2, 4)), np.zeros((2, 5)))

"""The RL study's pipeline at tiny scale, end to end: `rl_runs` trains every arm for one step (resumable), benches
it on the same held-out sessions and writes its committable results; `rl_page` regenerates the page and the plot
from those files only. Plus the statistics and the shipped config on hand-made input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recipes.shapes_tiny import rl_page, rl_runs

REPO = Path(__file__).resolve().parents[1]

import yaml  # noqa: E402
from test_rl_demo import TINY_CALL_DEFAULTS  # noqa: E402 (the tiny model's call defaults)
from test_rl_demo import TINY_RL_CONFIG as DEMO_CONFIG  # noqa: E402

# configs/rl/study.yaml at tiny size: the rl_demo test's tiny config (its pixel-hash reward gives the random model's
# groups a spread) with the study's batching: several sessions per step, advantages over the whole step
TINY_RL_CONFIG = yaml.safe_dump({**yaml.safe_load(DEMO_CONFIG), "shapes_num_sessions": 8, "batch_sessions": True,
                                  "global_std": True, "global_std_min_samples": 0, "per_device_train_batch_size": 2})


@pytest.fixture(scope="module")
def study(model_folder, tmp_path_factory):
    """Every arm, seed 0, plus rl seed 1 and a shipped bench of seed 1: 1 training step each, 2 held-out sessions,
    2- and 3-turn benches; sft and rl seed 0 also on gold intents (3 turns)."""
    root = tmp_path_factory.mktemp("rl-study")
    config = root / "tiny_rl.yaml"
    config.write_text(TINY_RL_CONFIG)
    common = ["--model", str(model_folder(TINY_CALL_DEFAULTS)), "--config", str(config), "--run-dir",
              str(root / "runs"), "--results", str(root / "results"), "--sessions", "2", "--families", "cm",
              "--turns", "2,3", "--max-steps", "1", "--no-progress"]
    for arm, seed in (("sft", 0), ("rl", 0), ("rl_nofilter", 0), ("rl", 1), ("shipped", 1)):
        assert rl_runs.main(["--arm", arm, "--seed", str(seed), *common]) == 0
    for arm in ("sft", "rl"):  # the editor alone on gold intents, 3-turn sessions
        assert rl_runs.main(["--arm", arm, "--seed", "0", "--prompts", "gold", *common, "--turns", "3"]) == 0
    out = root / "docs" / "results_rl.md"
    assert rl_page.main(["--results", str(root / "results"), "--out", str(out)]) == 0
    return root, common, out


@pytest.mark.slow
def test_each_run_writes_small_committable_results(study):
    root, _, _ = study
    results = root / "results"
    for arm, seed in (("sft", 0), ("rl", 0), ("rl_nofilter", 0), ("rl", 1)):
        folder = results / arm / f"seed{seed}"
        for turns in (2, 3):
            bench = json.loads((folder / f"bench_t{turns}.json").read_text())
            assert bench["arm"] == arm and bench["turns"] == turns and bench["step"] == (0 if arm == "sft" else 1)
            sessions = bench["families"]["cm"]["sessions"]
            assert [s["id"] for s in sessions] == ["cm_0", "cm_1"]  # the same held-out sessions in every run
            assert all(len(s["scores"]) == turns and len(s["scores"][0]) == 4 for s in sessions)
        run = json.loads((folder / "run.json").read_text())
        assert run["arm"] == arm and run["seed"] == seed and run["trajectory_filter"] == rl_runs.ARMS[arm]
        assert "--prompts" not in run["command"]  # the gold bench leaves the main bench's run.json
        if seed == 0 and arm in ("sft", "rl"):
            gold = json.loads((folder / "bench_gold_t3.json").read_text())
            assert (gold["prompts"], gold["reasoning"], gold["turns"]) == ("gold", "none", 3)
            assert [s["id"] for s in gold["families"]["cm"]["sessions"]] == ["cm_0", "cm_1"]
        else:
            assert not list(folder.glob("bench_gold_*"))
        if arm == "sft":
            assert not (folder / "trainer_state.json").exists()
            continue
        state = json.loads((folder / "trainer_state.json").read_text())
        (entry,) = [e for e in state["log_history"] if "reward" in e]
        assert {"filter/frac_if_zero", "filter/frac_if_zero_masks", "filter/frac_filtered", "timing/step"} <= set(entry)
        assert not any(k.startswith("timing/rollout/") for k in entry)  # trimmed to rl_runs.LOG_KEYS
        if arm == "rl_nofilter":
            assert entry["filter/frac_filtered"] == 0
    # the only weights in the results folder: each RL run's adapters, the ones its benches name
    weights = {p.relative_to(results).parts[:3] for p in results.rglob("*")
               if p.suffix in (".safetensors", ".bin", ".pt")}
    assert weights == {(arm, f"seed{seed}", "adapters") for arm, seed in (("rl", 0), ("rl_nofilter", 0), ("rl", 1))}
    for arm, seed in (("rl", 0), ("rl_nofilter", 0), ("rl", 1)):
        folder = results / arm / f"seed{seed}"
        assert {p.name for p in (folder / "adapters").iterdir()} == {rl_runs.ADAPTER_FILE, "reasoning_lora",
                                                                     "editr2_config.json"}
        digest = rl_runs.adapters_fingerprint(folder / "adapters")
        assert json.loads((folder / "bench_t3.json").read_text())["adapters_sha256"] == digest
        assert digest == rl_runs.adapters_fingerprint(root / "runs" / arm / f"seed{seed}")


@pytest.mark.slow
def test_page_is_regenerated_from_the_committed_files_alone(study, tmp_path):
    root, _, out = study
    page = out.read_text()
    for text in ("## 2-turn sessions", "## 3-turn sessions", "RL (Edit-R2, if_zero filter) - SFT (the RL base)",
                 "RL (Edit-R2, if_zero filter) - RL, no filtering", "GA t3", "reward turns 2-3", "IF = 0",
                 "| RL (Edit-R2, if_zero filter) | 0, 1 |", "## Targets", "| 2 / 1 |", "Contamination",
                 "| RL (Edit-R2, if_zero filter), seed 1 |"):
        assert text in page, text
    assert out.with_suffix(".png").stat().st_size > 1000
    # the shipped folder is paired with the RL run of its seed only, in its own section (here the SFT folder itself,
    # so the section measures what that run's adapters change), and in no arm table
    section = page[page.index("## The shipped default"):]
    assert section.count("| RL (Edit-R2, if_zero filter), seed 1 |") == 2  # 2 and 3 turns
    assert "| shipped |" not in page and "shipped: seeds" not in page
    gold = page[page.index("## The editor alone: gold intents (3-turn sessions)"):]
    assert "| SFT (the RL base) | 0 |" in gold and "| RL (Edit-R2, if_zero filter) | 0 |" in gold
    assert "both on gold intents (the editor's gain) | " in gold and "(all seeds), own intents - SFT (the RL base), gold" in gold
    # a copy of the results folder alone (the runs folder gone) gives the same page
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(root / "results", copy)
    again = tmp_path / "docs" / "results_rl.md"
    rl_page.main(["--results", str(copy), "--out", str(again)])
    assert again.read_text().replace(str(copy), "X").replace(str(again), "OUT") == \
        page.replace(str(root / "results"), "X").replace(str(out), "OUT")


@pytest.mark.slow
def test_rerun_does_nothing_when_complete_and_benches_retrained_adapters_again(study, capsys):
    root, common, _ = study
    rl0 = ["--arm", "rl", "--seed", "0", *common]
    before = (root / "results" / "rl" / "seed0" / "bench_t2.json").read_text()
    assert rl_runs.main(rl0) == 0
    assert "are complete: nothing to do" in capsys.readouterr().out
    assert rl_runs.main([*rl0, "--check"]) == 0
    assert rl_runs.main([*rl0, "--check", "--turns", "2,4"]) == 3
    assert "to do: no bench_t4.json" in capsys.readouterr().out
    assert (root / "results" / "rl" / "seed0" / "bench_t2.json").read_text() == before
    # trained again to the same step (other weights): the committed results and the cached sessions are stale
    from safetensors.torch import load_file, save_file

    adapter = root / "runs" / "rl" / "seed0" / rl_runs.ADAPTER_FILE
    save_file({k: v + 0.5 for k, v in load_file(adapter).items()}, adapter)
    assert rl_runs.main([*rl0, "--check"]) == 3
    assert "benched with other adapters" in capsys.readouterr().out
    assert rl_runs.main(rl0) == 0
    out = capsys.readouterr().out
    assert "finished (1 steps): not trained again" in out and "bench/step1_t2_cm again" in out
    committed = root / "results" / "rl" / "seed0" / "adapters"
    assert rl_runs.adapters_fingerprint(committed) == rl_runs.adapters_fingerprint(adapter.parent)
    assert json.loads((committed.parent / "bench_t2.json").read_text())["adapters_sha256"] == \
        rl_runs.adapters_fingerprint(committed)


@pytest.mark.slow
def test_committed_results_stand_in_for_a_missing_run_folder(study, tmp_path, capsys):
    """On a fresh clone (no run folder): complete results make the command a no-op; a missing bench is run again from
    the committed adapters, with no training."""
    root, common, _ = study
    import shutil

    results = tmp_path / "results"
    shutil.copytree(root / "results" / "rl" / "seed1", results / "rl" / "seed1")
    before = {name: (results / "rl" / "seed1" / name).read_text() for name in ("bench_t2.json", "trainer_state.json")}
    flags = [*common]
    flags[flags.index("--run-dir") + 1] = str(tmp_path / "empty-runs")
    flags[flags.index("--results") + 1] = str(results)
    assert rl_runs.main(["--arm", "rl", "--seed", "1", *flags]) == 0
    assert "nothing to do" in capsys.readouterr().out
    (results / "rl" / "seed1" / "bench_t2.json").unlink()
    assert rl_runs.main(["--arm", "rl", "--seed", "1", *flags]) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "resuming" not in out and not (tmp_path / "empty-runs" / "rl" / "seed1" /
                                                                     "checkpoint-1").exists()
    for name, text in before.items():  # the same sessions, scored again from the committed adapters alone
        assert (results / "rl" / "seed1" / name).read_text() == text, name
    with pytest.raises(RuntimeError, match="no committed adapters"):
        rl_runs.main(["--arm", "rl", "--seed", "2", "--skip-train", *flags])


def test_train_command_sets_seed_filter_and_resumes(tmp_path, model_folder):
    model = model_folder(TINY_CALL_DEFAULTS)
    config = tmp_path / "c.yaml"
    config.write_text(TINY_RL_CONFIG)
    args = rl_runs.parse_args(["--arm", "rl_nofilter", "--seed", "2", "--max-steps", "5", "--sessions-per-step", "8",
                               "--device", "cuda"])
    out = tmp_path / "run"
    cmd = rl_runs.train_command("rl_nofilter", 2, config, model, out, args)
    joined = " ".join(cmd)
    assert "--seed 2" in joined and "--trajectory_filter none" in joined and "--max_steps 5" in joined
    assert "--per_device_train_batch_size 8" in joined and "--use_cpu false" in joined
    assert "--resume_from_checkpoint" not in cmd and "--noise_level" not in cmd
    ablation = rl_runs.train_command("rl_noise13", 0, config, model, tmp_path / "other", args)
    assert ablation[ablation.index("--noise_level") + 1] == "1.3"
    assert "--trajectory_filter if_zero" in " ".join(ablation)
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-10").mkdir()
    cmd = rl_runs.train_command("rl_nofilter", 2, config, model, out, args)
    assert cmd[cmd.index("--resume_from_checkpoint") + 1] == str(out / "checkpoint-10")


@pytest.mark.parametrize("argv, match", [
    (["--turns", "3,x"], "comma-separated integers"), (["--families", "cm,zz"], "families"),
    (["--sessions", "0"], ">= 1"), (["--max-steps", "0"], ">= 1"),
])
def test_bad_flags_are_refused_before_anything_loads(argv, match):
    with pytest.raises(ValueError, match=match):
        rl_runs.parse_args(["--arm", "rl", "--seed", "0", *argv])


def test_paired_bootstrap_pairs_by_session_and_pools_seeds():
    # b = a - 0.1 on every session (a's seeds average to the session's value): the difference is exactly 0.1
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 50)
    a = {f"s{i}": [v - 0.05, v + 0.05] for i, v in enumerate(base)}
    b = {f"s{i}": [v - 0.1] for i, v in enumerate(base)}
    result = rl_page.paired_bootstrap(a, b)
    assert result["n"] == 50
    assert result["diff"] == pytest.approx(0.1) and result["low"] == pytest.approx(0.1)
    assert result["high"] == pytest.approx(0.1)
    # a noisy difference: the interval holds the mean and is reproducible
    noisy = {k: [v[0] + rng.normal(0, 0.1)] for k, v in b.items()}
    first, second = rl_page.paired_bootstrap(a, noisy), rl_page.paired_bootstrap(a, noisy)
    assert first == second and first["low"] < first["diff"] < first["high"]
    assert rl_page.paired_bootstrap({"x": [1.0]}, {"y": [0.0]})["n"] == 0
    with pytest.raises(ValueError, match="resamples"):
        rl_page.paired_bootstrap(a, b, resamples=0)


def test_page_refuses_an_empty_results_folder(tmp_path):
    with pytest.raises(ValueError, match="rl_runs --arm ARM --seed N"):
        rl_page.load_results(tmp_path)


def test_shipped_config_has_the_recipes_settings():
    from trl import TrlParser

    from trl_editr2.config import EditR2Config
    from trl_editr2.scripts.editr2 import EditR2ScriptArguments

    parser = TrlParser((EditR2ScriptArguments, EditR2Config))
    script_args, config = parser.parse_args_and_config(
        ["--config", str(rl_runs.DEFAULT_CONFIG), "--output_dir", "unused"])
    assert script_args.model_name_or_path == "checkpoints/editr2-shapes-tiny-sft"  # the RL runs start from SFT
    assert config.per_device_train_batch_size >= 8 and config.num_generations == 6 and config.num_turns == 3
    assert config.global_std and config.batch_sessions and config.group_key == "session"
    assert (config.clip_range_image, config.clip_range_text, config.beta) == (1e-5, 1e-5, 0.01)
    assert config.noise_level == 0.5  # measured for the model's 4 steps (rollout_noise); 1.3 is the rl_noise13 arm
    # the model's own sampler (its call default steps), trained on a window of 2 of the high-noise first steps
    defaults = json.loads((REPO / "checkpoints" / "editr2-shapes-tiny-sft" / "editr2_call_defaults.json").read_text())
    assert config.num_inference_steps == defaults["num_inference_steps"]
    assert config.keep_unedited == defaults.get("keep_unedited") and config.reference_area is None
    assert config.sde_window_size == 2 and config.sde_window_range[0] == 0
    assert config.sde_window_size < config.sde_window_range[1] < config.num_inference_steps
    assert config.train_reasoning and config.lora_r > 0 and config.text_lora_r > 0
    assert config.save_steps <= 10 and script_args.shapes_num_sessions >= config.max_steps * 8


def _dry_run(script: str, **env) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """`DRY_RUN=1 bash recipes/shapes_tiny/SCRIPT`: its printed commands, the (arm, seed) of each rl_runs command in
    order, and those commands."""
    import subprocess

    out = subprocess.run(["bash", str(REPO / "recipes" / "shapes_tiny" / script)],
                         env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    runs = [line for line in out if "recipes.shapes_tiny.rl_runs" in line]
    return out, [(line.split("--arm ")[1].split()[0], line.split("--seed ")[1].split()[0]) for line in runs], runs


def test_study_script_runs_every_arm_and_seed_in_lanes_then_the_page():
    out, order, runs = _dry_run("rl_study.sh")
    assert len(runs) == 9 and all("--device cpu" in line and "--threads 1" in line for line in runs)
    assert set(order) == {(arm, seed) for arm in ("sft", "rl", "rl_nofilter") for seed in "012"}  # not the ablation
    assert "recipes.shapes_tiny.rl_page" in out[-1]  # after every lane
    _, order, _ = _dry_run("rl_study.sh", JOBS="1")
    assert order[:2] == [("rl", "0"), ("rl_nofilter", "0")] and order[-3:] == [("sft", s) for s in "012"]
    _, _, runs = _dry_run("rl_study.sh", DEVICE="cuda")
    assert len(runs) == 9 and all("--device cuda" in line and "--threads 4" in line for line in runs)


def test_study_script_leaves_out_the_runs_whose_committed_results_are_complete(tmp_path):
    import subprocess

    log = tmp_path / "calls.log"
    stub = tmp_path / "python"  # stands for the venv's python: rl_runs --check says rl 0 and the SFT benches are done
    stub.write_text(f'#!/bin/bash\necho "$*" >> {log}\ncase "$*" in *--check*) case "$*" in *"--arm rl --seed 0 "*'
                    '|*"--arm sft "*) exit 0;; esac; exit 3;; esac\n')
    stub.chmod(0o755)
    subprocess.run(["bash", str(REPO / "recipes" / "shapes_tiny" / "rl_study.sh")], check=True, capture_output=True,
                   env={"PY": str(stub), "NICE": "0", "PATH": "/usr/bin:/bin"})
    calls = log.read_text().splitlines()
    ran = [(line.split("--arm ")[1].split()[0], line.split("--seed ")[1].split()[0]) for line in calls
           if "recipes.shapes_tiny.rl_runs" in line and "--check" not in line]
    assert sorted(ran) == sorted([("rl_nofilter", "0"), ("rl", "1"), ("rl_nofilter", "1"), ("rl", "2"),
                                  ("rl_nofilter", "2")])
    assert sum("--check" in line for line in calls) == 9 and "recipes.shapes_tiny.rl_page" in calls[-1]


def test_study_script_refuses_an_unknown_device():
    import subprocess

    proc = subprocess.run(["bash", str(REPO / "recipes" / "shapes_tiny" / "rl_study.sh")],
                          env={"DRY_RUN": "1", "DEVICE": "tpu", "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "DEVICE=tpu" in proc.stderr


def _results(shifts: dict[str, list[float]], sessions: int = 60, turns: int = 3) -> dict:
    """Hand-made results: arm -> one entry per seed whose every session scores the SFT baseline plus the seed's shift
    on turns 2 and later (IF 0 on every fifth session's last turn)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, size=(sessions, turns, 4))
    base[::5, -1, 0] = 0.0
    results = {}
    for arm, seed_shifts in shifts.items():
        results[arm] = {}
        for seed, shift in enumerate(seed_shifts):
            scores = base.copy()
            scores[:, 1:, 2:] += shift
            rows = [{"id": f"{'cm' if i % 2 else 'cu'}_{i}", "scores": scores[i].tolist()} for i in range(sessions)]
            families = {f: {"sessions": [r for r in rows if r["id"].startswith(f)]} for f in ("cm", "cu")}
            results[arm][seed] = {"run": {}, "state": None, "bench": {turns: {"metrics": list(rl_runs.METRICS),
                                                                            "families": families}}}
    return results


def test_targets_need_the_threshold_and_an_interval_above_zero():
    rows = {(r["a"], r["b"], r["column"], r["turns"]): r
            for r in rl_page.check_targets(_results({"sft": [0.0] * 3, "rl": [0.09, 0.10, 0.11],
                                                     "rl_nofilter": [0.05] * 3}))}
    gain = rows[("rl", "sft", "reward turns 2-3", 3)]
    assert gain["paired"]["diff"] == pytest.approx(0.10) and gain["status"] == "met"
    assert gain["seed_counts"] == (3, 3) and gain["seeds"][0] < gain["paired"]["low"]  # the seeds' spread widens it
    assert rows[("rl", "sft", "GA t3", 3)]["status"] == "met"
    assert rows[("rl", "rl_nofilter", "reward turns 2-3", 3)]["status"] == "reported"
    assert rows[("rl", "sft", "reward turns 2-6", 6)]["status"] == "not measured"  # no 6-turn bench here
    small = rl_page.check_targets(_results({"sft": [0.0], "rl": [0.05]}))[0]
    assert small["status"] == "missed" and small["paired"]["low"] > 0  # interval above 0 but under the threshold
    table = "\n".join(rl_page.targets_table(rl_page.check_targets(_results({"sft": [0.0], "rl": [0.2]}))))
    assert "**met** (under 3 seeds: provisional)" in table


def test_per_seed_family_and_contamination_tables():
    results = _results({"sft": [0.0, 0.0], "rl": [0.02, 0.2]})
    seeds = "\n".join(rl_page.per_seed_table(results, 3))
    assert "| RL (Edit-R2, if_zero filter), seed 0 | +0.020 [+0.020, +0.020]" in seeds
    assert "| RL (Edit-R2, if_zero filter), seed 1 | +0.200 [+0.200, +0.200]" in seeds
    diffs = "\n".join(rl_page.differences_table(results, 3))
    assert ", cm only | 30 |" in diffs and ", cu only | 30 |" in diffs
    contamination = "\n".join(rl_page.contamination_table(results, 3))
    # every fifth session fails its last turn only: 12 of 60 at turn 3, each after a followed turn 2
    assert "| SFT (the RL base) | 0.00 / 0.00 / 0.20 | n/a | 0.100 (of 240) |" in contamination


def test_page_shows_the_noise_measure_when_the_results_have_one(tmp_path):
    assert rl_page.noise_section(tmp_path) == []
    levels = {"0.0": {"reward": [1.0, 0.9], "group_std": [0.0, 0.1], "IF": [1.0, 0.8], "GA": [1.0, 0.7]},
              "1.3": {"reward": [0.7, 0.4], "group_std": [0.2, 0.2], "IF": [0.6, 0.4], "GA": [0.6, 0.3]}}
    (tmp_path / "rollout_noise.json").write_text(json.dumps({"sessions": 16, "levels": levels}))
    text = "\n".join(rl_page.noise_section(tmp_path))
    assert "| 1.3 | 0.70 / 0.40 | 0.60 / 0.40 | 0.60 / 0.30 | 0.20 / 0.20 |" in text
    assert "--noise-levels 0.0 1.3 --sessions 16" in text


def test_attribution_splits_the_reasoner_from_the_editor():
    results = _results({"sft": [0.0]}, sessions=4)
    assert rl_page.attribution_table(results, 3) == []  # no `exact` rows: no table
    rows = [r for fam in results["sft"][0]["bench"][3]["families"].values() for r in fam["sessions"]]
    for i, row in enumerate(rows):
        row["exact"] = [1, 1, i % 2]  # the intent is right on turns 1-2, and on half of the turn-3 ones
        row["scores"] = [[1.0, 1, 1, 1], [0.0, 1, 1, 1], [float(i % 2), 1, 1, 1]]
    (line,) = rl_page.attribution_table(results, 3)[2:]
    assert line == "| SFT (the RL base) | 1.00 / 1.00 / 0.50 | 1.00 / 0.00 / 1.00 |"

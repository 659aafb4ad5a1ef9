"""The documented recipe commands (recipes/shapes_tiny/README.md) end to end at micro size, as a user runs them from
the repository root: VAE -> reasoner -> editor -> export of a folder laid out like checkpoints/editr2-shapes-tiny ->
its bench on a couple of sessions; rerunning a finished stage's command resumes it and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "shapes_tiny" / "configs"
SHIPPED = REPO / "checkpoints" / "editr2-shapes-tiny"
MICRO = ["--threads", "1", "--no_progress", "--eval_every", "100", "--save_every", "1"]


def _run(module: str, *args) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", f"recipes.shapes_tiny.{module}", *map(str, args)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_recipe_commands_train_export_and_bench(tmp_path):
    vae, reasoner, editor, model = (tmp_path / n for n in ("vae", "reasoner", "editor", "editr2-micro"))
    vae_args = ["--config", CONFIGS / "vae.yaml", "--run_dir", vae, "--max_steps", "2", "--base_dim", "4",
                "--z_dim", "4", "--batch_size", "2", "--eval_images", "4", "--stats_images", "4", *MICRO]
    _run("train_vae", *vae_args)
    assert "resuming" in _run("train_vae", *vae_args)  # the same command again: resumes (nothing left), re-exports
    _run("train_reasoner", "--config", CONFIGS / "reasoner_short.yaml", "--run_dir", reasoner, "--max_steps", "2",
         "--tokenizer_sessions", "40", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
         "--num_kv_heads", "1", "--intermediate_size", "64", "--vision_hidden", "16", "--batch_size", "2",
         "--eval_sessions", "1", "--eval_turns", "1", "--max_new_tokens", "4", "--final_sessions", "1", *MICRO)
    _run("train_editor", "--config", CONFIGS / "gpu" / "editor.yaml", "--run_dir", editor, "--device", "cpu",
         "--mixed_precision", "no", "--data_workers", "0", "--max_steps", "2", "--num_layers", "1", "--num_heads",
         "2", "--head_dim", "16", "--axes_dims_rope", "[4, 6, 6]", "--batch_size", "2", "--eval_sessions", "1",
         "--eval_steps", "2", "--max_turns", "2", "--max_minutes", "0", "--vae_path", vae / "vae",
         "--reasoner_path", reasoner, *MICRO)
    assert json.loads((editor / "metrics.json").read_text())["step"] == 2
    # as the shipped folder is built: the reasoner run is also added as the separate reasoning model
    _run("export", "--vae", vae, "--reasoner", reasoner, "--editor", editor, "--reasoning-model", reasoner, "--out",
         model, "--bench-sessions", "2", "--bench-turns", "2", "--threads", "1", "--no-progress")
    report = json.loads((editor / "export_report.json").read_text())
    assert {"cm/intent", "cu/intent", "cm/oracle"} <= set(report["bench"])
    assert len(report["bench"]["cm/intent"]["per_turn"]) == 2

    def layout(root: Path) -> set:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "README.md"}

    if SHIPPED.is_dir():
        assert layout(model) == layout(SHIPPED)
    call_defaults = json.loads((model / "editr2_call_defaults.json").read_text())
    assert call_defaults["template"].startswith("History:")  # the short-request reasoner's template
    assert call_defaults["reasoning_condition_area"] == call_defaults["condition_area"]  # the same run's image size

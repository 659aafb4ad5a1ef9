"""The default-model recipe's run settings (recipes/shapes_tiny/common.TrainConfig and its accelerate `Run`): device
resolution, the wall-clock cap, resume, data workers, batched text encoding, config parsing (TrlParser), the shipped
YAML configs and the GPU recipe script. The CPU
path itself (bit-exact resume of every stage) is tested in tests/test_train_default.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from recipes.shapes_tiny import common, train_editor, train_reasoner, train_vae

RECIPE = Path(common.__file__).resolve().parent

MICRO_VAE = dict(base_dim=4, z_dim=4, batch_size=2, eval_every=100, eval_images=4, stats_images=4, save_every=100,
                 threads=1)
STAGES = {"vae": train_vae.VAEConfig, "reasoner": train_reasoner.ReasonerConfig, "editor": train_editor.EditorConfig}
YAMLS = sorted((RECIPE / "configs").glob("*.yaml")) + sorted((RECIPE / "configs" / "gpu").glob("*.yaml"))


def _weights(run_dir: Path, name: str = "model") -> dict:
    from safetensors.torch import load_file

    return load_file(str(common.latest_checkpoint(run_dir) / "model.safetensors"))


def _parse(cls, *argv):
    default = {train_vae.VAEConfig: "vae.yaml", train_reasoner.ReasonerConfig: "reasoner_short.yaml",
               train_editor.EditorConfig: "gpu/editor.yaml"}[cls]
    return common.parse_args(cls, default, ["--run_dir", "unused", *map(str, argv)])[0]


def _assert_same(a: dict, b: dict) -> None:
    # Bit-equal is right here: a resumed run copies the checkpoint into its parameters and optimizer state
    # (load_state_dict), so it computes on the same values in the same kind of memory as the uninterrupted run.
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _stage_of(path: Path):
    return STAGES[next(name for name in STAGES if path.stem.startswith(name))]


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def test_every_stage_config_shares_the_base_fields():
    base = {f.name for f in dataclasses.fields(common.TrainConfig)}
    assert {"device", "mixed_precision", "max_minutes", "data_workers", "batch_size", "lr", "max_steps"} <= base
    for cls in STAGES.values():
        assert issubclass(cls, common.TrainConfig) and base <= {f.name for f in dataclasses.fields(cls)}
        cfg = cls()
        assert (cfg.device, cfg.mixed_precision, cfg.max_minutes, cfg.data_workers) == ("cpu", "no", 0.0, 0)
        assert "seed" in cls.FROZEN_FIELDS


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(RECIPE / "configs")))
def test_shipped_yaml_configs_load(path):
    import yaml

    cls = _stage_of(path)
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= {f.name for f in dataclasses.fields(cls)}, keys - {f.name for f in dataclasses.fields(cls)}
    cfg = _parse(cls, "--config", path, "--device", "auto")
    assert cfg.device == "auto" and cfg.mixed_precision in common.MIXED_PRECISION
    if path.parent.name == "gpu":
        assert cfg.max_minutes > 0 and cfg.mixed_precision == "bf16" and cfg.data_workers > 0


def test_gpu_recipe_caps_fit_one_device_command():
    """The stage caps leave room for set-up, exports and the bench inside the device's 10-minute command."""
    stages = ("vae", "reasoner", "editor")  # the one-command recipe (editor_polish is a second, separate command)
    caps = {s: _parse(_stage_of(RECIPE / "configs" / "gpu" / f"{s}.yaml"), "--config",
                      RECIPE / "configs" / "gpu" / f"{s}.yaml").max_minutes for s in stages}
    assert sum(caps.values()) <= 7.5
    script = (RECIPE / "gpu_recipe.sh").read_text()
    for stage, minutes in caps.items():  # the script's defaults agree with the YAMLs
        assert f'{stage.upper()}_MINUTES:-{minutes:g}' in script


def test_run_folders_written_before_the_base_config_still_resume(tmp_path):
    cfg = train_vae.VAEConfig(**MICRO_VAE)
    old = {k: v for k, v in common.config_to_dict(cfg).items()
           if k not in ("device", "mixed_precision", "max_minutes", "data_workers")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    common.prepare_run_dir(tmp_path, dataclasses.replace(cfg, device="auto", max_minutes=1.0, lr=5e-4))
    with pytest.raises(ValueError, match="base_dim"):
        common.prepare_run_dir(tmp_path, dataclasses.replace(cfg, base_dim=8))


# ---------------------------------------------------------------------------------------------------------------------
# Devices and mixed precision
# ---------------------------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    return common.make_accelerator(train_vae.VAEConfig(device=name)).device


def test_device_resolution():
    assert _device("cpu") == torch.device("cpu")
    assert _device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="pass 'cpu', 'cuda'"):
        _device("gpu")


def test_cuda_without_cuda_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available.*pass device=cpu"):
            _device(name)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_vae.train(train_vae.VAEConfig(**MICRO_VAE, max_steps=1, device="cuda"), tmp_path / "run", False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_run_settings_are_checked():
    for bad in ({"mixed_precision": "fp16"}, {"max_minutes": -1.0}, {"data_workers": -1}):
        with pytest.raises(ValueError, match="pass"):
            train_vae.VAEConfig(**bad)
    accelerator = common.make_accelerator(train_vae.VAEConfig(mixed_precision="bf16", device="cpu"))
    with accelerator.autocast():  # bf16 is CUDA-only: the CPU path stays fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.slow
def test_a_resumed_run_says_so_in_its_log(tmp_path, capsys):
    cfg = train_vae.VAEConfig(**MICRO_VAE, max_steps=2)
    assert train_vae.train(cfg, tmp_path, show_progress=False, stop_after=1) is None
    train_vae.train(cfg, tmp_path, show_progress=False)
    assert "vae: resuming" in capsys.readouterr().out
    assert [r for r in common.RunLog(tmp_path).rows() if r["kind"] == "resume"][0]["step"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Wall-clock cap and data workers (VAE stage at micro size)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_max_minutes_checkpoints_exports_and_resumes_exactly(tmp_path):
    full, capped = tmp_path / "full", tmp_path / "capped"
    train_vae.train(train_vae.VAEConfig(**MICRO_VAE, max_steps=3), full, show_progress=False)
    cfg = train_vae.VAEConfig(**MICRO_VAE, max_steps=3, max_minutes=1e-6)  # reached during the first step
    metrics = train_vae.train(cfg, capped, show_progress=False)
    assert metrics["step"] == 1 and (capped / "vae" / "config.json").exists()  # checkpointed, then exported
    assert train_vae.train(cfg, capped, show_progress=False)["step"] == 2  # the same command continues
    train_vae.train(dataclasses.replace(cfg, max_minutes=0.0), capped, show_progress=False)
    assert [r["step"] for r in common.RunLog(capped).rows("train")] == [1, 2, 3]
    _assert_same(_weights(full), _weights(capped))  # = the uninterrupted run, bit for bit


@pytest.mark.slow
def test_data_workers_do_not_change_the_run(tmp_path):
    for workers in (0, 2):
        train_vae.train(train_vae.VAEConfig(**MICRO_VAE, max_steps=2, data_workers=workers), tmp_path / str(workers),
                        show_progress=False)
    _assert_same(_weights(tmp_path / "0"), _weights(tmp_path / "2"))
    batches = list(common.step_batches(lambda step: train_vae.make_batch(train_vae.VAEConfig(**MICRO_VAE), step),
                                       3, 6, workers=2))
    assert len(batches) == 3
    assert torch.equal(batches[1]["x"], train_vae.make_batch(train_vae.VAEConfig(**MICRO_VAE), 4)["x"])


# ---------------------------------------------------------------------------------------------------------------------
# Batched text encoding (editor)
# ---------------------------------------------------------------------------------------------------------------------


def test_batched_text_encoding_matches_encode_prompt_per_example():
    from diffusers_editr2.testing import tiny_pipeline
    from editr2.bench.shapes import generate_session

    pipe = tiny_pipeline(0)
    sessions = [generate_session(family, 1, seed) for family in ("cm", "cu") for seed in (0, 1)]
    images = [s.source_image() for s in sessions]
    texts = [sessions[0].gold_intent[0], "Remove it", " ", sessions[3].instruction[0]]  # different lengths
    single, single_mask = train_editor.encode_texts(pipe, texts, images, 32 * 32)
    inputs = train_editor.text_inputs(pipe, texts, images, 32 * 32)
    batched, batched_mask = train_editor.encode_text_inputs(pipe, inputs)
    assert torch.equal(batched_mask, single_mask) and batched_mask.sum(1).unique().numel() > 1
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The GPU recipe script
# ---------------------------------------------------------------------------------------------------------------------


def test_gpu_recipe_script_parses():
    subprocess.run(["bash", "-n", str(RECIPE / "gpu_recipe.sh")], check=True)


MICRO_REASONER = dict(tokenizer_sessions=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, vision_hidden=16, batch_size=2, eval_every=100, eval_sessions=1,
                      eval_turns=1, max_new_tokens=4, save_every=1, threads=1, aux_copy=((1.0, 2),))
MICRO_EDITOR = dict(num_layers=1, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), batch_size=2, eval_every=100,
                    eval_sessions=1, eval_steps=2, save_every=1, threads=1, max_turns=2, copy_head_temperature=3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_micro_recipe(tmp_path):
    """On a GPU machine (gpu_recipe.sh runs this first): every stage trains on CUDA in bf16 with data workers, the
    checkpoints hold CPU tensors and the CUDA RNG, a CUDA run resumes on the CPU, and the export loads."""
    from recipes.shapes_tiny import export

    gpu = dict(device="cuda", mixed_precision="bf16", data_workers=2)
    vae_cfg = train_vae.VAEConfig(**{**MICRO_VAE, "save_every": 1}, max_steps=2, **gpu)
    assert train_vae.train(vae_cfg, tmp_path / "vae", show_progress=False, stop_after=1) is None
    assert (common.latest_checkpoint(tmp_path / "vae") / "random_states_0.pkl").is_file()  # with the CUDA RNG
    metrics = train_vae.train(dataclasses.replace(vae_cfg, device="cpu"), tmp_path / "vae", show_progress=False)
    assert metrics["step"] == 2 and all(torch.isfinite(t).all() for t in _weights(tmp_path / "vae").values())

    train_reasoner.train(train_reasoner.ReasonerConfig(**MICRO_REASONER, max_steps=2, **gpu), tmp_path / "reasoner",
                         show_progress=False, final_sessions=1)
    editor_cfg = train_editor.EditorConfig(**MICRO_EDITOR, max_steps=2, batch_text_encoding=True, **gpu,
                                           vae_path=str(tmp_path / "vae" / "vae"),
                                           reasoner_path=str(tmp_path / "reasoner"))
    metrics = train_editor.train(editor_cfg, tmp_path / "editor", show_progress=False)
    assert metrics["step"] == 2 and 0.0 <= metrics["CC"] <= 1.0
    assert all(t.device.type == "cpu" for t in _weights(tmp_path / "editor").values())
    export.save(export.assemble(tmp_path / "vae", tmp_path / "reasoner", tmp_path / "editor"), tmp_path / "out")
    assert (tmp_path / "out" / "model_index.json").exists()


def test_text_fields_keep_their_text(tmp_path):
    # YAML reads `no` as False: a command-line value of a text field stays text; an unquoted one in a file is refused
    cfg = _parse(train_vae.VAEConfig, "--mixed_precision", "no", "--device", "cpu")
    assert cfg.mixed_precision == "no" and cfg.device == "cpu"
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    with pytest.raises(ValueError, match="quote it"):
        _parse(train_vae.VAEConfig, "--config", path)


def test_numbers_in_exponent_notation_and_wrong_types(tmp_path):
    # YAML 1.1 reads `5e-4` as text (only `5.0e-4` as a number): a number field takes it as a number, from a file or
    # from the command line (a GPU run was lost to `lr=5e-4` reaching AdamW as text)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-4\nmax_steps: 1000\ndim_mult: [1, 2]\n")
    cfg = _parse(train_vae.VAEConfig, "--config", path, "--weight_decay", "1e-2")
    assert (cfg.lr, cfg.max_steps, cfg.weight_decay, cfg.dim_mult) == (5e-4, 1000, 0.01, (1, 2))
    assert type(cfg.lr) is float and type(cfg.max_steps) is int
    assert _parse(train_reasoner.ReasonerConfig, "--curriculum", "[[0.5, 1]]").curriculum == ([0.5, 1],)
    for bad in ({"lr": "fast"}, {"max_steps": 1.5}, {"max_steps": True}, {"threads": [1]}):
        with pytest.raises(ValueError, match="is not a"):
            train_vae.VAEConfig(**bad)
    for argv in (["--lr", "fast"], ["--max_steps", "1.5"]):
        with pytest.raises(SystemExit):  # argparse refuses it, naming the flag
            _parse(train_vae.VAEConfig, *argv)
    with pytest.raises(ValueError, match="no_such_field"):
        _parse(train_vae.VAEConfig, "--no_such_field", "1")

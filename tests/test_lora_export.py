"""A full fine-tune shipped as a LoRA (`editr2.lora.extract_lora`, `recipes/shapes_tiny/export_lora.py`) and loaded
where users load adapters (`load_bench_editor(lora=)`, `editr2 bench shapes --lora`)."""

import json
import shutil

import pytest
import torch

from editr2.lora import extract_lora


def _linear_state(seed: int, shapes=((6, 4), (3, 6))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (out, inp) in enumerate(shapes):
        state[f"layer{i}.weight"] = torch.randn(out, inp, generator=g, dtype=torch.float64)
        state[f"layer{i}.bias"] = torch.randn(out, generator=g, dtype=torch.float64)
    state["norm.weight"] = torch.ones(4, dtype=torch.float64)
    return state


def test_full_rank_adapter_reproduces_the_fine_tune():
    base, tuned = _linear_state(0), _linear_state(1)
    tuned["norm.weight"] = base["norm.weight"].clone()
    state, report = extract_lora(base, tuned, ["layer0", "layer1"], rank=8, dtype=torch.float64)
    for name in ("layer0", "layer1"):
        weight = base[name + ".weight"] + state[name + ".lora_B.weight"] @ state[name + ".lora_A.weight"]
        torch.testing.assert_close(weight, tuned[name + ".weight"])
        torch.testing.assert_close(base[name + ".bias"] + state[name + ".lora_B.bias"], tuned[name + ".bias"])
    assert report["rank_pattern"] == {"layer0": 4, "layer1": 3}  # each layer's full rank, below 8
    assert report["weight_energy_kept"] == pytest.approx(1.0)
    assert report["other_energy_dropped"] == 0.0


def test_low_rank_adapter_keeps_the_top_singular_values_and_reports_what_it_drops():
    base, tuned = _linear_state(0), _linear_state(1)
    tuned["norm.weight"] = base["norm.weight"] + 0.5  # outside any linear layer: dropped, and reported
    state, report = extract_lora(base, tuned, ["layer0"], rank=1, bias=False, dtype=torch.float64)
    assert set(state) == {"layer0.lora_A.weight", "layer0.lora_B.weight"}
    delta = tuned["layer0.weight"] - base["layer0.weight"]
    s = torch.linalg.svdvals(delta)
    best = torch.linalg.matrix_norm(delta - state["layer0.lora_B.weight"] @ state["layer0.lora_A.weight"])
    assert float(best) == pytest.approx(float(s[1:].pow(2).sum().sqrt()))  # Eckart-Young: the best rank-1 fit
    everything = sum(float((tuned[k] - base[k]).pow(2).sum()) for k in base)
    assert report["weight_energy_kept"] == pytest.approx(float(s[0] ** 2) / everything)
    assert report["other_energy_dropped"] == pytest.approx(
        (everything - float(delta.pow(2).sum())) / everything)


def test_bad_inputs_are_refused():
    base, tuned = _linear_state(0), _linear_state(1)
    with pytest.raises(ValueError, match="rank=0"):
        extract_lora(base, tuned, ["layer0"], rank=0)
    with pytest.raises(ValueError, match="missing.weight"):
        extract_lora(base, tuned, ["missing"], rank=2)
    with pytest.raises(ValueError, match="different keys"):
        extract_lora(base, {k: v for k, v in tuned.items() if k != "norm.weight"}, ["layer0"], rank=2)
    tuned["layer0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        extract_lora(base, tuned, ["layer0"], rank=2)


@pytest.fixture(scope="module")
def tuned_run(tiny_dir, tmp_path_factory):
    """A train_editor-like run folder: the tiny model's transformer with every parameter moved."""
    from diffusers import QwenImageTransformer2DModel

    run = tmp_path_factory.mktemp("run")
    model = QwenImageTransformer2DModel.from_pretrained(tiny_dir / "transformer")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:  # a rank-2 change per linear layer, so a rank-2 adapter is exact
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
            else:
                p += 0.05 * torch.randn(p.shape, generator=g)
    model.save_pretrained(run / "transformer")
    (run / "config.json").write_text(json.dumps({"prompt_mode": "none"}))
    return run


@pytest.mark.slow
def test_exported_adapter_loads_in_the_bench_as_the_fine_tune(tiny_dir, tuned_run, tmp_path, capsys):
    from diffusers import QwenImageTransformer2DModel

    from diffusers_editr2.bench import load_bench_editor
    from recipes.shapes_tiny import export_lora

    out = tmp_path / "none-lora"
    assert export_lora.main(["--base", str(tiny_dir), "--editor", str(tuned_run), "--rank", "2",
                             "--out", str(out)]) == 0
    report = json.loads((out / "lora_report.json").read_text())
    assert report["prompt_mode"] == "none" and report["weight_energy_kept"] > 0.99
    assert report["velocity_error"] < 0.05  # only the norms' change (outside linear layers) is missing
    assert "reasoning=\"none\"" in (out / "README.md").read_text()

    tuned = QwenImageTransformer2DModel.from_pretrained(tuned_run / "transformer").state_dict()
    editor = load_bench_editor(tiny_dir, "none", lora=out)
    assert editor.name == "editr2-none+lora"
    fused = editor.pipe.transformer.state_dict()
    assert set(fused) == set(tuned)  # fused and unloaded: no adapter layers left
    for key, value in tuned.items():
        if key.endswith(".weight") and value.ndim == 2 or key.endswith(".bias"):
            torch.testing.assert_close(fused[key], value, atol=2e-3, rtol=1e-2)  # fp16 factors


@pytest.mark.slow
def test_bench_shapes_lora_option(tiny_dir, model_folder, tuned_run, tmp_path, capsys):
    from editr2.cli import main
    from recipes.shapes_tiny import export_lora

    model = model_folder({"height": 64, "width": 64, "reference_area": None, "condition_area": 32 * 32,
                          "num_inference_steps": 2, "true_cfg_scale": 1.0})
    lora = tmp_path / "lora"
    export_lora.main(["--base", str(model), "--editor", str(tuned_run), "--rank", "2", "--out", str(lora)])
    out = tmp_path / "bench"
    args = ["bench", "shapes", "--model", str(model), "--reasoning", "none", "--sessions", "1", "--turns", "1",
            "--out", str(out), "--no-progress"]
    assert main(args + ["--lora", str(lora)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lora"] == str(lora) and results["config"]["editor"] == "editr2-none+lora"
    with pytest.raises(SystemExit, match="another"):  # the same --out without the adapter is another configuration
        main(args)
    with pytest.raises(SystemExit, match="--lora"):
        main(args + ["--lora", str(tmp_path / "missing"), "--force"])
    with pytest.raises(SystemExit, match="only apply to a model"):
        main(["bench", "shapes", "--lora", str(lora), "--out", str(tmp_path / "x")])
    assert not any((tmp_path / "x").glob("*"))
    shutil.rmtree(out)


def test_lora_fingerprint_sees_the_weights_not_the_card(tmp_path):
    from editr2.bench.shapes_cli import lora_fingerprint

    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (tmp_path / "README.md").write_text("card")
    before = lora_fingerprint(tmp_path)
    assert lora_fingerprint(tmp_path / "pytorch_lora_weights.safetensors") == before
    (tmp_path / "README.md").write_text("a better card")
    assert lora_fingerprint(tmp_path) == before
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"retrained")
    assert lora_fingerprint(tmp_path) != before

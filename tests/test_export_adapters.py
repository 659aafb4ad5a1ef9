"""`recipes.shapes_tiny.export --model FOLDER --adapters RUN`: an RL run's LoRAs fused into a half-precision folder
that loads as plain weights and behaves as the folder with the adapters loaded."""

import json

import pytest
import torch
from peft import LoraConfig

from diffusers_editr2 import EditR2Pipeline
from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_image, tiny_pipeline
from editr2.session import Session
from recipes.shapes_tiny.export import main
from recipes.shapes_tiny.rl_demo import ADAPTER_FILE, REASONING_DIR, load_adapters

PROMPT = "make the square red"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny exported folder (fp16, with a separate reasoner) and a trainer-like output with both LoRAs."""
    root = tmp_path_factory.mktemp("export_adapters")
    base = tiny_pipeline(seed=0, reasoning_model=True)
    base.to(torch.float16).save_pretrained(root / "model")  # weights exact in fp16, as in a shipped folder
    (root / "model" / "editr2_call_defaults.json").write_text(json.dumps({"num_inference_steps": 2}))
    trained = EditR2Pipeline.from_pretrained(root / "model", dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trained.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                   target_modules=["to_q", "to_v"]))
        trained.reasoning_model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules=["q_proj", "v_proj"]), adapter_name="reasoning")
    run = root / "run"
    trained.save_transformer_lora(run)
    trained.save_reasoning_lora(run / REASONING_DIR)
    assert (run / ADAPTER_FILE).is_file()
    return root


def test_fused_folder_behaves_as_the_folder_with_its_adapters(folders):
    out = folders / "fused"
    assert main(["--model", str(folders / "model"), "--adapters", str(folders / "run"), "--out", str(out),
                 "--threads", "1"]) == 0
    report = json.loads((folders / "fused.export_report.json").read_text())
    for name in ("transformer", "reasoning_model"):
        fused = report["fused"][name]
        assert fused["loaded"] and fused["params_changed"] > 0 and 0.5 < fused["kept"] <= 1.0
    assert json.loads((out / "editr2_call_defaults.json").read_text()) == {"num_inference_steps": 2}
    # the exporting process's offline flag is not written into the model's tokenizer configs
    configs = sorted(out.rglob("tokenizer_config.json"))
    assert configs and not any(json.loads(path.read_text()).get("local_files_only") for path in configs)

    fused = EditR2Pipeline.from_pretrained(out, dtype=torch.float32)
    assert not getattr(fused.reasoning_model, "_hf_peft_config_loaded", False)
    assert not any("lora" in k for k in fused.transformer.state_dict())
    adapted = EditR2Pipeline.from_pretrained(folders / "model", dtype=torch.float32)
    load_adapters(adapted, folders / "run")
    # an edit (no reasoning: the transformer alone): fp16 storage of the merged weights is the only difference
    call = dict(TINY_CALL_KWARGS, reasoning="none", output_type="np", num_inference_steps=2)
    edits = [pipe(image=tiny_image(2), prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call).images
             for pipe in (fused, adapted)]
    assert abs(edits[0] - edits[1]).max() < 0.02
    # the reasoner writes the same intent
    session = Session(source_image=tiny_image(2))
    ask = dict(max_new_tokens=10, condition_area=32 * 32)
    assert torch.equal(fused.generate_reasoning(session, PROMPT, **ask)[2],
                       adapted.generate_reasoning(session, PROMPT, **ask)[2])


def test_bad_model_or_adapters_stop_before_writing(folders, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="not an exported pipeline folder"):
        main(["--model", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit, match="no such folder"):
        main(["--model", str(folders / "model"), "--adapters", str(tmp_path / "missing"), "--out", str(out)])
    with pytest.raises(SystemExit, match="goes with --model"):
        main(["--adapters", str(folders / "run"), "--out", str(out)])
    with pytest.raises(ValueError, match="holds no adapters"):
        main(["--model", str(folders / "model"), "--adapters", str(tmp_path), "--out", str(out)])
    assert not out.exists()

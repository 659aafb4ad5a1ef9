"""The shipped model (checkpoints/editr2-shapes-tiny) through every entry point, one short turn or session each.

Its weights are stored in float16 and its text encoder's config names float16: an entry point that loads the text
encoder in another dtype than the transformer fails on the first call (`mat1 and mat2 must have the same dtype`).
"""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "editr2-shapes-tiny"
FIXTURE = Path(__file__).parent / "fixtures" / "mice_cm_sample.jsonl"
SHAPES_TINY = Path(__file__).resolve().parents[1] / "examples" / "configs" / "shapes_tiny.yaml"
# a short turn: few denoising steps and a short reasoning answer, at the size the model was trained for
FAST = dict(num_inference_steps=2, max_new_tokens=8)


def _dtypes(pipe) -> set:
    return {next(getattr(pipe, name).parameters()).dtype for name in ("text_encoder", "transformer", "vae")}


def _python_api(tmp_path):
    from diffusers_editr2 import EditR2Pipeline
    from diffusers_editr2.call_defaults import read_call_defaults
    from editr2.bench.shapes import generate_session

    call = {**read_call_defaults(SHIPPED), **FAST}
    source = generate_session("cm", num_turns=1, seed=0)
    for kwargs, dtype in [({}, torch.float32), ({"dtype": torch.bfloat16}, torch.bfloat16)]:
        pipe = EditR2Pipeline.from_pretrained(SHIPPED, **kwargs)
        assert _dtypes(pipe) == {dtype}, kwargs
        pipe.set_progress_bar_config(disable=True)
        out = pipe(image=source.source_image(), prompt=source.instruction[0], output_type="np",
                   generator=torch.Generator().manual_seed(0), **call)  # fmt: skip
        assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all(), kwargs
        assert out.intents[0]


def _edit_cli(tmp_path):
    from PIL import Image

    from editr2.cli import main
    from editr2.session import Session

    Image.new("RGB", (64, 64), (200, 180, 40)).save(tmp_path / "in.png")
    out = tmp_path / "edit"
    assert main(["edit", "--model", str(SHIPPED), "--image", str(tmp_path / "in.png"), "make the circle red",
                 "--out", str(out), "--steps", "2", "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert Session.load(out).num_turns == 1


def _bench_shapes(tmp_path):
    from editr2.cli import main

    out = tmp_path / "shapes"
    assert main(["bench", "shapes", "--model", str(SHIPPED), "--sessions", "1", "--turns", "1", "--steps", "2",
                 "--out", str(out), "--no-progress", "--pipeline-kwargs", json.dumps({"max_new_tokens": 8})]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["mean"]["IF"] <= 1.0


def _bench_mice(tmp_path):
    from PIL import Image

    from judge_fakes import FakeChatServer, prompt_of
    from editr2.bench.mice import load_sessions, read_results
    from editr2.cli import main

    (session,) = load_sessions(FIXTURE, limit=1)
    images = tmp_path / "images"
    (images / session.image).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), (90, 140, 200)).save(images / session.image)

    def answer(payload):
        return "<turn_1>yes</turn_1><turn_2>no</turn_2>" if "<turn_i>" in prompt_of(payload) else "yes"

    with FakeChatServer(answer) as server:
        judge = tmp_path / "judge.yaml"
        judge.write_text(textwrap.dedent(f"""
            vlm: {{backend: openai, model: tiny, base_url: "{server.base_url}"}}
            metrics: [IF, GA]
            if: {{num_votes: 1}}
            ga: {{num_votes: 1}}
        """))
        assert main(["bench", "mice", "--sessions", str(FIXTURE), "--images", str(images), "--model", str(SHIPPED),
                     "--judge", str(judge), "--out", str(tmp_path / "mice"), "--limit", "1", "--steps", "2",
                     "--no-filmstrips", "--pipeline-kwargs", json.dumps({"max_new_tokens": 8})]) == 0  # fmt: skip
    (record,) = read_results(tmp_path / "mice" / "results.jsonl")
    assert record["status"] == "ok", record.get("error")


def _comfy_loader(tmp_path):
    from comfy_stubs.install import installed

    with installed(tmp_path / "comfy") as comfy:
        model = comfy.nodes.EditR2LoadModel.execute("editr2-shapes-tiny", "auto", "cpu")[0]
        assert _dtypes(model.pipeline) == {torch.float32}
        session = comfy.nodes.EditR2StartSession.execute(torch.rand(1, 64, 64, 3), "")[0]
        session, image, _ = comfy.nodes.EditR2EditTurn.execute(session, model, "make the circle red", "none", 2, 1.0, 0)
        assert session.num_turns == 1 and image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def _trainer_script(tmp_path):
    from trl_editr2.scripts.editr2 import main, make_parser

    out = tmp_path / "trainer"
    script_args, training_args = make_parser().parse_args_and_config([
        "--config", str(SHAPES_TINY), "--model_name_or_path", str(SHIPPED), "--shapes_size", "64",
        "--output_dir", str(out), "--max_steps", "1", "--num_turns", "1", "--num_inference_steps", "3",
        "--max_reasoning_tokens", "4", "--shapes_num_sessions", "2", "--disable_tqdm", "true", "--report_to", "none",
    ])  # fmt: skip
    main(script_args, training_args)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "reward" in h] == [1]


@pytest.mark.slow
def test_shipped_model_runs_through_every_entry_point(tmp_path):
    if not (SHIPPED / "model_index.json").is_file():
        pytest.skip("no shipped checkpoint at checkpoints/editr2-shapes-tiny (see docs/training.md)")
    for entry_point in (_python_api, _edit_cli, _bench_shapes, _bench_mice, _comfy_loader, _trainer_script):
        (tmp_path / entry_point.__name__).mkdir()
        entry_point(tmp_path / entry_point.__name__)

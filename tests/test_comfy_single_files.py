"""Load Edit-R2 Model (single files): ComfyUI's split Qwen-Image-Edit files, written tiny by the test in ComfyUI's key
layout, loaded through the node against the ComfyUI stand-ins; and the LoRA node and low-VRAM modes on top."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from comfy_files import vae_to_comfy, write_single_files, write_trainer_lora
from comfy_stubs.install import installed

from diffusers_editr2.pipeline_editr2 import EditR2Pipeline
from diffusers_editr2.testing import tiny_image

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with installed(tmp_path_factory.mktemp("comfy")) as comfy:
        yield comfy


@pytest.fixture(scope="module")
def models_dir(comfy):
    return pathlib.Path(comfy.folder_paths.models_dir)


def start(comfy, seed=0):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(seed))
    return comfy.nodes.EditR2StartSession.execute(image, "")[0]


def turn(comfy, session, model, instruction, reasoning="intent", seed=0):
    return comfy.nodes.EditR2EditTurn.execute(session, model, instruction, reasoning, 2, 1.0, seed)


def reference_turns(components, zero_cond_t, session, instructions, reasoning="intent"):
    """The same turns on the components built in memory (what the files were written from)."""
    components = dict(components)
    if zero_cond_t:
        from diffusers import QwenImageTransformer2DModel

        transformer = QwenImageTransformer2DModel.from_config({**components["transformer"].config,
                                                               "zero_cond_t": True})
        transformer.load_state_dict(components["transformer"].state_dict())
        components["transformer"] = transformer.eval()
    pipe = EditR2Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    session = pipe.start_session(session.source_image, 32, 32)
    out = []
    for seed, instruction in enumerate(instructions):
        result = pipe(prompt=instruction, session=session, reasoning=reasoning, num_inference_steps=2,
                      true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                      reference_area=None)
        session = result.session
        out.append((np.asarray(result.images[0], dtype=np.float32) / 255, result.intents[0]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Key mappings and configs


def test_vae_key_mapping_is_diffusers_wan_conversion():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from comfy_files import tiny_real_topology_vae

    state_dict = tiny_real_topology_vae().state_dict()
    comfy_layout = vae_to_comfy(state_dict)
    assert "encoder.downsamples.0.residual.0.gamma" in comfy_layout and "decoder.upsamples.3.resample.1.weight" in \
        comfy_layout and "conv1.weight" in comfy_layout  # the Wan 2.1 layout ComfyUI's qwen_image_vae uses
    back = convert_wan_vae_to_diffusers(comfy_layout)
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)


@pytest.mark.slow
def test_shipped_configs_describe_the_real_models(comfy):
    """The pack's configs build the real architectures (on the meta device: no memory): ~20 B and ~8.3 B parameters."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    single_file = comfy.pack.single_file
    for release in single_file.RELEASES:
        folder = single_file.CONFIGS_DIR / release
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 20_000  # small JSON, no weights
        with init_empty_weights():
            transformer = QwenImageTransformer2DModel.from_config(
                QwenImageTransformer2DModel.load_config(folder / "transformer"))
            text_encoder = Qwen2_5_VLForConditionalGeneration._from_config(
                AutoConfig.from_pretrained(folder / "text_encoder"))
            vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(folder / "vae"))
        assert 20.0e9 < sum(p.numel() for p in transformer.parameters()) < 20.6e9
        assert 8.2e9 < sum(p.numel() for p in text_encoder.parameters()) < 8.4e9
        assert vae.config.z_dim == 16 and vae.config.base_dim == 96
        assert transformer.config.zero_cond_t == (release == "qwen-image-edit-2511")


def test_auto_config_picks_the_release_from_the_file(comfy):
    single_file = comfy.pack.single_file
    resolve = single_file.resolve_config
    assert resolve("auto", "qwen_image_edit_2509_fp8_e4m3fn.safetensors").name == "qwen-image-edit-2509"
    assert resolve("auto", "qwen_image_edit_2511_bf16.safetensors").name == "qwen-image-edit-2511"
    assert resolve("auto", "my_edit_model.safetensors", ["x", "__index_timestep_zero__"]).name == \
        "qwen-image-edit-2511"
    with pytest.raises(ValueError, match="config must be one of"):
        resolve("qwen-image-edit-2512")


def test_file_prefixes_are_removed(comfy):
    single_file = comfy.pack.single_file
    tensor = torch.zeros(1)
    transformer = single_file.transformer_state_dict(
        {"model.diffusion_model.img_in.weight": tensor, "model.diffusion_model.proj_out.bias": tensor,
         "model.diffusion_model.__index_timestep_zero__": torch.tensor([])}, torch.float32)
    assert set(transformer) == {"img_in.weight", "proj_out.bias"}
    text = single_file.text_encoder_state_dict(
        {"qwen25_7b.transformer.model.embed_tokens.weight": tensor, "qwen25_7b.transformer.visual.merger.ln_q.weight":
         tensor, "qwen25_7b.transformer.lm_head.weight": tensor}, torch.float32)
    assert set(text) == {"model.language_model.embed_tokens.weight", "model.visual.merger.ln_q.weight",
                         "lm_head.weight"}
    # a file already in transformers' layout keeps its names
    current = {"model.language_model.embed_tokens.weight": tensor, "model.visual.merger.ln_q.weight": tensor}
    assert set(single_file.text_encoder_state_dict(current, torch.float32)) == set(current)


def test_scaled_fp8_weights_are_dequantised(comfy):
    single_file = comfy.pack.single_file
    weight = torch.randn(4, 4)
    scale = torch.tensor(0.5)
    state_dict = {"scaled_fp8": torch.tensor([]), "a.weight": (weight / 0.5).to(torch.float8_e4m3fn),
                  "a.scale_weight": scale, "a.bias": torch.ones(4, dtype=torch.bfloat16)}
    out = single_file.dequantize(state_dict, torch.float32)
    assert set(out) == {"a.weight", "a.bias"} and out["a.bias"].dtype == torch.float32
    torch.testing.assert_close(out["a.weight"], weight, atol=0.1 * weight.abs().max().item(), rtol=0.1)
    # the newer layout names the scale `<layer>.weight_scale`
    newer = {"a.weight": (weight / 0.5).to(torch.float8_e4m3fn), "a.weight_scale": scale}
    torch.testing.assert_close(single_file.dequantize(newer, torch.float32)["a.weight"], out["a.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# The node


@pytest.mark.parametrize("variant", ["2509", "2511"])
@pytest.mark.slow
def test_single_files_load_and_edit_like_the_components(comfy, models_dir, variant):
    written = write_single_files(models_dir, variant=variant, config_name=f"tiny-{variant}")
    names = written["names"]
    node = comfy.nodes.EditR2LoadSingleFiles
    required = node.INPUT_TYPES()["required"]
    assert names["diffusion_model"] in required["diffusion_model"][1]["options"]
    assert names["text_encoder"] in required["text_encoder"][1]["options"]
    assert names["vae"] in required["vae"][1]["options"]
    assert {"auto", "qwen-image-edit-2509", "qwen-image-edit-2511", f"tiny-{variant}"} <= set(
        required["config"][1]["options"])
    assert node.validate_inputs(names["diffusion_model"], names["text_encoder"], names["vae"], f"tiny-{variant}")

    with torch.inference_mode():  # ComfyUI runs nodes in inference mode: the weights become inference tensors
        model = node.execute(names["diffusion_model"], names["text_encoder"], names["vae"], f"tiny-{variant}",
                             "float32", "cpu")[0]
    assert model.can_reason and model.pipeline.transformer.config.zero_cond_t == (variant == "2511")
    session = start(comfy)
    instructions = ["add a red circle on the left", "make it blue"]
    results = []
    for seed, instruction in enumerate(instructions):
        with torch.inference_mode():
            session, image, intent = turn(comfy, session, model, instruction, seed=seed).args
        results.append((image[0].numpy(), intent))
    expected = reference_turns(written["components"], variant == "2511", start(comfy), instructions)
    for (image, intent), (expected_image, expected_intent) in zip(results, expected):
        assert intent == expected_intent
        np.testing.assert_allclose(image, expected_image, atol=1 / 255 + 1e-6, rtol=0)  # within one 8-bit step


def test_missing_files_are_validation_errors(comfy):
    node = comfy.nodes.EditR2LoadSingleFiles
    message = node.validate_inputs("nothing.safetensors", "nothing.safetensors", "nothing.safetensors", "auto")
    assert isinstance(message, str) and "'nothing.safetensors' was not found" in message and "diffusion_models" in \
        message


def test_a_text_encoder_without_lm_head_encodes_but_does_not_reason(comfy, models_dir):
    written = write_single_files(models_dir, lm_head=False, config_name="tiny-no-head")
    names = written["names"]
    model = comfy.nodes.EditR2LoadSingleFiles.execute(
        names["diffusion_model"], names["text_encoder"], names["vae"], "tiny-no-head", "float32", "cpu")[0]
    assert model.can_reason is False
    with pytest.raises(ValueError, match="lm_head"):
        turn(comfy, start(comfy), model, "make it red", reasoning="intent")
    _, image, intent = turn(comfy, start(comfy), model, "make it red", reasoning="none").args
    expected_image, _ = reference_turns(written["components"], False, start(comfy), ["make it red"], "none")[0]
    np.testing.assert_allclose(image[0].numpy(), expected_image, atol=1 / 255 + 1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA node


@pytest.mark.slow
def test_lora_node_applies_per_wire_with_strength(comfy, models_dir, tiny_dir):
    shutil.copytree(tiny_dir, models_dir / "editr2" / "tiny-for-lora", dirs_exist_ok=True)
    write_trainer_lora(models_dir / "editr2" / "loras" / "my-lora")
    node = comfy.nodes.EditR2LoadLoRA
    assert "my-lora" in node.INPUT_TYPES()["required"]["lora_name"][1]["options"]
    assert isinstance(node.validate_inputs("nope"), str)

    base = comfy.nodes.EditR2LoadModel.execute("tiny-for-lora", "float32", "cpu")[0]
    plain = turn(comfy, start(comfy), base, "make it red", reasoning="none")[1]
    with_lora = node.execute(base, "my-lora", 1.0, 1.0)[0]
    assert with_lora is not base and base.loras == ()
    edited = turn(comfy, start(comfy), with_lora, "make it red", reasoning="none")[1]
    assert (edited - plain).abs().max() > 1e-4  # the transformer LoRA changes the edit
    zero = node.execute(base, "my-lora", 0.0, 0.0)[0]
    torch.testing.assert_close(turn(comfy, start(comfy), zero, "make it red", reasoning="none")[1], plain,
                               atol=1e-6, rtol=0)
    # the base wire is unchanged after the LoRA wire ran (branches do not interfere)
    torch.testing.assert_close(turn(comfy, start(comfy), base, "make it red", reasoning="none")[1], plain,
                               atol=1e-6, rtol=0)

    # the reasoning LoRA is active while the intent is written (and only on its wire)
    pipe = base.pipeline
    session = pipe.start_session(tiny_image(0), 32, 32)
    base.activate_loras()
    plain_answer = pipe.generate_reasoning(session, "make it red", max_new_tokens=8, condition_area=1024)[0]
    with_lora.activate_loras()
    lora_answer = pipe.generate_reasoning(session, "make it red", max_new_tokens=8, condition_area=1024)[0]
    assert lora_answer != plain_answer
    base.activate_loras()
    assert pipe.generate_reasoning(session, "make it red", max_new_tokens=8, condition_area=1024)[0] == plain_answer


# ----------------------------------------------------------------------------------------------------------------------
# Low-VRAM modes


@pytest.mark.parametrize("memory", ["fp8_storage", "model_cpu_offload", "group_offload"])
@pytest.mark.slow
def test_memory_modes_run_turns_with_reasoning(comfy, models_dir, tiny_dir, memory):
    shutil.copytree(tiny_dir, models_dir / "editr2" / "tiny-memory", dirs_exist_ok=True)
    reference = comfy.nodes.EditR2LoadModel.execute("tiny-memory", "float32", "cpu")[0]
    model = comfy.nodes.EditR2LoadModel.execute("tiny-memory", "float32", "cpu", memory)[0]
    assert model.memory == memory
    comfy.model_management.LOAD_CALLS.clear()
    session, expected_session = start(comfy), start(comfy)
    for seed, instruction in enumerate(["add a red circle", "make it blue"]):
        with torch.inference_mode():  # as ComfyUI's executor runs nodes: the hooks move weights in inference mode
            session, image, intent = turn(comfy, session, model, instruction, seed=seed).args
        expected_session, expected_image, expected_intent = turn(comfy, expected_session, reference, instruction,
                                                                 seed=seed).args
        assert intent == expected_intent
        tolerance = 0.1 if memory == "fp8_storage" else 1e-6
        torch.testing.assert_close(image, expected_image, atol=tolerance, rtol=0)
    uses_comfy_loading = [calls[0] is model.patcher for calls in comfy.model_management.LOAD_CALLS]
    assert any(uses_comfy_loading) == (memory == "fp8_storage")  # the offload modes move weights by their hooks
    if memory == "fp8_storage":
        assert model.pipeline.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_offload_modes_ask_comfyui_for_room_on_a_gpu(comfy, models_dir, tiny_dir):
    shutil.copytree(tiny_dir, models_dir / "editr2" / "tiny-room", dirs_exist_ok=True)
    model = comfy.nodes.EditR2LoadModel.execute("tiny-room", "float32", "cpu", "model_cpu_offload")[0]
    model.patcher.load_device = torch.device("cuda")  # as on a GPU machine (prepare only asks, it moves nothing)
    comfy.model_management.FREE_CALLS.clear()
    comfy.model_management.LOAD_CALLS.clear()
    model.prepare()
    ((required, device),) = comfy.model_management.FREE_CALLS
    largest = max(sum(t.numel() * t.element_size() for t in m.state_dict().values())
                  for m in (model.pipeline.transformer, model.pipeline.text_encoder, model.pipeline.vae))
    assert device.type == "cuda" and required == largest and not comfy.model_management.LOAD_CALLS


def test_unknown_memory_mode_is_refused(comfy):
    with pytest.raises(ValueError, match="memory must be one of"):
        comfy.model.load_model("editr2-shapes-tiny", "float32", "cpu", "lowvram")


# ----------------------------------------------------------------------------------------------------------------------
# Template


def test_template_opens_readably_on_the_shapes_scene(comfy):
    workflow = json.loads((REPO / "example_workflows" / "editr2_three_turns.json").read_text())
    assert workflow["extra"]["ds"]["scale"] >= 0.6  # below ~0.6 the frontend skips drawing node text
    (loader,) = [n for n in workflow["nodes"] if n["type"] == "LoadImage"]
    image_name = loader["widgets_values"][0]
    assert image_name == "editr2_shapes_scene.png"
    assert (REPO / "example_workflows" / image_name).is_file()
    # the pack copies the template's input into ComfyUI's input directory when it loads
    assert (pathlib.Path(comfy.folder_paths.get_input_directory()) / image_name).is_file()
    # the frontend's template browser asks for <name>.jpg as the thumbnail
    from PIL import Image

    with Image.open(REPO / "example_workflows" / "editr2_three_turns.jpg") as thumbnail:
        assert thumbnail.format == "JPEG"


def test_edit_turn_shows_its_intent_and_image(comfy, models_dir, tiny_dir):
    shutil.copytree(tiny_dir, models_dir / "editr2" / "tiny-ui", dirs_exist_ok=True)
    model = comfy.nodes.EditR2LoadModel.execute("tiny-ui", "float32", "cpu")[0]
    result = turn(comfy, start(comfy), model, "make it red", reasoning="none")
    assert result.ui["text"] == (result[2],)
    (preview,) = result.ui["images"]
    assert preview["type"] == "temp"
    assert (pathlib.Path(comfy.folder_paths.get_temp_directory()) / preview["filename"]).is_file()

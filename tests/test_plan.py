"""`editr2 plan`: parameter counts (exact), the learning phase's memory against a measured tiny run, layouts, CLI."""

import json

import pytest
import torch

from trl_editr2 import plan as P

# The planner's learning-phase prediction over the measured peak of the same tiny turn (CPU, fp32). At tiny widths the
# fixed costs the planner leaves out (masks, rotary tables, small temporaries) are a larger share than at scale.
PEAK_TOLERANCE = (0.75, 1.3)


def _tiny_configs(pipeline) -> dict:
    return {
        "transformer": dict(pipeline.transformer.config),
        "text_encoder": pipeline.text_encoder.config.to_dict(),
        "vae": dict(pipeline.vae.config),
    }


@pytest.fixture(scope="module")
def tiny_turn(tmp_path_factory):
    """A real tiny trainer (CFG on, G = 3) and one rolled-out turn."""
    from trl_editr2.testing import pixel_hash_reward, tiny_trainer

    trainer = tiny_trainer(tmp_path_factory.mktemp("plan"), reward_funcs=[pixel_hash_reward], trajectory_filter="none",
                           true_cfg_scale=4.0, num_generations=3)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[0]])
    return trainer, batch["rollouts"][0].turns[1]


def _measured_shapes(turn) -> P.StepShapes:
    c = turn.conditioning
    return P.StepShapes(
        image_tokens=turn.latents[0].shape[1], reference_tokens=c.image_latents.shape[1],
        text_tokens=c.prompt_embeds.shape[1], negative_text_tokens=c.negative_prompt_embeds.shape[1],
        vision_tokens=0, vision_patches=0, prompt_tokens=turn.text.prompt_inputs["input_ids"].shape[1],
        completion_tokens=turn.text.completion_ids.shape[1], img_shapes=list(c.img_shapes[0]),
    )


def _measure_learning_peak(trainer, turn) -> int:
    from trl_editr2.policy import LossWeights

    g = trainer.args.num_generations
    weights = LossWeights(torch.ones(g), torch.ones(g, dtype=torch.bool), torch.ones(g, dtype=torch.bool), 1.0)
    policy = trainer.policy
    policy.train()
    policy.zero_grad(set_to_none=True)
    with P.LiveMemory() as memory:
        policy(turn, weights)["loss"].backward()
    policy.zero_grad(set_to_none=True)
    return memory.peak


@pytest.mark.slow
def test_parameter_counts_match_tiny_models_exactly(tiny_turn):
    trainer, _ = tiny_turn
    pipe = trainer.pipeline
    models = P.build_empty_models(_tiny_configs(pipe), trainer.args, torch.float32)
    assert {p.device.type for m in models.values() for p in m.parameters()} == {"meta"}
    for name in ("transformer", "text_encoder", "vae"):
        real, planned = getattr(pipe, name), models[name]
        assert sum(p.numel() for p in planned.parameters()) == sum(p.numel() for p in real.parameters()), name
        assert sum(p.numel() for p in planned.parameters() if p.requires_grad) == sum(
            p.numel() for p in real.parameters() if p.requires_grad), name
    table = P.parameter_table(models)
    assert table["transformer"]["trainable"] > 0 and table["text_encoder.language_model"]["trainable"] > 0
    assert table["text_encoder.visual"]["trainable"] == 0  # the reasoning LoRA stays off the vision tower


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.slow
def test_learning_peak_matches_measured_tiny_run(tiny_turn, checkpointing):
    trainer, turn = tiny_turn
    policy = trainer.policy
    if checkpointing:
        policy.activation_checkpointing_enable()
    try:
        measured = _measure_learning_peak(trainer, turn)
        trainer.args.activation_checkpointing = checkpointing
        result = P.plan(trainer.args, P.Layout(), configs=_tiny_configs(trainer.pipeline),
                        shapes=_measured_shapes(turn), dtype=torch.float32)
    finally:
        if checkpointing:
            policy.transformer.disable_gradient_checkpointing()
            policy.text_encoder.activation_checkpointing_disable()
        trainer.args.activation_checkpointing = False
    m = result.memory
    predicted = m["activations_image"] + m["activations_text"] + m["lora_grads"] + m["transient"]
    low, high = PEAK_TOLERANCE
    assert low * measured <= predicted <= high * measured, (predicted, measured)
    assert m["activations_image_ckpt"] < m["activations_image_no_ckpt"]


@pytest.mark.slow
def test_real_architectures_have_the_released_sizes():
    """Qwen-Image's transformer has 20.43 B parameters, Qwen2.5-VL-7B 8.29 B (their safetensors indexes)."""
    models = P.build_empty_models(P.load_model_configs("qwen_image_edit_2509"))
    transformer = sum(p.numel() for p in models["transformer"].parameters())
    text_encoder = sum(p.numel() for p in models["text_encoder"].parameters())
    assert transformer == pytest.approx(20.43e9, rel=2e-3)
    assert text_encoder == pytest.approx(8.29e9, rel=2e-3)
    with pytest.raises(ValueError, match="qwen_image_edit_2509"):
        P.load_model_configs("qwen_image_edit_3000")


def test_layouts_from_accelerate_configs(tmp_path):
    fsdp = P.layout_from_accelerate_config("examples/accelerate_configs/fsdp.yaml")
    assert (fsdp.num_processes, fsdp.shard_params, fsdp.offload_params) == (8, True, False)
    zero3 = P.layout_from_accelerate_config("examples/accelerate_configs/deepspeed_zero3.yaml")
    assert (zero3.num_processes, zero3.shard_params, zero3.shard_optimizer) == (8, True, True)
    offload = P.layout_from_accelerate_config("examples/accelerate_configs/fsdp_offload_1gpu.yaml")
    assert (offload.num_processes, offload.offload_params) == (1, True)
    ddp = P.layout_from_accelerate_config({"distributed_type": "MULTI_GPU", "num_processes": 4})
    assert (ddp.num_processes, ddp.shard_params) == (4, False)
    assert P.layout_from_accelerate_config({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}},
                                           num_processes=2).shard_grads
    with pytest.raises(ValueError, match="distributed_type"):
        P.layout_from_accelerate_config({"distributed_type": "TPU"})
    with pytest.raises(ValueError, match="does not exist"):
        P.layout_from_accelerate_config(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_sharding_and_fp8_lower_the_weights(tiny_turn):
    trainer, turn = tiny_turn
    configs, shapes = _tiny_configs(trainer.pipeline), _measured_shapes(turn)
    one = P.plan(trainer.args, P.Layout(), configs=configs, shapes=shapes)
    eight = P.plan(trainer.args, P.Layout(8, True, True, True, name="8"), configs=configs, shapes=shapes)
    fp8 = P.plan(trainer.args, P.Layout(), P.Hardware(), P.Options("fp8"), configs=configs, shapes=shapes)
    assert eight.memory["weights_transformer"] <= one.memory["weights_transformer"]  # tiny: two units ~ all
    assert fp8.memory["weights_transformer"] < one.memory["weights_transformer"]
    assert eight.memory["optimizer"] == pytest.approx(one.memory["optimizer"] / 8)
    text = P.format_plan(one)
    assert "peak in learning" in text and "step time" in text
    json.dumps(P.plan_to_dict(one), default=str)
    with pytest.raises(ValueError, match="frozen_dtype"):
        P.plan(trainer.args, P.Layout(), options=P.Options("int4"), configs=configs, shapes=shapes)


def test_training_args_and_model_names(tmp_path):
    from trl_editr2.plan_cli import model_from_name, training_args

    args, model = training_args("examples/configs/qwen_image_edit_2509_lora.yaml", ["resolution=768"])
    assert (args.resolution, args.num_generations, model) == (768, 6, "Qwen/Qwen-Image-Edit-2509")
    assert model_from_name(model) == "qwen_image_edit_2509"
    assert model_from_name("Qwen/Qwen-Image-Edit-2511") == "qwen_image_edit_2511"
    with pytest.raises(ValueError, match="--model"):
        model_from_name("black-forest-labs/FLUX.1-dev")
    with pytest.raises(ValueError, match="unknown training fields"):
        training_args("examples/configs/qwen_image_edit_2509_lora.yaml", ["not_a_field=1"])
    shapes = P.step_shapes(args, P.load_model_configs("qwen_image_edit_2509")["text_encoder"])
    assert shapes.image_tokens == (768 // 16) ** 2 and shapes.vision_tokens == 196  # 384^2 -> 392^2 / 28^2


def test_cli_has_plan():
    from editr2.cli import build_parser

    args = build_parser().parse_args(["plan", "--config", "x.yaml", "--gpu-memory", "139"])
    assert args.gpu_memory == 139


def test_live_memory_counts_storages_once():
    with P.LiveMemory() as memory:
        x = torch.zeros(1000)  # 4000 bytes
        y = x.view(10, 100)  # same storage
        del x, y
        z = torch.ones(500)
    assert memory.peak == 4000
    assert memory.current == 2000
    del z


@pytest.mark.slow
def test_2511_differs_only_by_zero_cond_t(tmp_path):
    configs = P.load_model_configs("qwen_image_edit_2511")
    assert configs["transformer"]["zero_cond_t"] is True
    assert configs["text_encoder"] == P.load_model_configs("qwen_image_edit_2509")["text_encoder"]
    configs["transformer"]["num_layers"] = 1
    from trl_editr2.testing import tiny_config

    models = P.build_empty_models(configs, tiny_config(tmp_path))
    profile = P.transformer_pass(models["transformer"], 1, 16, 16, 8, [(1, 4, 4), (1, 4, 4)])
    assert profile.forward_flops > 0 and profile.saved > 0 and profile.block_saved > 0

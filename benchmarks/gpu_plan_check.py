"""One Edit-R2 RL step at the real config's shapes on one GPU, measured next to `editr2 plan`'s prediction.

    python benchmarks/gpu_plan_check.py                  # one H100/H200: real widths, 4 + 4 layers, ~2-4 minutes
    python benchmarks/gpu_plan_check.py --transformer-layers 8 --text-layers 8 --set resolution=768
    python benchmarks/gpu_plan_check.py --tiny           # a CPU run of the same code paths on the tiny models

Components are random (no download): Qwen-Image-Edit-2509's transformer and Qwen2.5-VL-7B's text encoder at their real
widths (`trl_editr2/plan_models.json`) with `--transformer-layers` / `--text-layers` / `--vision-layers` layers, the
real VAE, the real Qwen2-VL image processor (patch 14) and the tiny tokenizer (so the vocabulary is the tokenizer's
~1k, not 152k; the planner is run for exactly this model, and for the full one). The step is `EditR2Trainer`'s own
(`--steps` optimizer steps, the last one reported: the first creates the AdamW state) with the training config's
rollout shapes: resolution, G, turns, denoising steps, SDE window, CFG, reasoning tokens, LoRA ranks, checkpointing.
Rewards are a pixel hash (judges run elsewhere).

Printed per part: measured peak memory (`torch.cuda.max_memory_allocated`; on CPU, the weights plus
`trl_editr2.plan.LiveMemory`'s peak) and seconds, next to the planner's prediction for the same model; then the
planner's full-depth numbers and the measurement extrapolated to full depth (measured + the planner's difference
between full depth and the layers run, per layer).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples/configs/qwen_image_edit_2509_lora.yaml"
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config YAML (its shapes are used)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a training field")
    parser.add_argument("--transformer-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (the last is reported)")
    parser.add_argument("--tflops", type=float, default=400.0, help="the planner's achieved TFLOP/s")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (a smoke test of this script)")
    return parser.parse_args(argv)


def check_configs(base: dict, args, vocab_size: int, token_ids: dict) -> dict:
    """The real configs with fewer layers and the tokenizer's vocabulary (widths untouched)."""
    configs = copy.deepcopy(base)
    configs["transformer"]["num_layers"] = args.transformer_layers
    te = configs["text_encoder"]
    te["text_config"]["num_hidden_layers"] = args.text_layers
    te["vision_config"]["depth"] = args.vision_layers
    te["vision_config"]["fullatt_block_indexes"] = [args.vision_layers - 1]
    te["vocab_size"] = te["text_config"]["vocab_size"] = vocab_size
    te["text_config"].update(bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                             pad_token_id=token_ids["<|endoftext|>"])
    te.update(image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
              vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"])
    return configs


def build_pipeline(configs: dict, tokenizer, device: str, dtype: torch.dtype):
    """An `EditR2Pipeline` of random components built from `configs`, directly on `device` in `dtype`."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffusers_editr2 import EditR2Pipeline
    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor, Qwen2VLImageProcessorPil
    from diffusers_editr2.testing import CHAT_TEMPLATE, qwen_image_scheduler_config

    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    with torch.device(device):
        transformer = QwenImageTransformer2DModel(**configs["transformer"]).to(dtype).eval()
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**configs["text_encoder"])).to(dtype).eval()
        vae = AutoencoderKLQwenImage(**configs["vae"]).to(dtype).eval()
    text_encoder.generation_config = GenerationConfig(
        bos_token_id=ids("<|endoftext|>"), eos_token_id=[ids("<|im_end|>")], pad_token_id=ids("<|endoftext|>"),
        do_sample=False,
    )
    processor = Qwen2VLImageOnlyProcessor(Qwen2VLImageProcessorPil(), tokenizer, chat_template=CHAT_TEMPLATE)
    pipe = EditR2Pipeline(FlowMatchEulerDiscreteScheduler.from_config(qwen_image_scheduler_config()), vae,
                          text_encoder, tokenizer, processor, transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PhaseMeter:
    """Peak memory and seconds of the trainer's `rollout` and `learn` (wrapped on the instance)."""

    def __init__(self, trainer, device: str):
        self.device, self.results, self.shapes_turn = device, {}, None
        self.static = 0
        for name in ("rollout", "learn"):
            setattr(trainer, name, self._wrap(getattr(trainer, name), name, trainer))

    def _wrap(self, fn, name, trainer):
        from trl_editr2.plan import LiveMemory

        def wrapper(*args, **kwargs):
            cuda = self.device.startswith("cuda")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            static = sum(t.numel() * t.element_size() for t in _tensors(trainer))
            start = time.perf_counter()
            with (contextlib.nullcontext() if cuda else LiveMemory()) as live:
                out = fn(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() if cuda else static + live.peak
            self.results[name] = {"peak": peak, "seconds": time.perf_counter() - start}
            if name == "rollout":
                self.shapes_turn = out[0].turns[-1]
            return out

        return wrapper


def _tensors(trainer):
    """Weights, LoRA and optimizer state (what is allocated between phases; CPU accounting)."""
    seen = {}
    for module in (trainer.pipeline.transformer, trainer.pipeline.text_encoder, trainer.pipeline.vae):
        for t in list(module.parameters()) + list(module.buffers()):
            seen[id(t)] = t
    if trainer.optimizer is not None:
        for state in trainer.optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    seen[id(t)] = t
    return list(seen.values())


def shapes_of(turn):
    from trl_editr2.plan import StepShapes

    c = turn.conditioning
    negative = c.negative_prompt_embeds.shape[1] if c.negative_prompt_embeds is not None else 0
    return StepShapes(turn.latents[0].shape[1], c.image_latents.shape[1], c.prompt_embeds.shape[1], negative, 0, 0,
                      turn.text.prompt_inputs["input_ids"].shape[1] if turn.text else 0,
                      turn.text.completion_ids.shape[1] if turn.text else 0, list(c.img_shapes[0]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers_editr2.testing import tiny_components, tiny_tokenizer
    from trl_editr2 import EditR2Trainer
    from trl_editr2.data import ShapesSessionDataset
    from trl_editr2.plan import Hardware, Layout, load_model_configs, plan
    from trl_editr2.plan_cli import training_args
    from trl_editr2.testing import TINY_SETTINGS, pixel_hash_reward

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    overrides = list(args.set) + ["trajectory_filter=none", "reward_weights={}", f"max_steps={args.steps}",
                                  "gradient_accumulation_steps=1", "logging_steps=1", "dataloader_num_workers=0"]
    if args.tiny:
        skip = ("max_steps", "report_to", "use_cpu", "save_strategy", "disable_tqdm")
        overrides += [f"{k}={json.dumps(v)}" for k, v in TINY_SETTINGS.items() if k not in skip]
        overrides += ["bf16=false", "true_cfg_scale=4.0", "activation_checkpointing=true", "resolution=32"]
    out_dir = tempfile.mkdtemp(prefix="gpu_plan_check_")
    train_args, _ = training_args(args.config, overrides + [f"output_dir={out_dir}"], use_cpu=device == "cpu")
    dtype = torch.bfloat16 if train_args.bf16 else torch.float32
    tokenizer = tiny_tokenizer()
    if args.tiny:
        components = tiny_components()
        configs = {"transformer": dict(components["transformer"].config),
                   "text_encoder": components["text_encoder"].config.to_dict(), "vae": dict(components["vae"].config)}
        full = configs
        from diffusers_editr2.testing import tiny_pipeline

        pipe = tiny_pipeline()
    else:
        full = load_model_configs("qwen_image_edit_2509")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>",
                                                               "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
        configs = check_configs(full, args, len(tokenizer), ids)
        pipe = build_pipeline(configs, tokenizer, device, dtype)
    size = train_args.resolution or 64
    dataset = ShapesSessionDataset(8, "cm", train_args.num_turns, 0, size)
    build_start = time.perf_counter()
    trainer = EditR2Trainer(pipe, [pixel_hash_reward], args=train_args, train_dataset=dataset)
    meter = PhaseMeter(trainer, device)
    trainer.train()
    build_and_train = time.perf_counter() - build_start
    logs = [h for h in trainer.state.log_history if "timing/step" in h][-1]

    hardware = Hardware(tflops=args.tflops)
    shapes = shapes_of(meter.shapes_turn)
    planned = plan(train_args, Layout(1), hardware, configs=configs, shapes=shapes, dtype=dtype)
    planned_full = plan(train_args, Layout(1), hardware, configs=full, shapes=shapes, dtype=dtype)

    rollout_plan = max(planned.phases["reasoning"], planned.phases["sampling"])
    rows = [
        ("rollout peak (GiB)", meter.results["rollout"]["peak"] / GIB, rollout_plan / GIB,
         max(planned_full.phases["reasoning"], planned_full.phases["sampling"]) / GIB),
        ("learning peak (GiB)", meter.results["learn"]["peak"] / GIB, planned.phases["learning"] / GIB,
         planned_full.phases["learning"] / GIB),
        ("reasoning (s)", logs.get("timing/rollout/reasoning", 0.0), planned.time["reasoning"],
         planned_full.time["reasoning"]),
        ("encode (s)", logs.get("timing/rollout/encode", 0.0), planned.time["encode"], planned_full.time["encode"]),
        ("sampling (s)", logs.get("timing/rollout/sampling", 0.0), planned.time["sampling"],
         planned_full.time["sampling"]),
        ("VAE decode (s)", logs.get("timing/rollout/decode", 0.0), float("nan"), float("nan")),
        ("learning (s)", logs.get("timing/learn", 0.0), planned.time["learn"], planned_full.time["learn"]),
        ("step (s)", logs.get("timing/step", 0.0), planned.time["step"], planned_full.time["step"]),
    ]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    layers = "tiny models" if args.tiny else (f"{args.transformer_layers} transformer / {args.text_layers} text / "
                                               f"{args.vision_layers} vision layers at real width")
    print(f"device: {name}; {layers}; resolution {train_args.resolution}, G={train_args.num_generations}, "
          f"T={train_args.num_turns}, {train_args.num_inference_steps} steps, CFG {train_args.true_cfg_scale:g}, "
          f"{train_args.max_reasoning_tokens} reasoning tokens; planner at {args.tflops:g} TFLOP/s; "
          f"tokens: image {shapes.image_tokens} + ref {shapes.reference_tokens}, text {shapes.text_tokens}, "
          f"request {shapes.prompt_tokens} + answer {shapes.completion_tokens}")
    print("")
    print("| part | measured | planned (same model) | measured / planned | planned, full depth | "
          "measured, extrapolated to full depth |")
    print("|---|---:|---:|---:|---:|---:|")
    table = []
    for label, measured, same, full_depth in rows:
        ratio = measured / same if same and same == same else float("nan")
        if "GiB" in label:
            extrapolated = measured + (full_depth - same)
        else:
            extrapolated = measured * full_depth / same if same and same == same else float("nan")
        table.append({"part": label, "measured": measured, "planned": same, "planned_full": full_depth,
                      "extrapolated": extrapolated})
        digits = 3 if "GiB" in label else 2
        print(f"| {label} | {measured:.{digits}f} | {same:.{digits}f} | {ratio:.2f} | {full_depth:.{digits}f} | "
              f"{extrapolated:.{digits}f} |")
    print(f"\n(total wall time with model build and {args.steps} step(s): {build_and_train:.0f} s)")
    return {"rows": table, "device": name}


if __name__ == "__main__":
    main(sys.argv[1:])

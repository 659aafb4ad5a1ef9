"""GPU check: seconds per denoising step and peak memory, EditR2Pipeline vs plain diffusers, at real width.

    python benchmarks/gpu_check.py                       # on a GPU machine: bf16, 512^2 and 1024^2, 2 layers
    python benchmarks/gpu_check.py --smoke               # a CPU dry run of the same code paths (tiny widths)
    python benchmarks/gpu_check.py --memory              # adds peak memory per diffusers memory mode

Components are random (no download) with Qwen-Image-Edit-2509's real widths and few layers: the transformer
(24 heads x 128, joint dim 3584, in 64 / out 16 channels), the real VAE config, and a Qwen2.5-VL text encoder of real
width (hidden 3584, vision 1280 wide, patch 14) with `--text-layers` layers and the tiny tokenizer. Each variant
runs a 2-turn session at each size and reports turn 2 (turn 1 warms up):

- `plain (1MP ref)`: diffusers' `QwenImageEditPlusPipeline` as shipped (the reference image resized to ~1 MP and
  VAE-encoded again each turn);
- `plain (matched)`: the same with its reference sizes set to the working size;
- `ours none`: `EditR2Pipeline(reasoning="none", reference_area=None)`, the latent carried from turn 1;
- `ours intent`: the same with the VLM writing `--max-new-tokens` tokens first (reasoning time shown separately).

With `--memory`, a second table runs `ours intent` under each of diffusers' memory modes (`MEMORY_MODES`): none
(everything on the GPU), `enable_model_cpu_offload`, `enable_group_offload` (block level, CUDA streams) and fp8
layerwise storage of the transformer; each mode starts from components in CPU memory.

Columns: median seconds per denoising step (from step-end timestamps), turn time without reasoning, reasoning time,
share of the turn (without reasoning) outside the transformer's forward passes, and `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def build_components(args):
    """Random components of real width (few layers), created directly on the device in the target dtype."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor, Qwen2VLImageProcessorPil
    from diffusers_editr2.testing import CHAT_TEMPLATE, qwen_image_scheduler_config, tiny_tokenizer

    heads, head_dim, text_hidden = args.heads, args.head_dim, args.text_hidden
    tokenizer = tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=text_hidden, guidance_embeds=False,
            axes_dims_rope=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
        )  # fmt: skip
        vae = AutoencoderKLQwenImage(base_dim=args.vae_base_dim)  # real: 96
        text_heads = max(2, text_hidden // 128)
        half = text_hidden // text_heads // 2
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": args.text_intermediate,
                "num_hidden_layers": args.text_layers, "num_attention_heads": text_heads,
                "num_key_value_heads": max(1, text_heads // 7),
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                    "mrope_section": [half - 6 * half // 8, 3 * half // 8, 3 * half // 8]},
                "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
                "pad_token_id": ids("<|endoftext|>"),
            },
            vision_config={
                "depth": 2, "hidden_size": args.vision_hidden, "intermediate_size": 3420 * args.vision_hidden // 1280,
                "num_heads": max(2, args.vision_hidden // 80), "out_hidden_size": text_hidden, "patch_size": 14,
                "window_size": 112, "fullatt_block_indexes": [1],
            },
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )  # fmt: skip
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    text_encoder.generation_config.eos_token_id = [ids("<|im_end|>")]
    text_encoder.generation_config.pad_token_id = ids("<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil()  # patch 14, merge 2: the real one
    processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(qwen_image_scheduler_config()),
        "vae": vae.to(dtype).eval(),
        "text_encoder": text_encoder.to(dtype).eval(),
        "tokenizer": tokenizer,
        "processor": processor,
        "transformer": transformer.to(dtype).eval(),
    }


def run_variant(pipe, variant: str, size: int, args) -> dict:
    """Two turns; returns turn 2's step times, turn time, reasoning time and transformer forward time."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as upstream

    from diffusers_editr2.testing import tiny_image

    device = args.device
    forward = {"seconds": 0.0, "start": 0.0}
    hooks = [
        pipe.transformer.register_forward_pre_hook(lambda m, a: forward.__setitem__("start", _sync(device))),
        pipe.transformer.register_forward_hook(
            lambda m, a, o: forward.__setitem__("seconds", forward["seconds"] + _sync(device) - forward["start"])
        ),
    ]
    stamps = []

    def on_step_end(p, i, t, tensors):
        stamps.append(_sync(device))
        return {}

    upstream.VAE_IMAGE_SIZE = 1024 * 1024 if variant == "plain (1MP ref)" else size * size
    common = dict(height=size, width=size, num_inference_steps=args.steps, true_cfg_scale=1.0)
    common["callback_on_step_end"] = on_step_end
    image, session, result = tiny_image(0, size=(size, size)), None, {}
    for turn in range(2):
        stamps.clear()
        forward["seconds"] = 0.0
        start = _sync(device)
        stamps.append(start)
        generator = torch.Generator().manual_seed(turn)
        if variant.startswith("plain"):
            image = pipe(image=image, prompt="make the sign yellow", generator=generator, **common).images[0]
            reasoning = 0.0
        else:
            out = pipe(image=image if session is None else None, prompt="make the sign yellow", session=session,
                       reasoning=variant.split()[-1], generator=generator, reference_area=None,
                       max_new_tokens=args.max_new_tokens, **common)  # fmt: skip
            session = out.session
            reasoning = session.turns[-1].timings["reasoning"]
        total = _sync(device) - start
        steps = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # step 2.. (step 1 includes preparation)
        result = {"step": statistics.median(steps), "turn": total - reasoning, "reasoning": reasoning,
                  "outside": 1 - forward["seconds"] / (total - reasoning)}  # fmt: skip
    for hook in hooks:
        hook.remove()
    return result


MEMORY_MODES = ("none", "model_cpu_offload", "group_offload", "fp8_storage")


def memory_mode_pipeline(args, mode: str):
    """An `EditR2Pipeline` of fresh components built in CPU memory, set up for the memory `mode` on `args.device`."""
    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    pipe = EditR2Pipeline(**build_components(argparse.Namespace(**{**vars(args), "device": "cpu"})))
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(args.device)
    if mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "group_offload":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=device.type == "cuda")
    else:
        if mode == "fp8_storage":
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                      compute_dtype=getattr(torch, args.dtype))
        pipe.to(device)
    return pipe


def memory_table(args) -> None:
    cuda = torch.device(args.device).type == "cuda"
    print("\n| size | memory mode | s/step | turn w/o reasoning (s) | reasoning (s) | peak mem (GB) |")
    print("|---|---|---|---|---|---|")
    for mode in MEMORY_MODES:
        pipe = memory_mode_pipeline(args, mode)
        for size in args.sizes:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            r = run_variant(pipe, "ours intent", size, args)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            print(f"| {size} | {mode} | {r['step']:.4f} | {r['turn']:.3f} | {r['reasoning']:.3f} | {peak:.2f} |",
                  flush=True)
        del pipe
        if cuda:
            torch.cuda.empty_cache()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (real: 60)")
    parser.add_argument("--text-layers", type=int, default=1, help="text-encoder layers (real: 28)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text-hidden", type=int, default=3584)
    parser.add_argument("--text-intermediate", type=int, default=18944)
    parser.add_argument("--vision-hidden", type=int, default=1280)
    parser.add_argument("--vae-base-dim", type=int, default=96)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run with tiny widths (checks the script only)")
    parser.add_argument("--memory", action="store_true", help="add peak memory per diffusers memory mode")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.steps, args.max_new_tokens, args.device, args.dtype = [64], 3, 4, "cpu", "float32"
        args.heads, args.head_dim, args.text_hidden, args.text_intermediate = 2, 32, 128, 128
        args.vision_hidden, args.vae_base_dim = 32, 8
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from diffusers import QwenImageEditPlusPipeline

    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    components = build_components(args)
    pipes = {"plain": QwenImageEditPlusPipeline(**components), "ours": EditR2Pipeline(**components)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in components["transformer"].parameters()) / 1e9
    gpu = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"device={gpu} dtype={args.dtype} transformer: {args.layers} layers x {args.heads * args.head_dim} wide "
          f"({n_params:.2f} B params), {args.steps} steps, turn 2 of 2\n")  # fmt: skip
    print("| size | variant | s/step | turn w/o reasoning (s) | reasoning (s) | outside fwd | peak mem (GB) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for variant in ("plain (1MP ref)", "plain (matched)", "ours none", "ours intent"):
            pipe = pipes["plain" if variant.startswith("plain") else "ours"]
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            r = run_variant(pipe, variant, size, args)
            cuda = torch.device(args.device).type == "cuda"
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            print(f"| {size} | {variant} | {r['step']:.4f} | {r['turn']:.3f} | {r['reasoning']:.3f} | "
                  f"{100 * r['outside']:.1f}% | {peak:.2f} |", flush=True)  # fmt: skip
    if args.memory:
        del pipes, components
        memory_table(args)


if __name__ == "__main__":
    main()

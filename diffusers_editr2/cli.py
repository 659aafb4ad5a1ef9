"""Edit an image over several turns with EditR2Pipeline; writes each turn's PNG, session.json and filmstrip.png.

Example::

    editr2 edit --model Qwen/Qwen-Image-Edit-2509 --image in.png "make the sign yellow" "now make it black" --out out/

The output directory is a saved session (`editr2.session.Session.load(out)` restores it): `session.json`,
`source.png`, `turn_01.png`, ..., `latents.safetensors`, plus `filmstrip.png` (each turn under its instruction and
intent). Turn k is seeded with `--seed + k - 1`, so a turn does not depend on how many turns ran before it.

Settings not given on the command line come from the model folder's `editr2_call_defaults.json` when it has one (the
size, steps, CFG, VLM view and request template a model was trained with, e.g. the shipped MICE-Shapes default), else
from upstream Qwen-Image-Edit's defaults (`UPSTREAM_DEFAULTS`).
"""

from __future__ import annotations

import argparse

from PIL import Image

# Qwen-Image-Edit(-2509)'s own defaults, for settings neither the command line nor the model folder gives.
UPSTREAM_DEFAULTS = {"num_inference_steps": 50, "true_cfg_scale": 4.0, "reference_area": 1024 * 1024,
                     "condition_area": 384 * 384, "max_new_tokens": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instructions", nargs="+", help="the editing instructions, one per turn, in order")
    parser.add_argument("--model", required=True, help="a diffusers folder or Hub id (e.g. Qwen-Image-Edit-2509)")
    parser.add_argument("--image", required=True, help="the source image (PNG/JPEG; RGB, greyscale or palette)")
    parser.add_argument("--out", required=True, help="output directory (new, empty, or an earlier session to replace)")
    parser.add_argument("--reasoning", choices=("intent", "history", "none"), default="intent")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per turn (default: the model's, else 50)")
    parser.add_argument("--seed", type=int, default=0, help="turn k uses seed + k - 1 (default: 0)")
    parser.add_argument("--height", type=int, default=None, help="working height (default: ~1 MP at the image's ratio)")
    parser.add_argument("--width", type=int, default=None, help="working width (default: ~1 MP at the image's ratio)")
    parser.add_argument("--true-cfg-scale", type=float, default=None, help="true CFG scale (default: the model's, else 4)")
    parser.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default: ' ')")
    parser.add_argument(
        "--reference-area",
        type=int,
        default=None,
        help="pixels of the source's VAE reference (default: the model's, else 1048576, upstream's); 0 = the working size",
    )
    parser.add_argument("--condition-area", type=int, default=None,
                        help="pixels the VLM sees (default: the model's, else 147456)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="reasoning budget (default: the model's, else 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="reasoning temperature (default: 0 = greedy)")
    parser.add_argument("--lora", default=None, help="a transformer LoRA (diffusers format) to load")
    parser.add_argument("--reasoning-lora", default=None, help="a reasoning LoRA (peft format) for the text encoder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 on GPU, else fp32")


def run(args: argparse.Namespace) -> int:
    import pathlib

    import torch

    from editr2.filmstrip import filmstrip

    from .pipeline_editr2 import EditR2Pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else dtype
    pipe = EditR2Pipeline.from_pretrained(args.model, dtype=dtype).to(device)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    if args.reasoning_lora:
        pipe.load_reasoning_lora(args.reasoning_lora)

    with Image.open(args.image) as image:
        image.load()
        source = image.copy()
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + k) for k in range(len(args.instructions))]
    kwargs = call_kwargs(args)
    negative_prompt = (args.negative_prompt or None) if kwargs["true_cfg_scale"] > 1 else None
    out = pipe.edit_session(image=source, prompts=args.instructions, generator=generators, reasoning=args.reasoning,
                            negative_prompt=negative_prompt, temperature=args.temperature, **kwargs)

    directory = out.session.save(pathlib.Path(args.out))
    filmstrip(out.session).save(directory / "filmstrip.png")
    for k, turn in enumerate(out.session.turns, start=1):
        note = f"  [fallback: {turn.fallback_reason}]" if turn.fallback_reason else ""
        print(f"turn {k}: {turn.instruction!r} -> {turn.intent!r}{note}  ({turn.timings.get('total', 0):.2f} s)")
    print(f"wrote {directory}/turn_XX.png, session.json and filmstrip.png")
    return 0


def call_kwargs(args: argparse.Namespace) -> dict:
    """The `__call__` settings: the command line's, then the model folder's call defaults, then upstream's."""
    from .bench import load_call_defaults

    given = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
             "true_cfg_scale": args.true_cfg_scale, "condition_area": args.condition_area,
             "max_new_tokens": args.max_new_tokens}
    kwargs = {**UPSTREAM_DEFAULTS, **load_call_defaults(args.model, fallback={}),
              **{k: v for k, v in given.items() if v is not None}}
    if args.reference_area is not None:  # 0 means the working size
        kwargs["reference_area"] = args.reference_area or None
    return kwargs

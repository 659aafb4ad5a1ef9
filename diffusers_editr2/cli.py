"""Edit an image over several turns with EditR2Pipeline; writes each turn's PNG, session.json and filmstrip.png.

Example::

    editr2 edit --model Qwen/Qwen-Image-Edit-2509 --image in.png "make the sign yellow" "now make it black" --out out/

The output directory is a saved session (`editr2.session.Session.load(out)` restores it): `session.json`,
`source.png`, `turn_01.png`, ..., `latents.safetensors`, plus `filmstrip.png` (each turn under its instruction and
intent). Turn k is seeded with `--seed + k - 1`, so a turn does not depend on how many turns ran before it.
With `--reasoning intent`, an instruction such as "undo that" whose intent names an earlier state ("Undo the last
edit.", "Restore the image from before turn 2.") restores that state exactly (no denoising; the line says so).

Settings not given on the command line come from the model folder's `editr2_call_defaults.json` when it has one (the
size, steps, CFG, VLM view and request template a model was trained with, e.g. the shipped MICE-Shapes default), else
from upstream Qwen-Image-Edit's defaults (`UPSTREAM_DEFAULTS`).

Everything that can be checked is checked before the model loads, so a typo costs nothing: the image opens, every
instruction is non-empty, the model folder exists (a Hub id must be cached when offline), the settings are in range,
and `--out` can be written. `--out` must be a new folder, an empty one, or, with `--overwrite`, an earlier session
to replace; a file or a folder holding anything else is refused (nothing is ever deleted but an earlier session).
An error is one line on stderr (`editr2 edit: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys
import tempfile

from PIL import Image

# Qwen-Image-Edit(-2509)'s own defaults, for settings neither the command line nor the model folder gives.
UPSTREAM_DEFAULTS = {"num_inference_steps": 50, "true_cfg_scale": 4.0, "reference_area": 1024 * 1024,
                     "condition_area": 384 * 384, "max_new_tokens": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instructions", nargs="+", help="the editing instructions, one per turn, in order")
    parser.add_argument("--model", required=True, help="a diffusers folder or Hub id (e.g. Qwen-Image-Edit-2509)")
    parser.add_argument("--image", required=True, help="the source image (PNG/JPEG; RGB, greyscale or palette)")
    parser.add_argument("--out", required=True,
                        help="output directory: new, empty, or (with --overwrite) an earlier session to replace")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier session saved at --out (without it, such an --out is refused)")
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
    parser.add_argument("--reasoning-condition-area", type=int, default=None,
                        help="pixels the reasoner sees when it writes the intent (default: the model's, else "
                             "--condition-area)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="reasoning budget (default: the model's, else 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="reasoning temperature (default: 0 = greedy)")
    parser.add_argument("--keep-unedited", type=float, default=None, metavar="CHANGE",
                        help="copy the current image's latent back wherever a turn changed it by at most CHANGE (RMS "
                             "per latent pixel, e.g. 0.2): untouched regions stay exactly as they were (default: the "
                             "model's, else off)")
    parser.add_argument("--lora", default=None, help="a transformer LoRA (diffusers format) to load")
    parser.add_argument("--reasoning-lora", default=None, help="a reasoning LoRA (peft format) for the text encoder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 on GPU, else fp32")


class UsageError(ValueError):
    """A bad command line, found before any model work; `run` prints it as one line and exits with status 2."""


def run(args: argparse.Namespace) -> int:
    try:
        source, kwargs = check_args(args)
    except UsageError as e:
        return _fail(e)

    import torch

    from editr2.filmstrip import filmstrip

    from .pipeline_editr2 import EditR2Pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else dtype
    try:
        pipe = EditR2Pipeline.from_pretrained(args.model, dtype=dtype).to(device)
        if args.lora:
            pipe.load_lora_weights(args.lora)
        if args.reasoning_lora:
            pipe.load_reasoning_lora(args.reasoning_lora)
    except (OSError, ValueError) as e:
        return _fail(f"cannot load the model {args.model!r}: {e}")

    generators = [torch.Generator(device="cpu").manual_seed(args.seed + k) for k in range(len(args.instructions))]
    negative_prompt = (args.negative_prompt or None) if kwargs["true_cfg_scale"] > 1 else None
    out = pipe.edit_session(image=source, prompts=args.instructions, generator=generators, reasoning=args.reasoning,
                            negative_prompt=negative_prompt, temperature=args.temperature, **kwargs)

    directory = out.session.save(pathlib.Path(args.out))
    filmstrip(out.session).save(directory / "filmstrip.png")
    for k, turn in enumerate(out.session.turns, start=1):
        note = f"  [fallback: {turn.fallback_reason}]" if turn.fallback_reason else ""
        if turn.restored_from is not None:
            note += f"  [restored {'the source' if turn.restored_from == 0 else f'turn {turn.restored_from}'} exactly]"
        print(f"turn {k}: {turn.instruction!r} -> {turn.intent!r}{note}  ({turn.timings.get('total', 0):.2f} s)")
    print(f"wrote {directory}/turn_XX.png, session.json and filmstrip.png")
    return 0


def _fail(error: Exception | str) -> int:
    """Prints `error` as one line on stderr, as argparse does; returns the exit status 2."""
    print(f"editr2 edit: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def check_args(args: argparse.Namespace) -> tuple[Image.Image, dict]:
    """Checks the command line before the model loads; returns the source image and the `__call__` settings.

    Raises:
        `UsageError`: naming the argument and what to pass, for an empty instruction, an unreadable image, a missing
            model folder, an out-of-range setting, or an `--out` that cannot (or must not) be written.
    """
    for k, instruction in enumerate(args.instructions, start=1):
        if not instruction.strip():
            raise UsageError(f"instruction {k} is empty; pass one non-empty instruction per turn")
    check_model(args.model)
    check_out(args.out, overwrite=args.overwrite)
    source = read_image(args.image)
    try:
        kwargs = call_kwargs(args)
    except ValueError as e:  # a malformed editr2_call_defaults.json
        raise UsageError(f"--model {args.model}: {e}") from None
    _check_settings(args, kwargs)
    return source, kwargs


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_model(model: str) -> None:
    """Refuses a `--model` that is neither a pipeline folder (with `model_index.json`) nor an `org/name` Hub id; when
    the Hub is offline (`HF_HUB_OFFLINE=1`), a Hub id must be in the local cache."""
    path = pathlib.Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"--model {model} is not a diffusers pipeline folder (no model_index.json in it)")
        return
    where = f"no model folder at {path.resolve()}"
    if not _HUB_ID.fullmatch(model):
        raise UsageError(f"--model {model}: {where}; pass a pipeline folder or a Hub id like Qwen/Qwen-Image-Edit-2509")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        raise UsageError(f"--model {model}: {where}, and the Hub is offline (HF_HUB_OFFLINE=1) with no cached copy "
                         "of that id; pass a local pipeline folder, or download it first")


def read_image(path: str) -> Image.Image:
    """The `--image` file, fully read; a missing or unreadable file is a `UsageError`."""
    if not os.path.isfile(path):
        raise UsageError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"--image {path} cannot be read as an image: {e}") from None


def check_out(out: str, overwrite: bool = False) -> None:
    """Refuses an `--out` that `Session.save` could not or should not write, before any work is done.

    Allowed: a new folder (its parents are created), an empty folder, or, with `overwrite`, a folder holding a saved
    session (`session.json`), which is replaced. Refused: a file, any other non-empty folder, a session without
    `overwrite`, and a place where the folder (and the save's temporary sibling) cannot be created.
    """
    from editr2.session import SESSION_FILE

    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder (new, empty, or an earlier session)")
    if path.is_dir() and any(path.iterdir()):
        if not (path / SESSION_FILE).is_file():
            raise UsageError(f"--out {out} is a non-empty folder that is not a saved session; pass a new or empty "
                             "folder")
        if not overwrite:
            raise UsageError(f"--out {out} holds an earlier session; pass --overwrite to replace it, or a new folder")
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out} cannot be created: {existing} is a file")
    try:  # the save writes a temporary sibling folder and renames it: probe exactly that
        tempfile.TemporaryDirectory(dir=existing, prefix=f".{path.name}.probe-").cleanup()
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written: {e.strerror or e} in {existing}") from None


def _check_settings(args: argparse.Namespace, kwargs: dict) -> None:
    positive = {"--steps": kwargs.get("num_inference_steps"), "--height": kwargs.get("height"),
                "--width": kwargs.get("width"), "--condition-area": kwargs.get("condition_area"),
                "--reasoning-condition-area": kwargs.get("reasoning_condition_area"),
                "--max-new-tokens": kwargs.get("max_new_tokens")}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.reference_area is not None and args.reference_area < 0:
        raise UsageError(f"--reference-area must be 0 (the working size) or a positive pixel count, got "
                         f"{args.reference_area}")
    if not math.isfinite(kwargs["true_cfg_scale"]):
        raise UsageError(f"--true-cfg-scale must be a finite number, got {kwargs['true_cfg_scale']}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    keep = kwargs.get("keep_unedited")
    if keep is not None and not (math.isfinite(keep) and keep >= 0):
        raise UsageError(f"--keep-unedited must be a finite change >= 0 (e.g. 0.2), got {keep}")
    if keep is not None and kwargs.get("reference_area") is not None:
        raise UsageError("--keep-unedited copies from the current image's latent at the working size: pass "
                         "--reference-area 0 with it (the source is then encoded at the working size)")


def call_kwargs(args: argparse.Namespace) -> dict:
    """The `__call__` settings: the command line's, then the model folder's call defaults, then upstream's."""
    from .call_defaults import read_call_defaults

    given = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
             "true_cfg_scale": args.true_cfg_scale, "condition_area": args.condition_area,
             "max_new_tokens": args.max_new_tokens, "keep_unedited": getattr(args, "keep_unedited", None),
             "reasoning_condition_area": getattr(args, "reasoning_condition_area", None)}
    kwargs = {**UPSTREAM_DEFAULTS, **read_call_defaults(args.model),
              **{k: v for k, v in given.items() if v is not None}}
    if args.reference_area is not None:  # 0 means the working size
        kwargs["reference_area"] = args.reference_area or None
    return kwargs

"""Drift over 12 edits of a photo: upstream's loop (the image re-encoded every turn) vs EditR2Pipeline's carried latent.

    python benchmarks/drift_real.py --model Qwen/Qwen-Image-Edit-2509 --image photo.jpg --device cuda \\
        --dtype bfloat16 --size 1024 --json runs/drift_real.json          # real weights (one GPU, ~60 GB in bf16)
    python benchmarks/drift_real.py --tiny                                 # tiny random components on CPU (a check)

Each of the 12 edits (`EDITS`) names a region near the border of the picture (a corner or the top centre) and should
leave everything else alone; the boxes of the edits made so far say where the image may change. Variants, on the
same weights, seeds, working size and steps:

- `upstream`: diffusers' `QwenImageEditPlusPipeline`, each turn's output image passed back as the next input (resized
  and VAE-encoded again, upstream's default multi-turn loop);
- `editr2`: `EditR2Pipeline` with `reasoning="none"` (the same prompt text as upstream), each turn continuing the
  session from the previous turn's carried latent;
- `editr2-keep`: as `editr2`, with `keep_unedited=--keep-unedited` (`editr2.unedited`): wherever a turn changed the
  carried latent by at most that much, the previous latent is kept exactly;
- `vae-carried` / `vae-reencoded`: the source through the VAE alone, once, or once per turn
  (`diffusers_editr2.drift.vae_round_trip`): the floor of any editor on this VAE, and what re-encoding alone costs.

Per turn, over the pixels outside every box edited so far (against the source): `bg mean` and `bg worst` (mean
absolute error, and that of the worst cell of an 8x8 grid; `editr2.bench.drift.background_drift`), `colour shift`
(RGB distance between the mean colours: a colour cast or brightness change), `shift px` (the global translation of
the source that best matches the output over the mask, in steps of `size / 256` pixels above 256 px) and `zoom`
(`|scale - 1|` of the best-matching rescale of the source about the centre, searched in steps of 0.005 up to +-6%);
both searches ignore a change of the mean colour. The tables go to stdout; `--json` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# (instruction, box (x0, y0, x1, y1) in fractions of the image that the edit may change)
EDITS: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("Add a small red ball in the top left corner", (0.0, 0.0, 0.3, 0.3)),
    ("Make the red ball blue", (0.0, 0.0, 0.3, 0.3)),
    ("Add a small yellow star in the top right corner", (0.7, 0.0, 1.0, 0.3)),
    ("Make the yellow star bigger", (0.6, 0.0, 1.0, 0.4)),
    ("Remove the blue ball", (0.0, 0.0, 0.3, 0.3)),
    ("Add a small green leaf in the bottom left corner", (0.0, 0.7, 0.3, 1.0)),
    ("Make the green leaf orange", (0.0, 0.7, 0.3, 1.0)),
    ("Add a small white cloud at the top center", (0.3, 0.0, 0.7, 0.25)),
    ("Remove the yellow star", (0.6, 0.0, 1.0, 0.4)),
    ("Add a small black cat in the bottom right corner", (0.7, 0.7, 1.0, 1.0)),
    ("Make the white cloud grey", (0.3, 0.0, 0.7, 0.25)),
    ("Remove the orange leaf", (0.0, 0.7, 0.3, 1.0)),
)
VARIANTS = ("upstream", "editr2", "editr2-keep", "vae-carried", "vae-reencoded")
MEASURES = ("bg_mean", "bg_worst", "color_shift", "shift_px", "zoom")
GRID = 8
SEARCH_SIZE = 256  # translation and zoom are searched on copies box-downsampled to at most this many pixels
SHIFT_RADIUS = 8  # steps searched for a global translation (a step: one pixel of the search copy)
ZOOM_RANGE, ZOOM_STEP = 0.06, 0.005


# ---------------------------------------------------------------------------------------------------------------------
# Measures (numpy; images as float (H, W, 3) in [0, 1])
# ---------------------------------------------------------------------------------------------------------------------


def untouched_mask(height: int, width: int, boxes) -> np.ndarray:
    """`(H, W)` bool: True outside every box (fractions `(x0, y0, x1, y1)`)."""
    mask = np.ones((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        rows = slice(int(np.floor(y0 * height)), int(np.ceil(y1 * height)))
        mask[rows, int(np.floor(x0 * width)):int(np.ceil(x1 * width))] = False
    return mask


def _shift_error(image: np.ndarray, reference: np.ndarray, mask: np.ndarray, dy: int, dx: int) -> float:
    """Mean absolute error over `mask` between `image` and `reference` moved by `(dy, dx)` (overlap only)."""
    h, w = mask.shape
    ys, yr = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h - max(dy, 0))
    xs, xr = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w - max(dx, 0))
    m = mask[ys, xs]
    if not m.any():
        return float("inf")
    return _centred_error(image[ys, xs][m], reference[yr, xr][m])


def _centred_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two `(N, 3)` pixel sets, each minus its mean colour (so a brightness or colour
    change does not pass for a shift or a zoom)."""
    return float(np.abs((a - a.mean(0)) - (b - b.mean(0))).mean())


def _best_shift(image, reference, mask, radius: int) -> tuple[int, int]:
    candidates = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    return min(candidates, key=lambda d: (_shift_error(image, reference, mask, *d), abs(d[0]) + abs(d[1])))


def _search_copies(image: np.ndarray, reference: np.ndarray, mask: np.ndarray):
    """`(image, reference, mask, factor)` box-downsampled by `factor` to <= `SEARCH_SIZE` pixels."""
    factor = max(1, -(-max(mask.shape) // SEARCH_SIZE))
    if factor > 1:
        h, w = (mask.shape[0] // factor) * factor, (mask.shape[1] // factor) * factor

        def down(x):
            return x[:h, :w].reshape(h // factor, factor, w // factor, factor, *x.shape[2:]).mean((1, 3))

        image, reference, mask = down(image), down(reference), down(mask.astype(np.float32)) > 0.5
    return image, reference, mask, factor


def translation(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Length in pixels of the translation of `reference` that best matches `image` over `mask`, searched within
    +-`SHIFT_RADIUS` steps of `factor` pixels (1 up to `SEARCH_SIZE` px; the images are box-downsampled above)."""
    image, reference, mask, factor = _search_copies(image, reference, mask)
    dy, dx = _best_shift(image, reference, mask, SHIFT_RADIUS)
    return float(np.hypot(dy, dx) * factor)


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """`image` zoomed by `scale` about its centre (bilinear), same size."""
    h, w = image.shape[:2]
    ys = ((np.arange(h) + 0.5 - h / 2) / scale + h / 2 - 0.5).clip(0, h - 1)
    xs = ((np.arange(w) + 0.5 - w / 2) / scale + w / 2 - 0.5).clip(0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def zoom_change(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """`|scale - 1|` of the rescale of `reference` (about the centre) that best matches `image` over `mask`."""
    image, reference, mask, _ = _search_copies(image, reference, mask)
    scales = np.arange(1 - ZOOM_RANGE, 1 + ZOOM_RANGE + ZOOM_STEP / 2, ZOOM_STEP)
    errors = [_centred_error(image[mask], _rescale(reference, s)[mask]) for s in scales]
    return float(abs(scales[int(np.argmin(errors))] - 1.0))


def measure(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> dict:
    """Every drift measure of `image` against `source` over `mask` (see the module docstring)."""
    from editr2.bench.drift import background_drift

    mean, worst = background_drift(image, source, mask, grid=GRID)
    cast = float(np.linalg.norm(image[mask].mean(0) - source[mask].mean(0)))
    return {"bg_mean": mean, "bg_worst": worst, "color_shift": cast, "shift_px": translation(image, source, mask),
            "zoom": zoom_change(image, source, mask)}


# ---------------------------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------------------------


def build(args):
    """`(upstream pipeline, EditR2Pipeline)` sharing one set of components."""
    import torch
    from diffusers import QwenImageEditPlusPipeline

    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from diffusers_editr2.testing import tiny_components

        upstream = QwenImageEditPlusPipeline(**tiny_components(seed=0))
    else:
        upstream = QwenImageEditPlusPipeline.from_pretrained(args.model, torch_dtype=dtype)
    upstream = upstream.to(args.device, dtype)
    editr2 = EditR2Pipeline(**upstream.components)
    for pipe in (upstream, editr2):
        pipe.set_progress_bar_config(disable=True)
    return upstream, editr2


def source_image(args):
    from PIL import Image

    if args.image is not None:
        image = Image.open(args.image).convert("RGB")
    else:  # no photo given: the tiny test image (a smooth random field) at the working size
        from diffusers_editr2.testing import tiny_image

        image = tiny_image(0, size=(args.size, args.size))
    return image.resize((args.size, args.size), Image.BICUBIC)


def run(args) -> dict:
    """Every variant's images turn by turn, and their measures."""
    import torch

    from diffusers_editr2.drift import vae_round_trip
    from editr2.bench.shapes.render import to_array

    upstream, editr2 = build(args)
    source = source_image(args)
    src = to_array(source)
    edits = EDITS[: args.turns]
    common = dict(height=args.size, width=args.size, num_inference_steps=args.steps, true_cfg_scale=args.cfg)
    images = {v: [] for v in VARIANTS}
    seconds = {}
    start = time.time()
    image = source
    for k, (prompt, _) in enumerate(edits):
        image = upstream(image=image, prompt=prompt, generator=torch.Generator().manual_seed(args.seed + k),
                         **common).images[0]
        images["upstream"].append(image)
    seconds["upstream"] = time.time() - start
    for variant, keep in (("editr2", None), ("editr2-keep", args.keep_unedited)):
        start, session = time.time(), None
        for k, (prompt, _) in enumerate(edits):
            out = editr2(image=source if session is None else None, session=session, prompt=prompt,
                         reasoning="none", reference_area=None, keep_unedited=keep,
                         generator=torch.Generator().manual_seed(args.seed + k), **common)
            session = out.session
            images[variant].append(out.images[0])
        seconds[variant] = time.time() - start
    carried = vae_round_trip(editr2, source)
    image = source
    for _ in edits:
        image = vae_round_trip(editr2, image)
        images["vae-carried"].append(carried)
        images["vae-reencoded"].append(image)
    rows = {v: [] for v in VARIANTS}
    for k in range(len(edits)):
        mask = untouched_mask(args.size, args.size, [box for _, box in edits[: k + 1]])
        for v in VARIANTS:
            out = to_array(images[v][k].convert("RGB").resize(source.size))
            rows[v].append({"turn": k + 1, **measure(out, src, mask)})
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        source.save(folder / "source.png")
        for v in ("upstream", "editr2", "editr2-keep"):
            for k, im in enumerate(images[v], start=1):
                im.save(folder / f"{v}_t{k:02d}.png")
    config = {k: v for k, v in vars(args).items() if k not in ("json", "save_images")}
    return {"config": config, "edits": [list(e) for e in edits], "per_turn": rows, "seconds": seconds}


def tables(results: dict) -> str:
    """One markdown table per measure: a row per variant, a column per turn."""
    turns = len(results["edits"])
    lines = []
    for key in MEASURES:
        digits = 2 if key == "shift_px" else 3 if key == "zoom" else 4
        lines += [f"**{key}**", "", "| variant | " + " | ".join(f"t{k}" for k in range(1, turns + 1)) + " |",
                  "|---|" + "---:|" * turns]
        for variant, rows in results["per_turn"].items():
            lines.append(f"| {variant} | " + " | ".join(f"{r[key]:.{digits}f}" for r in rows) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen-Image-Edit-2509", help="a Qwen-Image-Edit-2509 folder or repo")
    parser.add_argument("--tiny", action="store_true", help="tiny random components instead of --model (CPU check)")
    parser.add_argument("--image", default=None, help="the photo (default: a smooth random test image)")
    parser.add_argument("--size", type=int, default=None, help="working size, square (default 1024; 64 with --tiny)")
    parser.add_argument("--turns", type=int, default=len(EDITS), help=f"edits to make, 1-{len(EDITS)}")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per turn (default 40; 2 with --tiny)")
    parser.add_argument("--cfg", type=float, default=None, help="true_cfg_scale (default 4.0; 1.0 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="turn k is sampled with seed + k (every variant)")
    parser.add_argument("--keep-unedited", type=float, default=0.2,
                        help="the editr2-keep variant's keep_unedited (RMS change per latent pixel; default 0.2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--save-images", default=None, metavar="DIR", help="save the source and every turn's output")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 40)
    args.cfg = args.cfg if args.cfg is not None else (1.0 if args.tiny else 4.0)
    if not 1 <= args.turns <= len(EDITS):
        raise SystemExit(f"--turns {args.turns}: pass a value in 1..{len(EDITS)}.")
    if args.size % 32:
        raise SystemExit(f"--size {args.size}: pass a multiple of 32.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print(f"{len(results['edits'])} edits, {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, "
          f"{'tiny components' if args.tiny else args.model}, device {args.device}, dtype {args.dtype}; "
          f"seconds: {json.dumps({k: round(v, 1) for k, v in results['seconds'].items()})}\n")
    print(tables(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

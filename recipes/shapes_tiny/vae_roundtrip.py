"""How exactly a VAE gives MICE-Shapes scenes back: the oracle parser on encode -> decode round trips.

    python -m recipes.shapes_tiny.vae_roundtrip --vae checkpoints/editr2-shapes-tiny/vae runs/vae_decoder3/vae \
        --images 2048 --json docs/vae_roundtrip.json

For every VAE folder, the same `--images` held-out random scenes (their own seed stream; training and the training
evaluation draw others) are encoded to the posterior mean, decoded, rounded to uint8 and read back by the oracle
parser. Reported per VAE, with 95% bootstrap intervals over scenes: objects read exactly (shape, colour, size,
cell), whole scenes exact (every object and the background tone), PSNR, background pixels within CC's tolerance, and
the misread objects by kind (e.g. `small cross -> diamond`). The parser reads every original exactly (checked). A
table goes to stdout; `--json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path

import numpy as np

from recipes.shapes_tiny.train_vae import misread, roundtrip  # noqa: F401 (misread: re-exported)


def summarize(rows: list[dict], errors: collections.Counter) -> dict:
    """Rates with bootstrap intervals over scenes (objects: ratio of sums, resampling whole scenes)."""
    from editr2.bench.stats import bootstrap_ci

    counts = np.array([[r["objects_exact"], r["objects"]] for r in rows], dtype=float)  # (N, 2)

    def object_rate(a):
        return float(a[:, 0].sum() / max(a[:, 1].sum(), 1.0))

    out = {"scenes": len(rows), "objects": int(counts[:, 1].sum()),
           "object_accuracy": object_rate(counts), "object_accuracy_ci": bootstrap_ci(counts, object_rate)}
    for key in ("scene_exact", "psnr", "background_kept"):
        values = np.array([float(r[key]) for r in rows])
        name = "scene_accuracy" if key == "scene_exact" else key
        out[name], out[name + "_ci"] = float(values.mean()), bootstrap_ci(values, np.mean)
    out["errors"] = dict(errors.most_common())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", nargs="+", required=True, help="VAE folders (AutoencoderKLQwenImage)")
    parser.add_argument("--images", type=int, default=2048, help="held-out scenes (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes' stream (default 0)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.images < 1:
        raise SystemExit(f"--images {args.images}: pass at least 1.")
    for folder in args.vae:
        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"--vae {folder}: no config.json there; pass a VAE folder (e.g. MODEL/vae).")

    from diffusers import AutoencoderKLQwenImage

    from editr2.bench.shapes.world import random_scene
    from recipes.shapes_tiny import common

    rng = random.Random(common.derive_seed(args.seed, "vae-roundtrip"))
    scenes = [random_scene(rng) for _ in range(args.images)]
    results = {}
    for folder in args.vae:
        vae = AutoencoderKLQwenImage.from_pretrained(folder).float().eval()
        with common.single_frame_convs():
            measured = roundtrip(vae, scenes)
        if not all(r["original_exact"] for r in measured["rows"]):
            raise RuntimeError("The oracle parser misreads an original scene: the evaluation would blame the VAE "
                               "for it.")
        results[folder] = summarize(measured["rows"], measured["errors"])
    print("| VAE | objects exact | scenes exact | PSNR dB | background kept | most frequent misreads |")
    print("|---|---|---|---|---|---|")
    for folder, r in results.items():
        top = "; ".join(f"{k} ({v})" for k, v in list(r["errors"].items())[:3]) or "none"
        lo, hi = r["object_accuracy_ci"]
        slo, shi = r["scene_accuracy_ci"]
        print(f"| `{folder}` | {r['object_accuracy']:.4f} [{lo:.4f}, {hi:.4f}] | {r['scene_accuracy']:.4f} "
              f"[{slo:.4f}, {shi:.4f}] | {r['psnr']:.2f} | {r['background_kept']:.4f} | {top} |")
    print(f"\n{args.images} held-out scenes ({results[args.vae[0]]['objects']} objects); [low, high]: 95% bootstrap "
          "over scenes.")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "seed": args.seed, "command": " ".join(
            ["python -m recipes.shapes_tiny.vae_roundtrip", *(sys.argv[1:] if argv is None else argv)]),
            "vaes": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

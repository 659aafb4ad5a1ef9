"""Stage 1: train the tiny AutoencoderKLQwenImage to reconstruct MICE-Shapes images.

A deterministic autoencoder (the posterior mean is the latent; a small L2 keeps its scale bounded, and Gaussian noise
on the latent makes the decoder robust to the editor's imperfect outputs), trained on fresh random scenes every step
with object pixels weighted up. At the end the per-channel latent statistics are measured and written into the
saved VAE's `latents_mean` / `latents_std` (the pipeline normalises latents with them), in `RUN_DIR/vae/`.

    python -m recipes.shapes_tiny.train_vae --run_dir runs/vae                # resumes RUN_DIR if it exists
    python -m recipes.shapes_tiny.train_vae --run_dir runs/vae --export_only

Gate (docs/training.md): the oracle parser reads >= 99% of reconstructed scenes exactly.
"""

from __future__ import annotations

import collections
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.shapes_tiny import common


@dataclass
class VAEConfig(common.TrainConfig):
    """Stage-1 settings (optimisation, checkpoints, device, mixed precision, `max_minutes` and `data_workers`:
    `common.TrainConfig`).

    Args:
        size: image side in pixels.
        base_dim, z_dim, dim_mult, num_res_blocks: the AutoencoderKLQwenImage architecture; the spatial compression
            is `2 ** (len(dim_mult) - 1)` (one temporal-downsample flag per down stage).
        object_weight: loss weight of object pixels (background pixels weigh 1).
        small_object_weight: loss weight of the pixels of small objects (0: `object_weight`, as larger ones). A small
            cross decoded blurry reads as a diamond: 419 of the first shipped decoder's 441 misreads on 2,048 scenes.
        latent_l2: weight of the mean squared latent (keeps the deterministic latent's scale bounded).
        latent_noise: std of Gaussian noise added to the latent during training, relative to its batch std.
        eval_images: held-out scenes of the parser evaluation (every `eval_every` steps).
        stop_scene_accuracy, stop_background_kept: stop at the first evaluation that reaches both (the gate;
            values above 1 disable early stopping).
        stats_images: images used to measure the latent statistics.
        init_from: a VAE folder (`RUN_DIR/vae` of an earlier run) to start from instead of a random init.
        train_encoder: False trains the decoder only: the latent space (and its statistics) stays exactly that of
            `init_from`, so the editor can train on it while the decoder keeps improving.
    """

    size: int = 64
    base_dim: int = 16
    z_dim: int = 16
    dim_mult: common.Seq = (1, 2, 2)
    num_res_blocks: int = 1
    max_steps: int = 2500
    object_weight: float = 5.0
    small_object_weight: float = 0.0
    latent_l2: float = 1e-4
    latent_noise: float = 0.05
    eval_every: int = 250
    eval_images: int = 256
    stop_scene_accuracy: float = 2.0
    stop_background_kept: float = 2.0
    stats_images: int = 256
    save_every: int = 250
    init_from: str = ""
    train_encoder: bool = True

    FROZEN_FIELDS = ("seed", "size", "base_dim", "z_dim", "dim_mult", "num_res_blocks", "init_from", "train_encoder")


def build_vae(cfg: VAEConfig, latents_mean=None, latents_std=None):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=[False] + [True] * (len(cfg.dim_mult) - 2),
        latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * cfg.z_dim,
        latents_std=list(latents_std) if latents_std is not None else [1.0] * cfg.z_dim,
    )


def random_scenes(rng: random.Random, n: int):
    from editr2.bench.shapes.world import random_scene

    return [random_scene(rng) for _ in range(n)]


def encode_mean(vae, x: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> the posterior mean `(B, z, 1, h, w)` (unnormalised)."""
    return vae.encode(x[:, :, None]).latent_dist.mode()


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.decode(encode_mean(vae, x)).sample[:, :, 0]


def make_batch(cfg: VAEConfig, step: int) -> dict:
    """The CPU part of a step: fresh random scenes rendered to `x` `(B, 3, H, W)` and their pixel weights
    `(B, 1, H, W)` (what data workers compute)."""
    scenes = random_scenes(common.step_rng(cfg.seed, step), cfg.batch_size)
    return {"x": common.scenes_to_tensor(scenes, cfg.size),
            "weights": common.object_weights(scenes, cfg.size, cfg.object_weight,
                                                    cfg.small_object_weight or None)}


def train_step(vae, optimizer, cfg: VAEConfig, step: int, batch: dict, accelerator) -> dict:
    """One optimiser step on `batch` (`make_batch(cfg, step)` on the accelerator's device)."""
    device = accelerator.device
    gen = common.step_generator(cfg.seed, step)
    x, weights = batch["x"], batch["weights"]  # (B, 3, H, W), (B, 1, H, W)
    with accelerator.autocast():
        with torch.set_grad_enabled(cfg.train_encoder):
            z = encode_mean(vae, x)  # (B, z, 1, h, w)
        z_in = z
        if cfg.latent_noise > 0:
            scale = z.detach().std(dim=(0, 2, 3, 4), keepdim=True)
            z_in = z + cfg.latent_noise * scale * torch.randn(z.shape, generator=gen).to(device)  # noise drawn on CPU
        y = vae.decode(z_in).sample[:, :, 0]
    err = y.float() - x
    recon = (weights * (err.abs() + err**2)).mean()
    loss = recon + cfg.latent_l2 * (z.float() ** 2).mean()
    common.set_lr(optimizer, common.lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps))
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_([p for p in vae.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "recon": recon.item(), "grad_norm": float(grad_norm),
            "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def misread(truth, parsed) -> str | None:
    """`None` when `parsed` holds `truth` exactly, else what went wrong, e.g. "small cross -> shape diamond"."""
    got = parsed.at(truth.cell)
    if got == truth:
        return None
    if got is None:
        return f"{truth.size} {truth.shape} -> missing"
    fields = [f"{f} {getattr(got, f)}" for f in ("shape", "color", "size") if getattr(got, f) != getattr(truth, f)]
    return f"{truth.size} {truth.shape} -> " + ", ".join(fields)


@torch.no_grad()
def roundtrip(vae, scenes, size: int = 64, batch: int = 32) -> dict:
    """Encode -> decode `scenes` on the VAE's device, round to uint8 and read them back with the oracle parser.

    Returns:
        `{"rows": [...], "errors": Counter}`: one row per scene (`objects`, `objects_exact`, `cells_exact` of the 9,
        `scene_exact`, `tone_exact`, `original_exact` (the parser reads the original itself exactly), `psnr`,
        `background_kept`: the fraction of background pixels within CC's tolerance), and the misread objects by kind
        (`misread`, plus "spurious object").
    """
    from editr2.bench.metrics import BACKGROUND_TOLERANCE
    from editr2.bench.shapes.parser import parse_batch
    from editr2.bench.shapes.render import object_mask

    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    recs, origs = [], []
    for start in range(0, len(scenes), batch):
        x = common.scenes_to_tensor(scenes[start:start + batch], size)  # (b, 3, H, W) in [-1, 1]
        recs += list(common.tensor_to_arrays(reconstruct(vae, x.to(device))))  # (H, W, 3) uint8-rounded floats
        origs += list(common.tensor_to_arrays(x))
    vae.train(was_training)
    parsed, parsed_orig = parse_batch(np.stack(recs)), parse_batch(np.stack(origs))
    cells = [(r, c) for r in range(3) for c in range(3)]
    rows, errors = [], collections.Counter()
    for scene, p, p_orig, rec, orig in zip(scenes, parsed, parsed_orig, recs, origs):
        wrong = [m for m in (misread(o, p) for o in scene.objects) if m is not None]
        errors.update(wrong)
        errors.update(["spurious object"] * sum(1 for c in cells if scene.at(c) is None and p.at(c) is not None))
        mse = float(((rec - orig) ** 2).mean())
        bg = ~object_mask(scene, size)
        rows.append({"objects": len(scene.objects), "objects_exact": len(scene.objects) - len(wrong),
                     "cells_exact": sum(p.at(c) == scene.at(c) for c in cells),
                     "scene_exact": common.scene_key(p) == common.scene_key(scene), "tone_exact": p.tone == scene.tone,
                     "original_exact": common.scene_key(p_orig) == common.scene_key(scene),
                     "psnr": float(10 * np.log10(1.0 / max(mse, 1e-10))),
                     "background_kept": float((np.abs(rec - orig).max(-1) <= BACKGROUND_TOLERANCE)[bg].mean())})
    return {"rows": rows, "errors": errors}


def evaluate(vae, cfg: VAEConfig, num_images: int | None = None, batch: int = 32) -> dict:
    """PSNR, background kept (CC's tolerance) and the oracle parser's accuracy on reconstructions of held-out scenes
    (`roundtrip`'s rows, averaged)."""
    num_images = num_images or cfg.eval_images
    rng = random.Random(common.derive_seed(cfg.seed, "eval"))
    rows = roundtrip(vae, random_scenes(rng, num_images), cfg.size, batch)["rows"]

    def mean(key):
        return float(np.mean([float(r[key]) for r in rows]))

    return {
        "psnr": mean("psnr"),
        "background_kept": mean("background_kept"),
        "scene_accuracy": mean("scene_exact"),
        "cell_accuracy": sum(r["cells_exact"] for r in rows) / (9 * len(rows)),
        "object_accuracy": sum(r["objects_exact"] for r in rows) / max(sum(r["objects"] for r in rows), 1),
        "tone_accuracy": mean("tone_exact"),
        "scene_accuracy_originals": mean("original_exact"),
        "images": num_images,
    }


@torch.no_grad()
def latent_statistics(vae, cfg: VAEConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mean over held-out scenes."""
    rng = random.Random(common.derive_seed(cfg.seed, "stats"))
    device = next(vae.parameters()).device
    zs = []
    for start in range(0, cfg.stats_images, 32):
        x = common.scenes_to_tensor(random_scenes(rng, min(32, cfg.stats_images - start)), cfg.size)
        zs.append(encode_mean(vae, x.to(device)).cpu())
    z = torch.cat(zs).transpose(0, 1).reshape(cfg.z_dim, -1)  # (z, B * h * w)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def export(run_dir: Path, cfg: VAEConfig, vae=None, device: torch.device | None = None) -> dict:
    """Save `RUN_DIR/vae/` (diffusers folder with measured latent statistics) and `RUN_DIR/metrics.json`; the
    statistics and the evaluation run on `device` (that of `vae` when given, else the CPU)."""
    if vae is None:
        vae = build_vae(cfg)
        if common.latest_checkpoint(run_dir) is None:
            raise ValueError(f"{run_dir} has no checkpoint to export: train first.")
        common.load_weights(vae, common.latest_checkpoint(run_dir))
        vae.to(device or "cpu")
    device = next(vae.parameters()).device
    vae.eval()
    mean, std = latent_statistics(vae, cfg)
    final = build_vae(cfg, mean, std)
    final.load_state_dict(vae.state_dict())
    final.save_pretrained(run_dir / "vae")
    metrics = evaluate(final.to(device), cfg)
    state = json.loads((common.latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    metrics.update(step=state["step"], train_seconds=state.get("train_seconds"), latents_mean=mean, latents_std=std)
    common.write_json(run_dir / "metrics.json", metrics)
    return metrics


def train(cfg: VAEConfig, run_dir: str | Path, show_progress: bool = True, stop_after: int | None = None):
    """Train (or resume) in `run_dir`, then export; returns the final metrics (None when stopped by `stop_after`,
    which checkpoints and returns after that step, as an interruption would)."""
    with common.single_frame_convs():  # exact, ~2-3x cheaper for one-frame images
        return _train(cfg, run_dir, show_progress, stop_after)


def _train(cfg: VAEConfig, run_dir, show_progress: bool, stop_after: int | None):
    run = common.Run(cfg, run_dir, "vae", show_progress, stop_after)
    common.seed_everything(cfg.seed)
    vae = build_vae(cfg).train()  # built on the CPU (the same init everywhere), then moved
    if cfg.init_from:
        from diffusers import AutoencoderKLQwenImage

        vae.load_state_dict(AutoencoderKLQwenImage.from_pretrained(cfg.init_from).state_dict())
    if not cfg.train_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    vae, optimizer = run.prepare(vae, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    for step, batch in run.steps(lambda step: make_batch(cfg, step)):
        done = step + 1
        if run.end_step(done, train_step(vae, optimizer, cfg, step, batch, run.accelerator),
                        lambda: evaluate(vae, cfg), done % cfg.eval_every == 0 or done == cfg.max_steps,
                        describe=lambda m: json.dumps({k: round(v, 4) for k, v in m.items()}),
                        gate=lambda m: (m["scene_accuracy"] >= cfg.stop_scene_accuracy
                                        and m["background_kept"] >= cfg.stop_background_kept)):
            break
    if run.interrupted:
        return None
    if common.latest_checkpoint(run.run_dir) is None:
        raise ValueError("max_steps is 0: nothing to train.")
    return export(run.run_dir, cfg, vae)


def main(argv=None) -> int:
    cfg, args = common.parse_args(VAEConfig, "vae.yaml", argv)
    if args.export_only:
        device = common.make_accelerator(cfg).device
        with common.single_frame_convs():
            metrics = export(Path(args.run_dir), cfg, device=device)
    else:
        metrics = train(cfg, args.run_dir, not args.no_progress, args.stop_after)
        if metrics is None:
            print(f"stopped after step {args.stop_after}; run the same command again to resume")
            return 0
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

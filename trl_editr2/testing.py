"""Tiny settings for tests, benchmarks and examples: an `EditR2Config` and a trainer that run in seconds on a CPU."""

from __future__ import annotations

import os

TINY_IMAGE_SIZE = 32

# Small everything: G = 2 rollouts, 2 turns, 3 denoising steps with a 2-step SDE window, 4 reasoning tokens.
TINY_SETTINGS = dict(
    num_generations=2,
    num_turns=2,
    num_inference_steps=3,
    sde_window_size=2,
    sde_window_range=[0, 2],
    timestep_shift=None,
    true_cfg_scale=1.0,
    reference_area=None,
    condition_area=TINY_IMAGE_SIZE * TINY_IMAGE_SIZE,
    max_reasoning_tokens=4,
    lora_r=4,
    lora_alpha=8,
    text_lora_r=4,
    text_lora_alpha=8,
    per_device_train_batch_size=1,
    max_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)


def tiny_config(output_dir: str | os.PathLike, **overrides):
    """An [`EditR2Config`] with [`TINY_SETTINGS`], overridden by `overrides`."""
    from .config import EditR2Config

    return EditR2Config(output_dir=str(output_dir), **{**TINY_SETTINGS, **overrides})


def tiny_dataset(num_sessions: int = 4, num_turns: int = 2, family: str = "cm", seed: int = 0):
    """MICE-Shapes sessions at [`TINY_IMAGE_SIZE`] pixels."""
    from .data import ShapesSessionDataset

    return ShapesSessionDataset(num_sessions, family, num_turns, seed, TINY_IMAGE_SIZE)


def tiny_trainer(output_dir: str | os.PathLike, reward_funcs=("shapes_oracle",), dataset=None, model_seed: int = 0,
                 reasoning_model: bool = False, **overrides):
    """An [`EditR2Trainer`] on the tiny random pipeline (with a separate reasoner when `reasoning_model`) and tiny
    MICE-Shapes sessions."""
    from diffusers_editr2.testing import tiny_pipeline

    from .trainer import EditR2Trainer

    args = tiny_config(output_dir, **overrides)
    dataset = dataset if dataset is not None else tiny_dataset(num_turns=args.num_turns)
    pipe = tiny_pipeline(model_seed, reasoning_model=reasoning_model)
    return EditR2Trainer(pipe, list(reward_funcs), args=args, train_dataset=dataset)


def pixel_hash_reward(prompts, images, **kwargs) -> list[float]:
    """A deterministic, meaningless reward in [0, 1) with a wide spread between images (a hash of the pixels).

    For tests and benchmarks of the machinery: unlike the oracle on a random model (mostly 0), it gives every group a
    spread, so advantages and gradients are non-zero.
    """
    import numpy as np

    return [float(np.asarray(image, dtype=np.int64).sum() % 997) / 997 for image in images]

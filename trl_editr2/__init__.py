"""TRL-style RL for Edit-R2: `EditR2Config`, `EditR2Trainer` and the `trl_editr2/scripts/editr2.py` script.

Heavy imports (transformers, diffusers) happen when the names are first used.
"""

from __future__ import annotations

__all__ = ["EditR2Config", "EditR2Trainer", "ShapesSessionDataset", "MiceSessionDataset", "shapes_oracle_rewards"]


def __getattr__(name: str):
    if name == "EditR2Config":
        from .config import EditR2Config

        return EditR2Config
    if name == "EditR2Trainer":
        from .trainer import EditR2Trainer

        return EditR2Trainer
    if name in ("ShapesSessionDataset", "MiceSessionDataset"):
        from . import data

        return getattr(data, name)
    if name == "shapes_oracle_rewards":
        from .rewards import shapes_oracle_rewards

        return shapes_oracle_rewards
    raise AttributeError(f"module 'trl_editr2' has no attribute {name!r}")

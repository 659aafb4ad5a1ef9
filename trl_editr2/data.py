"""Session datasets for [`EditR2Trainer`]: one item = one multi-turn editing session (a plain dict).

An item holds the MICE fields of the session (`instruction`, `task_type`, `formatted_instruction`, `bg_consistency`,
`unchanged_objects`, ...), a `source_image` (PIL, RGB) and a stable `session_id` (it seeds the session's rollouts).
Reward functions receive the fields as keyword arguments (see docs/trainer.md). Two sources:

- [`ShapesSessionDataset`]: MICE-Shapes sessions generated on the fly (exact ground truth in the `shapes` column, for
  the oracle rewards of `trl_editr2.rewards`);
- [`MiceSessionDataset`]: a MICE-format JSONL file (the Edit-R2 release) with its images directory.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

SHAPES_FAMILIES = ("cm", "cu", "mixed")


class ShapesSessionDataset(Dataset):
    """MICE-Shapes sessions `seed, seed + 1, ...`, generated deterministically when first read.

    Args:
        num_sessions (`int`): dataset length.
        family (`str`, defaults to `"cm"`): `"cm"`, `"cu"`, or `"mixed"` (even indices cm, odd cu).
        num_turns (`int`, defaults to 3): turns per session.
        seed (`int`, defaults to 0): seed of the first session (keep training and evaluation seeds apart).
        size (`int`, defaults to 64): image side in pixels.
    """

    def __init__(self, num_sessions: int, family: str = "cm", num_turns: int = 3, seed: int = 0, size: int = 64):
        if family not in SHAPES_FAMILIES:
            raise ValueError(f"family={family!r}: pass one of {SHAPES_FAMILIES}.")
        if num_sessions < 1:
            raise ValueError(f"num_sessions must be >= 1, got {num_sessions}.")
        self.num_sessions, self.family, self.num_turns, self.seed, self.size = num_sessions, family, num_turns, seed, size
        self._item = lru_cache(maxsize=4096)(self._make)

    def __len__(self) -> int:
        return self.num_sessions

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_sessions:
            raise IndexError(f"index {index} out of range for {self.num_sessions} sessions")
        return dict(self._item(index))

    def _make(self, index: int) -> dict:
        from editr2.bench.shapes.sessions import generate_session

        family = self.family if self.family != "mixed" else ("cm", "cu")[index % 2]
        session = generate_session(family, self.num_turns, self.seed + index, self.size)
        record = session.to_json()
        record.update(
            session_id=f"shapes-{family}-{self.num_turns}-{self.size}-{session.seed}",
            source_image=session.source_image(),
            shapes=session,
        )
        return record


class MiceSessionDataset(Dataset):
    """Sessions of a MICE-format JSONL file (e.g. the Edit-R2 release's `train_metadata.jsonl`).

    Args:
        path (`str`): the JSONL file (validated by `editr2.bench.mice.load_sessions`).
        image_root (`str`, *optional*): directory the records' `image` paths are relative to; defaults to the
            file's directory.
        limit (`int`, *optional*): keep the first `limit` sessions.
        min_turns (`int`, defaults to 1): drop sessions with fewer turns (the trainer needs `num_turns`).
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None, limit: int | None = None,
                 min_turns: int = 1):
        from editr2.bench.mice import load_sessions

        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.sessions = [s for s in load_sessions(self.path, limit=limit) if s.num_turns >= min_turns]
        if not self.sessions:
            raise ValueError(f"{self.path} has no session with at least {min_turns} turns.")

    def __len__(self) -> int:
        return len(self.sessions)

    def __getitem__(self, index: int) -> dict:
        session = self.sessions[index]
        image_path = self.image_root / session.image
        if not image_path.is_file():
            raise FileNotFoundError(
                f"{self.path}:{session.line}: source image {image_path} not found; pass image_root= (the directory "
                "the records' 'image' paths are relative to)."
            )
        with Image.open(image_path) as image:
            source = image.convert("RGB")
        record = session.to_dict()
        record.update(session_id=session.session_id, source_image=source)
        return record


def collate_sessions(features: list[dict]) -> list[dict]:
    """The trainer's data collator: a batch is the list of session records, unchanged."""
    return list(features)

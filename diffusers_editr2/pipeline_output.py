from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from editr2.session import Session


@dataclass
class EditR2PipelineOutput(BaseOutput):
    """Output of [`EditR2Pipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The edited image of each turn run by the call (one for `__call__`, one per prompt for `edit_session`), in
            the requested `output_type` (for `"latent"`: the packed latents, `(T, N, C)`).
        intents (`list[str]`):
            The operative intent that conditioned each of those turns (the instruction itself for `reasoning="none"`).
        session ([`~editr2.session.Session`]):
            The new session, ending with these turns. The session passed in is never modified.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    intents: list[str]
    session: Session

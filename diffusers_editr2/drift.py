"""VAE-only drift: what carrying the latent from turn to turn saves over decoding and re-encoding the image each turn.

`EditR2Pipeline` continues a session from the previous turn's latent, so a region no edit touches passes through the
VAE once (the decode of the carried latent). Upstream's multi-turn loop feeds each turn's decoded image back in as the
next input, so that region goes through a decode/encode round trip (and an 8-bit image) every turn and the errors
pile up. `vae_drift` measures both with the pipeline's own VAE and nothing else (no denoising, no edit): per turn t of
a MICE-Shapes session,

- **carried**: `decode(encode(source))`, the same at every turn;
- **re-encoded**: the source passed through t round trips `image -> encode -> decode -> 8-bit image`;

each scored with `editr2.bench.drift.background_drift` against the source over the turn's untouched-background mask
(the CC mask), so it sits next to the editor's own background drift of the same turn. The carried value is the VAE's
round-trip error: the floor of any editor that works through this VAE.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import torch

from editr2.bench.drift import background_drift, background_reference, decay_slope
from editr2.bench.shapes.render import to_array
from editr2.bench.stats import bootstrap_ci


@torch.no_grad()
def vae_round_trip(pipe, image: PIL.Image.Image, height: int | None = None,
                   width: int | None = None) -> PIL.Image.Image:
    """`image` encoded and decoded once by `pipe`'s VAE (as the pipeline does: resized, normalised, 8-bit output).

    Args:
        pipe ([`EditR2Pipeline`]): the pipeline whose VAE and image processor to use.
        image (`PIL.Image.Image`): the RGB image.
        height, width (`int`, *optional*): working size (multiples of the VAE's factor x 2); default the image's.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"`image` is {type(image).__name__}: pass a PIL.Image.Image.")
    height = image.height if height is None else height
    width = image.width if width is None else width
    latents = pipe.encode_image(image.convert("RGB"), height, width, dtype=torch.float32)
    decoded = pipe.decode_latents(latents, height, width)
    if not torch.isfinite(decoded).all():
        raise ValueError("The VAE decoded non-finite values: check the VAE weights and dtype (use float32).")
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]


def vae_drift(pipe, sessions: Sequence, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Background drift per turn of carrying the latent vs re-encoding the image each turn, over `sessions`.

    Args:
        pipe ([`EditR2Pipeline`]): the pipeline whose VAE to measure.
        sessions (`Sequence[ShapesSession]`): MICE-Shapes sessions (their sources and untouched-background masks).
        num_resamples (`int`, defaults to 1000), seed (`int`, defaults to 0): the bootstrap of the summary.

    Returns:
        `{"per_turn": [{"turn", "carried_bg_mean", "carried_bg_worst", "reencoded_bg_mean", "reencoded_bg_worst"},
        ...], "summary": {"slope", "slope_ci"} of the re-encoded bg mean per turn, "sessions": n}`.
    """
    if len(sessions) == 0:
        raise ValueError("`sessions` is empty: pass at least one ShapesSession.")
    num_turns = max(s.num_turns for s in sessions)
    keys = ("carried_bg_mean", "carried_bg_worst", "reencoded_bg_mean", "reencoded_bg_worst")
    values = {k: np.full((len(sessions), num_turns), np.nan) for k in keys}
    for i, session in enumerate(sessions):
        source = session.source_image()
        source_array = to_array(source)
        carried = to_array(vae_round_trip(pipe, source))
        current = source
        for t in range(1, session.num_turns + 1):
            current = vae_round_trip(pipe, current)
            _, mask = background_reference(session, t, source_array)
            values["carried_bg_mean"][i, t - 1], values["carried_bg_worst"][i, t - 1] = background_drift(
                carried, source_array, mask)
            values["reencoded_bg_mean"][i, t - 1], values["reencoded_bg_worst"][i, t - 1] = background_drift(
                to_array(current), source_array, mask)
    per_turn = []
    for t in range(num_turns):
        row = {"turn": t + 1}
        for k in keys:
            column = values[k][:, t]
            column = column[np.isfinite(column)]
            row[k] = float(column.mean()) if len(column) else None
        per_turn.append(row)
    reencoded = values["reencoded_bg_mean"]
    low, high = bootstrap_ci(reencoded, decay_slope, num_resamples, seed=seed)
    summary = {"slope": decay_slope(reencoded), "slope_ci": [low, high]}
    return {"per_turn": per_turn, "summary": summary, "sessions": len(sessions)}

"""VAE-only drift (diffusers_editr2.drift): carrying the latent vs re-encoding the image each turn."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "editr2-shapes-tiny"


@pytest.fixture(scope="module")
def shipped_pipe():
    import torch

    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    if not (SHIPPED / "model_index.json").is_file():
        pytest.skip("the shipped checkpoint is not in this checkout")
    pipe = EditR2Pipeline.from_pretrained(str(SHIPPED), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_round_trip_keeps_the_size_and_validates(pipe):
    from diffusers_editr2.drift import vae_round_trip
    from diffusers_editr2.testing import tiny_image

    image = tiny_image(size=(64, 64))
    out = vae_round_trip(pipe, image)
    assert out.size == (64, 64) and out.mode == "RGB"
    with pytest.raises(TypeError, match="PIL"):
        vae_round_trip(pipe, np.zeros((64, 64, 3)))


@pytest.mark.slow
def test_shipped_vae_drifts_when_re_encoded_not_when_carried(shipped_pipe):
    from diffusers_editr2.drift import vae_drift
    from editr2.bench.shapes import generate_session

    sessions = [generate_session("cm", 5, seed) for seed in range(2)]
    result = vae_drift(shipped_pipe, sessions, num_resamples=200)
    rows = result["per_turn"]
    assert result["sessions"] == 2 and [r["turn"] for r in rows] == [1, 2, 3, 4, 5]
    # turn 1: one round trip either way (the same computation)
    assert rows[0]["reencoded_bg_mean"] == rows[0]["carried_bg_mean"]
    carried = [r["carried_bg_mean"] for r in rows]
    assert max(carried) - min(carried) < 0.5 * min(carried)  # only the mask changes with the turn
    assert rows[-1]["reencoded_bg_mean"] > 1.5 * rows[-1]["carried_bg_mean"]  # errors pile up per round trip
    assert result["summary"]["slope"] > 0 and result["summary"]["slope_ci"][0] <= result["summary"]["slope"]
    with pytest.raises(ValueError, match="empty"):
        vae_drift(shipped_pipe, [])

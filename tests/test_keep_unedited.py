"""Keeping what an edit did not touch (`editr2.unedited`, `EditR2Pipeline(keep_unedited=)`)."""

import pytest
import torch

from editr2.unedited import change_map, keep_unedited


def pack(latents: torch.Tensor) -> torch.Tensor:
    """diffusers' Qwen-Image packing of `(B, C, h, w)` latents: `(B, (h/2) * (w/2), C * 4)`."""
    from diffusers import QwenImageEditPlusPipeline

    b, c, h, w = latents.shape
    return QwenImageEditPlusPipeline._pack_latents(latents, b, c, h, w)


def test_the_reference_comes_back_outside_the_changed_region():
    pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 4, 8, 12, generator=g)  # (B, C, h, w)
    sampled = reference + 0.01 * torch.randn(reference.shape, generator=g)  # drift everywhere
    sampled[0, :, 2:4, 5:7] += 2.0  # an edit in image 0 only
    out, edited = keep_unedited(pack(sampled), pack(reference), 8, 12, threshold=0.1, dilate=1)
    expected = torch.zeros(2, 8, 12, dtype=torch.bool)
    expected[0, 1:5, 4:8] = True  # the 2 x 2 edit grown by one latent pixel
    assert torch.equal(edited, expected)
    want = torch.where(expected[:, None], sampled, reference)  # per latent pixel, every channel
    assert torch.equal(out, pack(want))

    again, none = keep_unedited(pack(sampled), pack(reference[:1]), 8, 12, threshold=0.1, dilate=0)
    assert none[0, 2:4, 5:7].all() and int(none.sum()) == 4 + int((change_map(pack(sampled[1:]), pack(reference[:1]),
                                                                               8, 12) > 0.1).sum())
    assert torch.equal(keep_unedited(pack(sampled), pack(reference), 8, 12, threshold=1e9)[0], pack(reference))
    assert torch.equal(keep_unedited(pack(sampled), pack(reference), 8, 12, threshold=0.0)[0], pack(sampled))


def test_change_map_is_the_rms_over_channels():
    pytest.importorskip("diffusers")
    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    a[0, :, 1, 2] = torch.tensor([1.0, 2.0, 2.0])
    cmap = change_map(pack(a), pack(b), 4, 4)
    assert cmap.shape == (1, 4, 4) and cmap[0, 1, 2] == pytest.approx(3 / 3**0.5) and cmap.sum() == cmap[0, 1, 2]


def test_bad_arguments_say_what_to_pass():
    x = torch.zeros(1, 16, 8)
    for kwargs, match in (({"threshold": -1.0}, "threshold"), ({"threshold": float("nan")}, "threshold"),
                          ({"threshold": 0.1, "dilate": -1}, "dilate")):
        with pytest.raises(ValueError, match=match):
            keep_unedited(x, x, 8, 8, **kwargs)
    with pytest.raises(ValueError, match="same size"):
        keep_unedited(x, torch.zeros(1, 4, 8), 8, 8, threshold=0.1)
    with pytest.raises(ValueError, match="packed 6 x 6"):
        keep_unedited(x, x, 6, 6, threshold=0.1)


def test_the_pipeline_keeps_the_current_latent_where_nothing_changed(pipe):
    from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_image

    def gen():
        return torch.Generator().manual_seed(3)

    first = pipe(tiny_image(1), "make the sign yellow", generator=gen(), **TINY_CALL_KWARGS)
    kwargs = dict(session=first.session, prompt="now make it black", **TINY_CALL_KWARGS)
    plain = pipe(generator=gen(), **kwargs).session.turns[-1]
    everything = pipe(generator=gen(), keep_unedited=0.0, **kwargs).session.turns[-1]
    nothing = pipe(generator=gen(), keep_unedited=1e9, **kwargs).session.turns[-1]
    assert torch.equal(everything.latents, plain.latents) and everything.meta["edited_fraction"] == 1.0
    assert torch.equal(nothing.latents, first.session.turns[-1].latents) and nothing.meta["edited_fraction"] == 0.0
    assert "edited_fraction" not in plain.meta

    with pytest.raises(ValueError, match="keep_unedited"):
        pipe(generator=gen(), keep_unedited=-0.5, **kwargs)
    with pytest.raises(ValueError, match="reference_area=None"):  # a new session whose source is encoded at 1024^2
        pipe(tiny_image(1), "make the sign yellow", keep_unedited=0.3,
             **{**TINY_CALL_KWARGS, "reference_area": 1024 * 1024})

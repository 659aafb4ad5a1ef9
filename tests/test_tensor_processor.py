"""`editr2.tensor_processor`: PIL's resize and the Qwen2-VL processor's batch, made in torch from uint8 tensors."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editr2.tensor_processor import TensorPromptProcessor, patchify, pil_coefficients, pil_resize

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"


def _pil_resize(images: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    out = [np.asarray(Image.fromarray(a, "RGB").resize((width, height), resample=resample))
           for a in images.permute(0, 2, 3, 1).numpy()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.mark.numerics
@pytest.mark.parametrize("resample", [1, 2, 3])  # LANCZOS, BILINEAR, BICUBIC
@pytest.mark.parametrize("size", [(32, 32), (48, 40), (64, 20), (90, 100)])
def test_pil_resize_gives_pils_pixels(resample, size):
    """Integer arithmetic in both (PIL's fixed point; here exact in float64): the same uint8 pixels."""
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=torch.Generator().manual_seed(sum(size) + resample),
                           dtype=torch.uint8)
    images[0] = 255  # saturated: exercises clip8's upper branch (Lanczos overshoots)
    images[1, :, ::2] = 0
    ours = pil_resize(images, *size, resample=resample)
    assert ours.dtype == torch.uint8 and ours.shape == (6, 3, *size)
    assert torch.equal(ours, _pil_resize(images, *size, resample))


def test_pil_resize_same_size_is_a_copy_and_bad_input_is_refused():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    same = pil_resize(images, 8, 8)
    assert torch.equal(same, images) and same.data_ptr() != images.data_ptr()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) uint8"):
        pil_resize(images.float(), 4, 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) uint8"):
        pil_resize(images[0], 4, 4)
    with pytest.raises(ValueError, match="resample=0"):
        pil_coefficients(8, 4, 0)


def test_coefficients_are_pils_normalised_taps():
    m = pil_coefficients(64, 32, 1)  # (in, out)
    assert m.shape == (64, 32)
    sums = m.sum(0) / 2**22
    assert torch.allclose(sums, torch.ones(32, dtype=torch.float64), atol=32 / 2**22)  # each output: weights sum to 1
    assert torch.equal(m, m.round())  # integers in PIL's fixed point


def test_patchify_is_the_processors_layout():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = torch.randn(3, 3, 16, 24)
    ours = patchify(pixels, patch_size=4, merge_size=2, temporal_patch_size=2)
    ref = Qwen2VLImageProcessorPil().patchify
    theirs = np.concatenate([ref(p.numpy(), 4, 2, 2)[0] for p in pixels])
    assert ours.shape == theirs.shape == (3 * 4 * 6, 3 * 2 * 4 * 4)
    assert torch.equal(ours, torch.from_numpy(theirs))  # a permutation of the same floats


@pytest.fixture(scope="module")
def shipped():
    """The shipped checkpoint's processor and the pipeline's prompt template (no model weights needed)."""
    from diffusers_editr2.pipeline_editr2 import PROMPT_TEMPLATE_ENCODE
    from diffusers_editr2.processing import Qwen2VLImageOnlyProcessor

    folder = ROOT / "checkpoints" / "editr2-shapes-tiny" / "processor"
    if not folder.is_dir():
        pytest.skip("the shipped checkpoint is not in this checkout")
    return Qwen2VLImageOnlyProcessor.from_pretrained(str(folder)), PROMPT_TEMPLATE_ENCODE


@pytest.mark.numerics
def test_prompt_batch_equals_the_processors(shipped):
    """What `train_editor.text_inputs` builds per example with PIL (condition view by `VaeImageProcessor.resize`,
    then the processor), for a batch of rendered scenes and everyday texts of different lengths."""
    from diffusers.image_processor import VaeImageProcessor

    from editr2.bench.shapes import random_scene
    from editr2.bench.shapes.torch_render import render_batch, to_uint8

    processor, template = shipped
    rng = random.Random(5)
    scenes = [random_scene(rng) for _ in range(7)]
    images = torch.from_numpy(to_uint8(render_batch(scenes, 64))).permute(0, 3, 1, 2).contiguous()
    texts = ["make the red circle blue", "now remove it", "Move the small square one cell left, please.",
             "from now on, only the edited object may turn red", "", "swap the two objects' colours", "undo that"]
    resize = VaeImageProcessor(vae_scale_factor=16)  # the pipeline's image_processor: Lanczos, no reducing gap
    views = [resize.resize(Image.fromarray(a, "RGB"), 32, 32) for a in images.permute(0, 2, 3, 1).numpy()]
    prompts = [template.format(IMAGE_PROMPT + t) for t in texts]
    theirs = processor(text=prompts, images=views, padding=True, return_tensors="pt")
    ours = TensorPromptProcessor(processor, template, IMAGE_PROMPT, (32, 32))(texts, images)
    assert set(ours) == set(theirs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-6, rtol=0)  # float32 order


def test_prompt_processor_refuses_what_it_cannot_reproduce(shipped):
    processor, template = shipped
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        TensorPromptProcessor(processor, template, IMAGE_PROMPT, (30, 30))
    with pytest.raises(ValueError, match="outside the processor"):
        TensorPromptProcessor(processor, template, IMAGE_PROMPT, (128, 128))
    with pytest.raises(ValueError, match="special token"):
        TensorPromptProcessor(processor, template, "Picture 1: <|image_pad|> and", (32, 32))
    tp = TensorPromptProcessor(processor, template, IMAGE_PROMPT, (32, 32))
    with pytest.raises(ValueError, match="2 texts need"):
        tp(["a", "b"], torch.zeros(3, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) RGB images"):
        tp(["a"], torch.zeros(1, 4, 64, 64, dtype=torch.uint8))  # RGBA: convert first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pil_resize_on_cuda_matches_the_cpu():
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(pil_resize(images.cuda(), 32, 32).cpu(), pil_resize(images, 32, 32))

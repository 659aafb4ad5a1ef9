"""The pipeline owns a model folder's call defaults: `pipe.call_defaults`, read by `from_pretrained`, written by
`save_pretrained`, and applied by the callers (not by `__call__`)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_editr2.call_defaults import CALL_DEFAULTS_FILE, read_call_defaults, write_call_defaults  # noqa: E402
from diffusers_editr2.pipeline_editr2 import EditR2Pipeline  # noqa: E402
from diffusers_editr2.testing import TINY_CALL_KWARGS, tiny_image  # noqa: E402

DEFAULTS = {"height": 64, "width": 64, "reference_area": None, "num_inference_steps": 1, "template": "{instruction}"}


def test_save_pretrained_writes_and_from_pretrained_reads_the_call_defaults(tiny_dir, tmp_path):
    pipe = EditR2Pipeline.from_pretrained(tiny_dir)
    assert pipe.call_defaults == {}  # a folder without the file: upstream's defaults
    pipe.call_defaults = dict(DEFAULTS)
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / CALL_DEFAULTS_FILE).read_text()) == DEFAULTS
    assert EditR2Pipeline.from_pretrained(tmp_path / "saved").call_defaults == DEFAULTS
    assert read_call_defaults(tmp_path / "saved") == DEFAULTS  # the same without loading the model


def test_a_qwen_folder_has_no_call_defaults(qwen_edit_plus_dir):
    assert not (qwen_edit_plus_dir / CALL_DEFAULTS_FILE).exists()
    assert EditR2Pipeline.from_pretrained(qwen_edit_plus_dir).call_defaults == {}


def test_bad_call_defaults_are_refused(tmp_path):
    (tmp_path / CALL_DEFAULTS_FILE).write_text("[64, 64]")
    with pytest.raises(ValueError, match="JSON object"):
        read_call_defaults(tmp_path)
    with pytest.raises(TypeError, match="dict"):
        write_call_defaults(tmp_path, [64, 64])


def test_call_does_not_apply_the_call_defaults(tiny_dir, model_folder):
    """`pipe(...)` means the same with every folder: the folder's defaults (1 step here) change nothing by themselves."""
    plain = EditR2Pipeline.from_pretrained(tiny_dir)
    with_defaults = EditR2Pipeline.from_pretrained(model_folder(DEFAULTS))
    assert with_defaults.call_defaults == DEFAULTS
    kwargs = dict(TINY_CALL_KWARGS, reasoning="none", output_type="np")
    outputs = [pipe(image=tiny_image(0), prompt="add a red circle", generator=torch.Generator().manual_seed(0),
                    **kwargs).images for pipe in (plain, with_defaults)]
    np.testing.assert_array_equal(outputs[0], outputs[1])

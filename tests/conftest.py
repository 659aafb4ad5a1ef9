import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is faster than two (less synchronisation) and keeps results independent of the core count.
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny Edit-R2 model folders, built once per test session. Treat them as read-only: copy one to change it.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`tiny_pipeline(seed=0)` saved with `save_pretrained`."""
    pytest.importorskip("diffusers")
    from diffusers_editr2.testing import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-editr2")
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_folder(tiny_dir, tmp_path_factory):
    """A factory: `model_folder(call_defaults=None)` copies the tiny pipeline folder to a new folder and writes
    `call_defaults` (a dict) as its `editr2_call_defaults.json`; returns the folder."""
    import json
    import shutil

    from diffusers_editr2.call_defaults import CALL_DEFAULTS_FILE

    def make(call_defaults: dict | None = None):
        folder = tmp_path_factory.mktemp("model") / "model"
        shutil.copytree(tiny_dir, folder)
        if call_defaults is not None:
            (folder / CALL_DEFAULTS_FILE).write_text(json.dumps(call_defaults))
        return folder

    return make


@pytest.fixture(scope="session")
def qwen_edit_plus_dir(tmp_path_factory):
    """Tiny components in the folder layout of the real `Qwen/Qwen-Image-Edit-2509` repository."""
    pytest.importorskip("diffusers")
    from diffusers_editr2.testing import save_qwen_image_edit_plus_layout

    return save_qwen_image_edit_plus_layout(tmp_path_factory.mktemp("qwen-edit-plus") / "Qwen-Image-Edit-2509")


@pytest.fixture(scope="session")
def qwen_edit_2511_dir(tmp_path_factory):
    """Tiny components in the folder layout of the real `Qwen/Qwen-Image-Edit-2511` repository (`zero_cond_t`)."""
    pytest.importorskip("diffusers")
    from diffusers_editr2.testing import save_qwen_image_edit_plus_layout

    folder = tmp_path_factory.mktemp("qwen-edit-2511") / "Qwen-Image-Edit-2511"
    return save_qwen_image_edit_plus_layout(folder, variant="2511")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """The tiny pipeline loaded from `tiny_dir`, progress bars off; one per test module (tests may change its state)."""
    from diffusers_editr2.pipeline_editr2 import EditR2Pipeline

    pipe = EditR2Pipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe

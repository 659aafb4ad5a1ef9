"""Loads the Edit-R2 pack the way ComfyUI 0.3.64's `nodes.load_custom_node` does, against the stand-in comfy modules.

ComfyUI imports `<custom_nodes>/<pack>/__init__.py` under a module name made from its path, reads `WEB_DIRECTORY`,
and, when the module has no `NODE_CLASS_MAPPINGS`, awaits `comfy_entrypoint()`, checks it returned a ComfyExtension
and registers every node of `get_node_list()` under `GET_SCHEMA().node_id`.
"""

import asyncio
import importlib.util
import inspect
import json
import pathlib
import re
import subprocess
import sys

import pytest
from comfy_stubs.install import installed

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "example_workflows" / "editr2_three_turns.json"
NODE_IDS = {
    "EditR2LoadModel", "EditR2LoadSingleFiles", "EditR2LoadLoRA", "EditR2StartSession", "EditR2EditTurn",
    "EditR2SessionImages", "EditR2SessionFilmstrip",
    "EditR2SaveSession", "EditR2LoadSession",
}  # fmt: skip


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with installed(tmp_path_factory.mktemp("comfy")) as comfy:
        yield comfy


def load_custom_node(module_path: pathlib.Path) -> tuple[object, dict]:
    """The import and registration steps of ComfyUI's `load_custom_node` for a pack folder; returns (module, nodes)."""
    from comfy_api.latest import ComfyExtension

    sys_module_name = str(module_path).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(sys_module_name, module_path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_module_name] = module
    try:
        spec.loader.exec_module(module)
        assert getattr(module, "NODE_CLASS_MAPPINGS", None) is None, "a V1 mapping makes ComfyUI skip the entry point"
        entrypoint = module.comfy_entrypoint
        assert inspect.iscoroutinefunction(entrypoint)
        extension = asyncio.run(entrypoint())
        assert isinstance(extension, ComfyExtension)
        node_list = asyncio.run(extension.get_node_list())
        assert isinstance(node_list, list)
        return module, {node.GET_SCHEMA().node_id: node for node in node_list}
    finally:
        del sys.modules[sys_module_name]


@pytest.mark.parametrize("pack", [REPO, REPO / "comfyui_nodes"], ids=["cloned-repository", "package-folder"])
def test_pack_registers_every_node(comfy, pack):
    module, nodes = load_custom_node(pack)
    assert set(nodes) == NODE_IDS
    web = pack / module.WEB_DIRECTORY
    assert (web / "editr2.js").is_file()
    for node_id, node in nodes.items():
        schema = node.GET_SCHEMA()
        assert schema.category == "Edit-R2" and schema.display_name
        for section, inputs in node.INPUT_TYPES().items():
            assert section in ("required", "optional")
            for name, (io_type, options) in inputs.items():
                assert isinstance(io_type, str) and isinstance(options, dict), (node_id, name)
                json.dumps(options)  # /object_info must serialise it
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(isinstance(t, str) for t in node.RETURN_TYPES())
        for output in schema.outputs:
            assert output.tooltip, f"{node_id} output {output.display_name} has no tooltip"
        assert len(schema.description) > 40, f"{node_id} needs a description (its help text)"
        assert (web / "docs" / f"{node_id}.md").is_file(), f"{node_id} has no help page (web/docs/<node>.md)"
    output_nodes = {node_id for node_id, node in nodes.items() if node.GET_SCHEMA().is_output_node}
    # Edit Turn shows its intent and image, and ComfyUI re-sends a cached output node's display on a re-queue
    assert output_nodes == {"EditR2SaveSession", "EditR2EditTurn"}


def test_root_init_is_inert_outside_comfyui(tmp_path):
    """pytest imports the repository's `__init__.py` while collecting; without ComfyUI it must define nothing."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('repo_root', {str(REPO / '__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert not hasattr(module, 'comfy_entrypoint') and 'comfyui_nodes' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_example_workflow_matches_the_schemas(comfy):
    """The UI-format example converts to an API prompt whose links connect matching types."""
    workflow = json.loads(WORKFLOW.read_text())
    node_types = {node["type"] for node in workflow["nodes"]}
    assert {"EditR2LoadModel", "EditR2StartSession", "EditR2EditTurn", "EditR2SessionFilmstrip"} <= node_types
    assert sum(node["type"] == "EditR2EditTurn" for node in workflow["nodes"]) == 3
    ours = {node_id: node for node_id, node in load_custom_node(REPO)[1].items()}
    core = {  # the core nodes the example uses, as ComfyUI 0.3.64's /object_info describes their inputs
        "LoadImage": {"required": {"image": (["example.png"], {"image_upload": True})}},
        "ImageScale": {"required": {
            "image": ("IMAGE", {}),
            "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
            "width": ("INT", {"default": 512}), "height": ("INT", {"default": 512}),
            "crop": (["disabled", "center"], {}),
        }},
        "SaveImage": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
    }  # fmt: skip
    input_types = {**{k: v.INPUT_TYPES() for k, v in ours.items()}, **core}
    prompt = comfy.workflow_api.ui_to_api(workflow, input_types)
    outputs = {"LoadImage": ["IMAGE", "MASK"], "ImageScale": ["IMAGE"], "SaveImage": []}
    outputs |= {k: v.RETURN_TYPES() for k, v in ours.items()}
    for node_id, node in prompt.items():
        spec = {**input_types[node["class_type"]]["required"], **input_types[node["class_type"]].get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source = prompt[value[0]]["class_type"]
                assert outputs[source][value[1]] == spec[name][0], (node_id, name)
        missing = set(input_types[node["class_type"]]["required"]) - set(node["inputs"])
        assert not missing, (node_id, missing)
    turns = [node for node in prompt.values() if node["class_type"] == "EditR2EditTurn"]
    assert all(t["inputs"]["instruction"].strip() for t in turns)
    loader = next(node for node in prompt.values() if node["class_type"] == "EditR2LoadModel")
    assert loader["inputs"]["model_name"] == "editr2-shapes-tiny"  # the shipped default


def test_requirements_txt_matches_pyproject():
    """The custom_nodes install (requirements.txt) asks for the same packages as `pip install editr2[comfyui]`."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    expected = [d for d in project["dependencies"] if not d.startswith("torch")]
    for requirement in extras["comfyui"]:
        expected += extras[requirement[len("editr2[") : -1]] if requirement.startswith("editr2[") else [requirement]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert sorted(listed) == sorted(set(expected))
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=0.3")


def test_registry_metadata_is_complete():
    """What the Comfy Registry shows and installs: the license file, OS / GPU classifiers, every runtime dependency
    (the registry installs [project] dependencies), documentation and issue-tracker links."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "Apache License" in (REPO / "LICENSE").read_text() and project["license"]["text"] == "Apache-2.0"
    assert any(c.startswith("Operating System ::") for c in project["classifiers"])
    assert any(c.startswith("Environment :: GPU ::") for c in project["classifiers"])
    names = {re.split(r"[<>=!\[ ]", d)[0] for d in project["dependencies"]}
    assert {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers"} <= names
    assert {"Repository", "Documentation", "Bug Tracker"} <= set(project["urls"])

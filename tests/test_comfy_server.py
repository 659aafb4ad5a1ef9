"""Runs the Edit-R2 pack inside a real ComfyUI server (set EDITR2_COMFYUI_DIR to a ComfyUI checkout to enable).

The server is started from the checkout with `python main.py --cpu --listen 127.0.0.1`, its base directory in a temp
folder, and loads this repository as a pack from outside its tree (an `--extra-model-paths-config` file with a
`custom_nodes:` entry, like a clone in custom_nodes/). The tiny pipeline is saved as a model folder in the temp
models/editr2/. The interpreter running pytest must also have ComfyUI's requirements. If torchvision cannot be
imported, an import-only stand-in is put on the server's PYTHONPATH (see TORCHVISION_STANDIN).
"""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from comfy_files import write_single_files, write_trainer_lora
from comfy_stubs.workflow_api import ui_to_api
from PIL import Image

COMFY_DIR = os.environ.get("EDITR2_COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFY_DIR,
    reason="EDITR2_COMFYUI_DIR is not set: it must name a ComfyUI checkout (github.com/Comfy-Org/ComfyUI, not on PyPI)",
)

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "example_workflows" / "editr2_three_turns.json"
TINY_MODEL = "editr2-tiny-test"
TINY_CONFIG = "tiny-qwen-image-edit"
TINY_LORA = "tiny-lora"
NODE_IDS = {
    "EditR2LoadModel", "EditR2LoadSingleFiles", "EditR2LoadLoRA", "EditR2StartSession", "EditR2EditTurn",
    "EditR2SessionImages", "EditR2SessionFilmstrip",
    "EditR2SaveSession", "EditR2LoadSession",
}  # fmt: skip
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300

# A `sitecustomize` module (Python runs it at start-up) for the server when torchvision cannot be imported: it lets
# transformers and diffusers record that torchvision is absent (so they keep their PIL code paths), then installs an
# import-only torchvision for ComfyUI's start-up imports (only the upscale and audio extras then fail to load).
TORCHVISION_STANDIN = '''"""Import-only torchvision stand-in for a test ComfyUI server (tests/test_comfy_server.py)."""
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import diffusers.utils.import_utils  # noqa: F401  (records at import that torchvision is absent)
import transformers.utils.import_utils as transformers_imports

transformers_imports.is_torchvision_available()  # cached: False
transformers_imports.is_torchvision_v2_available()


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return importlib.import_module(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is an import-only stand-in for torchvision")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+standin"
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
'''


# ----------------------------------------------------------------------------------------------------------------------
# Server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120)
    return probe.returncode == 0


class Server:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.process = None

    def start(self, extra_paths: pathlib.Path, pythonpath: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in [env.get("PYTHONPATH")] if p])
        env["HF_HUB_OFFLINE"] = "1"
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.root / "base"), "--extra-model-paths-config", str(extra_paths),
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=COMFY_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # by its PID
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def get(self, path: str):
        return json.loads(self.get_bytes(path))

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def post(self, path: str, body) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict) -> dict:
        """POSTs an API-format prompt and polls /history until it finishes; returns its history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "editr2-tests"})
        assert status == 200, body
        prompt_id = body["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            if prompt_id in history and history[prompt_id]["status"].get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {RUN_TIMEOUT_S} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("comfy_server")
    packs = root / "packs"  # outside the ComfyUI tree, named in the extra paths file
    packs.mkdir()
    (packs / "editr2").symlink_to(REPO, target_is_directory=True)  # what a clone into custom_nodes/ looks like
    models = root / "models" / "editr2"
    shutil.copytree(tiny_dir, models / TINY_MODEL)
    for folder in ("custom_nodes", "input", "output", "user"):  # the --base-directory layout ComfyUI expects
        (root / "base" / folder).mkdir(parents=True)
    input_dir = root / "base" / "input"
    Image.new("RGB", (64, 64), (200, 180, 150)).save(input_dir / "example.png")
    # ComfyUI's split model files (tiny, in its key layout) with their config, and an Edit-R2 LoRA folder
    written = write_single_files(root / "models", variant="2511", config_name=TINY_CONFIG)
    shutil.copytree(tiny_dir, models / "tiny-for-lora")
    write_trainer_lora(models / "loras" / TINY_LORA)
    extra_paths = root / "extra_model_paths.yaml"
    extra_paths.write_text(
        f"editr2_tests:\n    custom_nodes: {packs}\n    editr2: {models}\n"
        f"    diffusion_models: {root / 'models' / 'diffusion_models'}\n"
        f"    text_encoders: {root / 'models' / 'text_encoders'}\n    vae: {root / 'models' / 'vae'}\n"
    )

    pythonpath = []
    if not _torchvision_imports():
        standin = root / "standin"
        standin.mkdir()
        (standin / "sitecustomize.py").write_text(TORCHVISION_STANDIN)
        pythonpath.append(str(standin))

    server = Server(root)
    server.single_files = written["names"]
    try:
        server.start(extra_paths, pythonpath)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def example_prompt(server):
    """The example workflow in API format, converted with the server's own /object_info."""
    workflow = json.loads(WORKFLOW.read_text())
    info = server.get("/object_info")
    return ui_to_api(workflow, {node["type"]: info[node["type"]]["input"] for node in workflow["nodes"]})


def _nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


# ----------------------------------------------------------------------------------------------------------------------
# Tests


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    assert NODE_IDS <= set(info), f"missing: {NODE_IDS - set(info)}\n{server.log_tail()}"
    for node_id in NODE_IDS:
        assert info[node_id]["category"] == "Edit-R2"
        assert info[node_id]["python_module"] == "custom_nodes.editr2"
    turn = info["EditR2EditTurn"]
    assert turn["output"] == ["EDITR2_SESSION", "IMAGE", "STRING"]
    assert TINY_MODEL in info["EditR2LoadModel"]["input"]["required"]["model_name"][1]["options"]


def test_example_workflow_and_web_extension_are_served(server):
    assert "editr2_three_turns" in server.get("/api/workflow_templates")["editr2"]
    served = server.get("/api/workflow_templates/editr2/editr2_three_turns.json")
    assert served == json.loads(WORKFLOW.read_text())
    assert "/extensions/editr2/editr2.js" in server.get("/extensions")
    # the template browser's thumbnail is <name>.jpg
    thumbnail = server.get_bytes("/api/workflow_templates/editr2/editr2_three_turns.jpg")
    assert thumbnail[:3] == b"\xff\xd8\xff"  # a JPEG
    # the template's input image was copied into the input directory when the pack loaded
    (image_loader,) = [n for n in served["nodes"] if n["type"] == "LoadImage"]
    assert (server.root / "base" / "input" / image_loader["widgets_values"][0]).is_file()


def test_example_workflow_runs(server, example_prompt):
    prompt = json.loads(json.dumps(example_prompt))
    (loader,) = _nodes_of(prompt, "EditR2LoadModel")
    prompt[loader]["inputs"]["model_name"] = TINY_MODEL
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + server.log_tail()

    turns = _nodes_of(prompt, "EditR2EditTurn")
    intents = [entry["outputs"][node_id]["text"][0] for node_id in turns]
    assert len(intents) == 3 and all(isinstance(t, str) and t.strip() for t in intents)
    assert all(len(entry["outputs"][node_id]["images"]) == 1 for node_id in turns)  # each turn's image preview

    # queued again unchanged: every node is cached, and each turn still shows its intent and image
    again = server.run(prompt)
    assert again["status"]["status_str"] == "success", json.dumps(again["status"])[-3000:]
    assert [again["outputs"][node_id]["text"][0] for node_id in turns] == intents
    assert all(again["outputs"][node_id]["images"] for node_id in turns)

    (saver,) = _nodes_of(prompt, "SaveImage")
    (saved,) = entry["outputs"][saver]["images"]
    path = server.root / "base" / "output" / saved["subfolder"] / saved["filename"]
    width = prompt[_nodes_of(prompt, "ImageScale")[0]]["inputs"]["width"]
    with Image.open(path) as strip:  # source + 3 turns side by side, text underneath
        assert strip.mode == "RGB" and strip.width >= 4 * width


def test_miswired_and_bad_graphs_are_rejected_with_node_errors(server, example_prompt):
    prompt = json.loads(json.dumps(example_prompt))
    first_turn = _nodes_of(prompt, "EditR2EditTurn")[0]
    (image_loader,) = _nodes_of(prompt, "LoadImage")
    prompt[first_turn]["inputs"]["session"] = [image_loader, 0]  # an IMAGE into the EDITR2_SESSION socket
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 400 and first_turn in body["node_errors"], body
    assert body["node_errors"][first_turn]["errors"][0]["type"] == "return_type_mismatch"

    bad_folder = {
        "1": {"class_type": "EditR2LoadSession", "inputs": {"folder": "no/such/session"}},
        "2": {"class_type": "EditR2SaveSession", "inputs": {"session": ["1", 0], "folder_prefix": "editr2/x"}},
    }
    status, body = server.post("/prompt", {"prompt": bad_folder})
    assert status == 400 and "1" in body["node_errors"], body
    (error,) = body["node_errors"]["1"]["errors"]
    assert error["type"] == "custom_validation_failed" and "cannot load 'no/such/session'" in error["details"]
    assert "Traceback" not in error["details"]


def test_empty_instruction_and_escaping_prefix_are_refused_at_queue_time(server, example_prompt):
    """Both are validation errors at queue time, not failures after the model load and turns."""
    prompt = json.loads(json.dumps(example_prompt))
    (loader,) = _nodes_of(prompt, "EditR2LoadModel")
    prompt[loader]["inputs"]["model_name"] = TINY_MODEL
    last_turn = _nodes_of(prompt, "EditR2EditTurn")[-1]
    prompt[last_turn]["inputs"]["instruction"] = "   "
    prompt["save_session"] = {"class_type": "EditR2SaveSession",
                              "inputs": {"session": [last_turn, 0], "folder_prefix": "."}}
    status, body = server.post("/prompt", {"prompt": prompt})
    # Edit Turns are output nodes, so the earlier (valid) turns may still be queued (200); the bad nodes never are
    assert status in (200, 400) and last_turn in body["node_errors"], body
    turn_errors = body["node_errors"][last_turn]["errors"]
    assert any("instruction is empty" in e["details"] for e in turn_errors), turn_errors
    save_errors = body["node_errors"]["save_session"]["errors"]
    assert any("relative path inside" in e["details"] for e in save_errors), save_errors
    assert not (server.root / "base" / "output_00001").exists()


def test_resized_input_is_noted_on_the_turn(server):
    Image.new("RGB", (37, 53), (90, 140, 200)).save(server.root / "base" / "input" / "odd_size.png")
    prompt = {
        "load_image": {"class_type": "LoadImage", "inputs": {"image": "odd_size.png"}},
        "model": {"class_type": "EditR2LoadModel", "inputs": {"model_name": TINY_MODEL, "dtype": "float32",
                                                              "device": "cpu"}},
        "start": {"class_type": "EditR2StartSession", "inputs": {"image": ["load_image", 0], "rules": ""}},
        "turn": {"class_type": "EditR2EditTurn", "inputs": {
            "session": ["start", 0], "model": ["model", 0], "instruction": "add a red circle", "reasoning": "none",
            "steps": 2, "cfg": 1.0, "seed": 0, "negative_prompt": ""}},
        "save": {"class_type": "EditR2SaveSession", "inputs": {"session": ["turn", 0], "folder_prefix": "editr2/odd"}},
    }  # fmt: skip
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + server.log_tail()
    shown = entry["outputs"]["turn"]["text"][0]
    assert "note: the image was resized from 37x53 to 32x48" in shown, shown
    assert "resized from 37x53 to 32x48" in server.log_tail()


def test_missing_default_model_is_a_validation_error(server, example_prompt):
    if (REPO / "checkpoints" / "editr2-shapes-tiny" / "model_index.json").is_file():
        pytest.skip("the shipped default model is present, so the unchanged example workflow is valid")
    status, body = server.post("/prompt", {"prompt": example_prompt})
    (loader,) = _nodes_of(example_prompt, "EditR2LoadModel")
    assert status == 400 and loader in body["node_errors"], body
    details = body["node_errors"][loader]["errors"][0]["details"]
    assert "editr2-shapes-tiny" in details and "not found" in details


def test_single_files_lora_and_low_vram_run(server):
    """ComfyUI's split files (a 2511 transformer file: its marker key switches zero_cond_t on) under model CPU
    offload, and a LoRA on a pipeline folder next to the same folder without it, in one prompt."""
    names = server.single_files
    info = server.get("/object_info")
    single = info["EditR2LoadSingleFiles"]["input"]["required"]
    assert names["diffusion_model"] in single["diffusion_model"][1]["options"]
    assert names["text_encoder"] in single["text_encoder"][1]["options"]
    assert names["vae"] in single["vae"][1]["options"]
    assert TINY_CONFIG in single["config"][1]["options"]
    assert TINY_LORA in info["EditR2LoadLoRA"]["input"]["required"]["lora_name"][1]["options"]

    prompt = {
        "image": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "scale": {"class_type": "ImageScale", "inputs": {"image": ["image", 0], "upscale_method": "bilinear",
                                                         "width": 32, "height": 32, "crop": "center"}},
        "start": {"class_type": "EditR2StartSession", "inputs": {"image": ["scale", 0], "rules": ""}},
        "files": {"class_type": "EditR2LoadSingleFiles", "inputs": {
            "diffusion_model": names["diffusion_model"], "text_encoder": names["text_encoder"], "vae": names["vae"],
            "config": TINY_CONFIG, "dtype": "float32", "device": "cpu", "memory": "model_cpu_offload"}},
        "turn_files": {"class_type": "EditR2EditTurn", "inputs": {
            "session": ["start", 0], "model": ["files", 0], "instruction": "add a red circle", "reasoning": "intent",
            "steps": 2, "cfg": 1.0, "seed": 0}},
        "folder": {"class_type": "EditR2LoadModel", "inputs": {"model_name": "tiny-for-lora", "dtype": "float32",
                                                               "device": "cpu"}},
        "lora": {"class_type": "EditR2LoadLoRA", "inputs": {"model": ["folder", 0], "lora_name": TINY_LORA,
                                                            "strength": 0.8, "reasoning_strength": 1.0}},
        "turn_lora": {"class_type": "EditR2EditTurn", "inputs": {
            "session": ["start", 0], "model": ["lora", 0], "instruction": "add a red circle", "reasoning": "intent",
            "steps": 2, "cfg": 1.0, "seed": 0}},
        "turn_base": {"class_type": "EditR2EditTurn", "inputs": {
            "session": ["start", 0], "model": ["folder", 0], "instruction": "add a red circle", "reasoning": "intent",
            "steps": 2, "cfg": 1.0, "seed": 0}},
    }  # fmt: skip
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + server.log_tail()
    for node_id in ("turn_files", "turn_lora", "turn_base"):
        assert entry["outputs"][node_id]["text"][0].strip() and entry["outputs"][node_id]["images"]
    previews = []
    for node_id in ("turn_lora", "turn_base"):
        (preview,) = entry["outputs"][node_id]["images"]
        with Image.open(server.root / "base" / preview["type"] / preview["subfolder"] / preview["filename"]) as im:
            previews.append(list(im.convert("RGB").getdata()))
    assert previews[0] != previews[1]  # the transformer LoRA changes the edit; the wire without it is unchanged


def test_single_file_errors_are_validation_errors(server):
    prompt = {
        "files": {"class_type": "EditR2LoadSingleFiles", "inputs": {
            "diffusion_model": "missing.safetensors", "text_encoder": server.single_files["text_encoder"],
            "vae": server.single_files["vae"], "config": "auto", "dtype": "float32", "device": "cpu"}},
        "image": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "start": {"class_type": "EditR2StartSession", "inputs": {"image": ["image", 0], "rules": ""}},
        "turn": {"class_type": "EditR2EditTurn", "inputs": {
            "session": ["start", 0], "model": ["files", 0], "instruction": "add a red circle", "reasoning": "none",
            "steps": 2, "cfg": 1.0, "seed": 0}},
    }  # fmt: skip
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 400 and "files" in body["node_errors"], body
    assert "missing.safetensors" in body["node_errors"]["files"]["errors"][0]["details"]

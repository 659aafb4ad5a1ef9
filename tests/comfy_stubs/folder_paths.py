"""Stand-in for ComfyUI's `folder_paths`, rooted at $EDITR2_STUB_COMFY_BASE (a temp dir the tests make)."""

import os
import tempfile

base_path = os.environ.get("EDITR2_STUB_COMFY_BASE") or tempfile.mkdtemp(prefix="comfy_stub_")
models_dir = os.path.join(base_path, "models")
output_directory = os.path.join(base_path, "output")
input_directory = os.path.join(base_path, "input")
temp_directory = os.path.join(base_path, "temp")

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {
    "checkpoints": ([os.path.join(models_dir, "checkpoints")], {".safetensors"}),
}


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        return
    if is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_output_directory():
    return output_directory


def get_input_directory():
    return input_directory


def get_temp_directory():
    return temp_directory


def get_directory_by_type(type_name):
    return {"output": output_directory, "input": input_directory, "temp": temp_directory}.get(type_name)


def annotated_filepath(name):
    for suffix, directory in ((" [output]", output_directory), (" [input]", input_directory),
                              (" [temp]", temp_directory)):
        if name.endswith(suffix):
            return name[: -len(suffix)], directory
    return name, None


def get_annotated_filepath(name, default_dir=None):
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = default_dir if default_dir is not None else input_directory
    return os.path.join(base_dir, name)

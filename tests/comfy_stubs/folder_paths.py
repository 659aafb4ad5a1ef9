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
    # as ComfyUI registers them (the legacy folder names included)
    "diffusion_models": ([os.path.join(models_dir, "unet"), os.path.join(models_dir, "diffusion_models")],
                         {".safetensors", ".sft", ".ckpt", ".pt"}),
    "text_encoders": ([os.path.join(models_dir, "text_encoders"), os.path.join(models_dir, "clip")],
                      {".safetensors", ".sft", ".ckpt", ".pt"}),
    "vae": ([os.path.join(models_dir, "vae")], {".safetensors", ".sft", ".ckpt", ".pt"}),
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


def get_filename_list(folder_name):
    """Files (relative posix paths, sorted) in the folder's paths with one of its extensions (every file for none)."""
    paths, extensions = folder_names_and_paths[folder_name]
    names = set()
    for base in paths:
        for root, _, files in os.walk(base, followlinks=True):
            for file in files:
                if not extensions or os.path.splitext(file)[1] in extensions:
                    names.add(os.path.relpath(os.path.join(root, file), base).replace(os.sep, "/"))
    return sorted(names)


def get_full_path(folder_name, filename):
    if folder_name not in folder_names_and_paths:
        return None
    for base in folder_names_and_paths[folder_name][0]:
        path = os.path.join(base, os.path.relpath(os.path.join(os.sep, filename), os.sep))
        if os.path.isfile(path):
            return path
    return None


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

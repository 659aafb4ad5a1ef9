"""Edit-R2 nodes for ComfyUI (V3 schema): chain editing turns visually and see each turn's operative intent.

ComfyUI loads this package (or the repository root, whose `__init__.py` imports it) and calls `comfy_entrypoint`.
Only the V3 entry point is defined: a pack that also defines `NODE_CLASS_MAPPINGS` has its entry point ignored.
This package imports ComfyUI's modules (`comfy_api`, `comfy`, `folder_paths`), so it only imports inside ComfyUI.
"""

from comfy_api.latest import ComfyExtension, io

from .model import install_example_input, register_model_folder
from .nodes import NODES

WEB_DIRECTORY = "./web"  # shows each Edit Turn's operative intent on the node after it runs

register_model_folder()
install_example_input()


class EditR2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> EditR2Extension:
    return EditR2Extension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]

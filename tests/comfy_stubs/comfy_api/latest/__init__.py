"""Stand-in for `comfy_api.latest`: `io`, `ui` and `ComfyExtension`, as far as the Edit-R2 nodes use them."""

from abc import ABC, abstractmethod

from . import _io as io
from . import _ui as ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when an extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """Returns the nodes this extension provides."""


__all__ = ["ComfyExtension", "io", "ui"]

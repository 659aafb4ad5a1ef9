"""Stand-in for `comfy_api.latest.ui` (`PreviewText`, and `PreviewImage` writing PNGs to the temp directory)."""

import os
import uuid

import numpy as np
from PIL import Image


class PreviewText:
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}


class PreviewImage:
    def __init__(self, image, animated: bool = False, cls=None, **kwargs):
        import folder_paths

        directory = folder_paths.get_temp_directory()
        os.makedirs(directory, exist_ok=True)
        self.values = []
        for frame in image:
            name = f"ComfyUI_temp_{uuid.uuid4().hex[:8]}.png"
            pixels = (frame.cpu().numpy().clip(0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(directory, name))
            self.values.append({"filename": name, "subfolder": "", "type": "temp"})
        self.animated = animated

    def as_dict(self):
        return {"images": self.values, "animated": (self.animated,)}

"""Stand-in for `comfy_api.latest.ui` (only `PreviewText`)."""


class PreviewText:
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}

"""Stand-in for `comfy.model_patcher.ModelPatcher`: holds a module and its load / offload devices."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        if getattr(model, "device", None) is None:
            model.device = offload_device

    def model_size(self):
        if self.size == 0:
            self.size = sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())
        return self.size

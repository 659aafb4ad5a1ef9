"""Stand-in for `comfy_api.latest.io`: V3 node classes, schemas and the few wire types the nodes use.

It keeps the real module's constructor keywords, its `Schema.validate` rules (unique input / output ids) and its V1
view (`INPUT_TYPES`, `RETURN_TYPES`) so schema mistakes fail here as they would in ComfyUI.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Any


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class Input:
    io_type: str = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict or {}

    def as_dict(self):
        return _prune({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                       "lazy": self.lazy}) | _prune(self.extra_dict)

    def get_io_type(self):
        return self.io_type


class WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, socketless=None,
                 widget_type=None, force_input=None, extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self):
        return super().as_dict() | _prune({"default": self.default, "socketless": self.socketless,
                                           "forceInput": self.force_input})


class Output:
    io_type: str = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


def _comfy_type(io_type: str, input_cls=Input):
    """A wire type with nested `Input` / `Output` classes bound to `io_type`, like `@comfytype` builds."""
    return type(io_type, (), {
        "io_type": io_type,
        "Input": type("Input", (input_cls,), {"io_type": io_type}),
        "Output": type("Output", (Output,), {"io_type": io_type}),
    })


def Custom(io_type: str):  # noqa: N802 (the real API's name)
    return _comfy_type(io_type)


class _IntInput(WidgetInput):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                 max=None, step=None, control_after_generate=None, display_mode=None, socketless=None,
                 force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.min, self.max, self.step = min, max, step
        self.control_after_generate = control_after_generate

    def as_dict(self):
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step,
                                           "control_after_generate": self.control_after_generate})


class _FloatInput(WidgetInput):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                 max=None, step=None, round=None, display_mode=None, socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.min, self.max, self.step, self.round = min, max, step, round

    def as_dict(self):
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step, "round": self.round})


class _StringInput(WidgetInput):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                 placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.multiline = multiline
        self.placeholder = placeholder

    def as_dict(self):
        return super().as_dict() | _prune({"multiline": self.multiline, "placeholder": self.placeholder})


class _BooleanInput(WidgetInput):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, label_on=None,
                 label_off=None, socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)


class _ComboInput(WidgetInput):
    def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 control_after_generate=None, upload=None, image_folder=None, remote=None, socketless=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
        self.options = options

    def get_io_type(self):
        return "COMBO"

    def as_dict(self):
        return super().as_dict() | _prune({"options": self.options})


Boolean = _comfy_type("BOOLEAN", _BooleanInput)
Int = _comfy_type("INT", _IntInput)
Float = _comfy_type("FLOAT", _FloatInput)
String = _comfy_type("STRING", _StringInput)
Combo = _comfy_type("COMBO", _ComboInput)
Image = _comfy_type("IMAGE")
Mask = _comfy_type("MASK")


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        input_ids = [i.id for i in self.inputs or []]
        output_ids = [o.id for o in self.outputs or []]
        issues = []
        for kind, ids in (("Input", input_ids), ("Output", output_ids)):
            repeated = [k for k, n in Counter(ids).items() if n > 1]
            if repeated:
                issues.append(f"{kind} ids must be unique, but {repeated} are not.")
        shared = set(input_ids) & set(output_ids)
        if shared:
            issues.append(f"Ids must be unique between inputs and outputs, but {shared} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self):
        for i, output in enumerate(self.outputs or []):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"


class ComfyNode:
    """Base class of V3 nodes: classmethods only, no instance state."""

    SCHEMA = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> "NodeOutput":
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> Any:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 (the real API's name)
        if cls.define_schema.__func__ is ComfyNode.define_schema.__func__:
            raise Exception(f"No define_schema function was defined for node class {cls.__name__}.")
        if cls.execute.__func__ is ComfyNode.execute.__func__:
            raise Exception(f"No execute function was defined for node class {cls.__name__}.")
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802
        schema = cls.GET_SCHEMA()
        types: dict = {"required": {}}
        for i in schema.inputs or []:
            as_dict = i.as_dict()
            as_dict.pop("optional", None)
            types.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), as_dict)
        return types

    @classmethod
    def RETURN_TYPES(cls) -> list:  # noqa: N802 (a classproperty in the real API)
        return [o.io_type for o in cls.GET_SCHEMA().outputs or []]


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index):
        return self.args[index]

"""Converts a ComfyUI workflow saved by the frontend (UI format) into the API format that POST /prompt takes.

The frontend stores widget values positionally (`widgets_values`), in the order of the node's inputs as
/object_info lists them; an INT or COMBO with `control_after_generate` (or named seed / noise_seed) stores one
extra value, and an image-upload COMBO one more for its upload button. Tests use this to check that the example
workflow matches the node schemas, and to run it on a real server.
"""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _extra_values(name: str, io_type, options: dict) -> int:
    has_control = options.get("control_after_generate") or (io_type == "INT" and name in ("seed", "noise_seed"))
    return int(bool(has_control)) + int(bool(options.get("image_upload")))


def ui_to_api(workflow: dict, input_types: dict[str, dict]) -> dict:
    """Args:
        workflow: the UI-format workflow (`nodes`, `links`, ...).
        input_types: node type -> its inputs as /object_info gives them (`{"required": {...}, "optional": {...}}`).
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        spec = input_types[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name, (io_type, *rest) in spec.get(section, {}).items():
                options = rest[0] if rest else {}
                is_widget = (isinstance(io_type, list) or io_type in WIDGET_TYPES) and not options.get("forceInput")
                if is_widget:
                    if not values:
                        raise ValueError(f"node {node['id']} ({node['type']}): no widget value left for {name!r}")
                    value = values.pop(0)
                    del values[: _extra_values(name, io_type, options)]
                    inputs[name] = value
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget value(s) left over: {values}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt

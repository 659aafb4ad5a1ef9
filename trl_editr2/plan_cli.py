r"""Plan an Edit-R2 RL run: parameters, per-GPU memory and step time, from the configs alone (no weights, no GPU).

    editr2 plan --config examples/configs/qwen_image_edit_2509_lora.yaml \
        --accelerate-config examples/accelerate_configs/fsdp.yaml
    editr2 plan --config ... --accelerate-config ... --gpu-memory 141 --set resolution=1024 --set reference_area=1048576
    editr2 plan --config ... --num-processes 1 --frozen-dtype fp8 --offload-text-encoder --json plan.json

The real architectures are built on the meta device from `trl_editr2/plan_models.json` (the released configs), with
the trainer's LoRA adapters; see `trl_editr2/plan.py` for what is counted and docs/trainer.md ("Planning a run").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

# Keys of the training YAML that are not EditR2Config fields (the script's own arguments).
SCRIPT_KEYS = ("env", "model_name_or_path", "reward_funcs", "dataset_name", "dataset_config", "image_root",
               "dataset_train_split", "dataset_test_split", "config")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (EditR2Config fields)")
    parser.add_argument("--accelerate-config", default=None, help="accelerate config YAML (default: one process)")
    parser.add_argument("--num-processes", type=int, default=None, help="override the accelerate config's processes")
    parser.add_argument("--model", default=None,
                        help="architecture in trl_editr2/plan_models.json (default: from model_name_or_path)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a training field (YAML value), e.g. --set resolution=768; repeatable")
    parser.add_argument("--gpu-memory", type=float, default=79.6,
                        help="GiB per GPU (H100 80GB: 79.6, H200 141GB: 140.4)")
    parser.add_argument("--reserve-gib", type=float, default=3.0,
                        help="GiB per GPU for the CUDA context, fragmentation and NCCL buffers")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved dense bf16 TFLOP/s per GPU")
    parser.add_argument("--hbm-gbps", type=float, default=2500.0, help="achieved GPU memory bandwidth, GB/s")
    parser.add_argument("--interconnect-gbps", type=float, default=300.0, help="per-GPU all-gather bandwidth, GB/s")
    parser.add_argument("--pcie-gbps", type=float, default=25.0, help="host <-> GPU bandwidth (offload), GB/s")
    parser.add_argument("--frozen-dtype", choices=("bf16", "fp8"), default="bf16",
                        help="storage of the frozen base weights (fp8 is a what-if: the trainer stores bf16)")
    parser.add_argument("--offload-text-encoder", action="store_true",
                        help="what-if: the frozen text encoder waits in CPU memory while the transformer samples")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="reasoning request length without its image (default: estimated from the template)")
    parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")


def training_args(config_path: str, overrides: list[str], use_cpu: bool = True):
    """`(EditR2Config, model_name_or_path)` from a training YAML plus `FIELD=VALUE` overrides (YAML values).

    The plan needs no device: `use_cpu=True` (the default) lets a `bf16: true` config load on any machine."""
    import yaml

    from .config import EditR2Config

    if not os.path.isfile(config_path):
        raise ValueError(f"--config {config_path!r} does not exist; pass a training YAML such as "
                         "examples/configs/qwen_image_edit_2509_lora.yaml.")
    values = yaml.safe_load(open(config_path)) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(value)
    model = values.get("model_name_or_path")
    fields = set(EditR2Config.__dataclass_fields__)
    unknown = sorted(k for k in values if k not in fields and k not in SCRIPT_KEYS)
    if unknown:
        raise ValueError(f"unknown training fields {unknown}; see trl_editr2/config.py for EditR2Config's fields.")
    kwargs = {k: v for k, v in values.items() if k in fields}
    kwargs.update(report_to="none", use_cpu=use_cpu, save_strategy="no")
    kwargs.setdefault("output_dir", tempfile.gettempdir())
    return EditR2Config(**kwargs), model


def model_from_name(name: str | None) -> str:
    """`Qwen/Qwen-Image-Edit-2511` (or a local folder of that name) -> `qwen_image_edit_2511`; default 2509."""
    from .plan import model_names

    if not name:
        return "qwen_image_edit_2509"
    key = os.path.basename(str(name).rstrip("/")).lower().replace("-", "_").replace(".", "_")
    for candidate in model_names():
        if candidate in key:
            return candidate
    raise ValueError(f"no planned architecture for {name!r}; pass --model with one of {model_names()}.")


def run(args: argparse.Namespace) -> int:
    from .plan import Hardware, Layout, Options, format_plan, layout_from_accelerate_config, plan, plan_to_dict

    train_args, model_name = training_args(args.config, args.set)
    model = args.model or model_from_name(model_name)
    if args.accelerate_config:
        layout = layout_from_accelerate_config(args.accelerate_config, args.num_processes)
    else:
        n = args.num_processes or 1
        layout = Layout(n, name=f"{n} x DDP" if n > 1 else "1 process")
    hardware = Hardware(args.gpu_memory, args.tflops, args.hbm_gbps, args.interconnect_gbps, args.pcie_gbps,
                        args.reserve_gib)
    options = Options(args.frozen_dtype, args.offload_text_encoder, args.prompt_tokens)
    result = plan(train_args, layout, hardware, options, model=model)
    print(format_plan(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan_to_dict(result), f, indent=2, default=str)
    return 0

"""The planner's table of the shipped GPU setups (docs/trainer.md, "Planning a run"), from the configs alone.

    python benchmarks/plan_setups.py                         # print the Markdown
    python benchmarks/plan_setups.py --write docs/trainer.md # replace the block between the plan markers

Each row is `editr2 plan --config <training config> --accelerate-config <accelerate config> --gpu-memory <GiB>`
(+ the what-if flags shown), with the planner's defaults for throughput: 400 TFLOP/s achieved bf16, 2500 GB/s HBM,
300 GB/s all-gather between GPUs, 25 GB/s PCIe, 3 GiB reserved per GPU.
"""

from __future__ import annotations

import argparse
import re
import time

BEGIN, END = "<!-- plan-setups:begin -->", "<!-- plan-setups:end -->"
MAIN = "examples/configs/qwen_image_edit_2509_lora.yaml"
SETUPS = [
    # (name, training config, accelerate config, GiB per GPU, what-if flags, shipped?)
    ("1 x H100 80GB, FSDP + CPU offload", "examples/configs/qwen_image_edit_2509_lora_1x80gb.yaml",
     "examples/accelerate_configs/fsdp_offload_1gpu.yaml", 79.6, {}, True),
    ("1 x H100 80GB, no offload", MAIN, None, 79.6, {}, False),
    ("1 x H100 80GB, fp8 frozen + text encoder offload (what-if)", MAIN, None, 79.6,
     {"frozen_dtype": "fp8", "offload_text_encoder": True}, False),
    ("8 x H100 80GB, FSDP", MAIN, "examples/accelerate_configs/fsdp.yaml", 79.6, {}, True),
    ("8 x H100 80GB, DeepSpeed ZeRO-3", MAIN, "examples/accelerate_configs/deepspeed_zero3.yaml", 79.6, {}, True),
    ("8 x H200 141GB, FSDP, 1024 px", "examples/configs/qwen_image_edit_2509_lora_8x141gb_1024.yaml",
     "examples/accelerate_configs/fsdp.yaml", 140.4, {}, True),
]


def command(train: str, accel: str | None, gib: float, flags: dict) -> str:
    parts = ["editr2 plan", f"--config {train}"]
    if accel:
        parts.append(f"--accelerate-config {accel}")
    parts.append(f"--gpu-memory {gib:g}")
    if flags.get("frozen_dtype", "bf16") != "bf16":
        parts.append(f"--frozen-dtype {flags['frozen_dtype']}")
    if flags.get("offload_text_encoder"):
        parts.append("--offload-text-encoder")
    return " ".join(parts)


def table() -> str:
    from trl_editr2.plan import GIB, Hardware, Layout, Options, layout_from_accelerate_config, plan, parameter_table
    from trl_editr2.plan_cli import model_from_name, training_args

    rows, commands, params = [], [], None
    for name, train, accel, gib, flags, shipped in SETUPS:
        args, model = training_args(train, [])
        layout = layout_from_accelerate_config(accel) if accel else Layout(1)
        p = plan(args, layout, Hardware(memory_gib=gib), Options(**flags), model=model_from_name(model))
        params = params or p.parameters
        m = p.memory
        g = lambda v: f"{v / GIB:.1f}"  # noqa: E731
        weights = m["weights_transformer"] + m["weights_text_encoder"] + m["weights_vae"]
        lora = m["lora_weights"] + m["lora_grads"] + m["optimizer"]
        acts = f"{g(m['activations_image_ckpt'] + m['activations_text_ckpt'])} / " \
               f"{g(m['activations_image_no_ckpt'] + m['activations_text_no_ckpt'])}"
        verdict = ("**yes**" if p.fits else "no") + (" (shipped)" if shipped and p.fits else "")
        rows.append(f"| {name} | {args.resolution} | {args.per_device_train_batch_size} x "
                    f"{args.gradient_accumulation_steps} | {g(weights)} | {g(lora)} | {acts} | "
                    f"{g(m['rollout_records'] + m['kv_cache'])} | {g(p.phases['reasoning'])} / "
                    f"{g(p.phases['sampling'])} / {g(p.phases['learning'])} | "
                    f"{g(p.peak + p.hardware.reserve_gib * GIB)} of {gib:g} | {verdict} | {p.time['step']:.0f} s "
                    f"({p.time['sampling']:.0f} / {p.time['learn']:.0f} / {p.time['reasoning']:.0f}) |")
        commands.append(f"    {command(train, accel, gib, flags)}")
    out = ["Parameters (Qwen-Image-Edit-2509, built on the meta device; LoRA r = 64 on the transformer's attention + "
           "MLP and on the text encoder's language model):", "",
           "| component | parameters (with LoRA) | trainable LoRA |", "|---|---:|---:|"]
    out += [f"| {k} | {v['total'] / 1e9:.3f} B | {v['trainable'] / 1e6:.1f} M |" for k, v in params.items()]
    out += ["", "Per GPU, GiB (G = 6 rollouts x 3 turns, 15 steps with a 2-step SDE window, CFG 4, 150 reasoning "
            "tokens, activation checkpointing on):", "",
            "| setup | px | sessions x accum. | weights | LoRA + grads + AdamW | activations ckpt / none | records + "
            "KV cache | peak reasoning / sampling / learning | peak + 3 GiB reserve | fits | step (sampling / learning "
            "/ reasoning) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    out += rows
    out += ["", "Commands, in the order of the rows:", ""] + commands
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None, help="a Markdown file with the plan markers to update in place")
    args = parser.parse_args()
    start = time.perf_counter()
    text = table()
    if args.write:
        with open(args.write) as f:
            doc = f.read()
        if BEGIN not in doc or END not in doc:
            raise ValueError(f"{args.write} has no {BEGIN} ... {END} block to replace.")
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        doc = pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc)
        with open(args.write, "w") as f:
            f.write(doc)
    print(text)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

# /// script
# dependencies = [
#     "editr2[trl]",
# ]
# ///
"""Edit-R2 RL post-training (joint reasoning + flow-matching GRPO with trajectory filtering), TRL-style.

Usage:

    # MICE-Shapes on the tiny random pipeline (CPU, minutes)
    python trl_editr2/scripts/editr2.py --config examples/configs/shapes_tiny.yaml

    # any TrainingArguments flag overrides the file
    python trl_editr2/scripts/editr2.py --config examples/configs/shapes_tiny.yaml --max_steps 2 --output_dir out

    # Qwen-Image-Edit-2509 + LoRA on GPUs
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml trl_editr2/scripts/editr2.py \
        --config examples/configs/qwen_image_edit_2509_lora.yaml

The log history is written to `output_dir/trainer_state.json` (as `transformers.Trainer` does) and the adapters to
`output_dir` (see docs/trainer.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

# Run as a script, this file's directory is sys.path[0], and this file is named editr2.py: drop the entry so that
# `import editr2` finds the package, not this script.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from trl import ScriptArguments  # noqa: E402


@dataclass
class EditR2ScriptArguments(ScriptArguments):
    """
    Script arguments for the Edit-R2 training script.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"tiny"`):
            An `EditR2Pipeline` folder or Hub id (e.g. `Qwen/Qwen-Image-Edit-2509`), or `"tiny"` for the tiny random
            pipeline of `diffusers_editr2.testing` (seeded by `model_seed`).
        model_seed (`int`, *optional*, defaults to `0`):
            Seed of the tiny pipeline's weights.
        reward_funcs (`list[str]`, *optional*, defaults to `["shapes_oracle"]`):
            Reward functions: `shapes_oracle` (MICE-Shapes IF + CC + GA), `shapes_if`, `shapes_cc`, `shapes_ga`, or
            dotted import paths (e.g. `my_lib.rewards.my_reward`).
        dataset_name (`str`, *optional*, defaults to `"mice-shapes"`):
            `"mice-shapes"` (sessions generated on the fly) or a MICE-format JSONL file.
        image_root (`str`, *optional*):
            Directory of the JSONL's source images (defaults to the file's directory).
        dataset_limit (`int`, *optional*):
            Use the first N sessions of the JSONL file.
        shapes_family (`str`, *optional*, defaults to `"cm"`):
            MICE-Shapes family: `"cm"`, `"cu"` or `"mixed"`.
        shapes_num_sessions (`int`, *optional*, defaults to `256`):
            Number of MICE-Shapes training sessions.
        shapes_seed (`int`, *optional*, defaults to `0`):
            Seed of the first MICE-Shapes session (keep evaluation seeds apart).
        shapes_size (`int`, *optional*, defaults to `64`):
            MICE-Shapes image size in pixels.
    """

    model_name_or_path: str = field(default="tiny", metadata={"help": "Pipeline folder / Hub id, or 'tiny'."})
    model_seed: int = field(default=0, metadata={"help": "Seed of the tiny pipeline's weights."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["shapes_oracle"],
        metadata={"help": "Reward functions: shapes_oracle, shapes_if, shapes_cc, shapes_ga, or dotted paths."},
    )
    dataset_name: str | None = field(
        default="mice-shapes", metadata={"help": "'mice-shapes' or a MICE-format JSONL file."}
    )
    image_root: str | None = field(default=None, metadata={"help": "Directory of the JSONL's source images."})
    dataset_limit: int | None = field(default=None, metadata={"help": "Use the first N sessions of the JSONL."})
    shapes_family: str = field(default="cm", metadata={"help": "MICE-Shapes family: cm, cu or mixed."})
    shapes_num_sessions: int = field(default=256, metadata={"help": "Number of MICE-Shapes training sessions."})
    shapes_seed: int = field(default=0, metadata={"help": "Seed of the first MICE-Shapes session."})
    shapes_size: int = field(default=64, metadata={"help": "MICE-Shapes image size in pixels."})


def load_model(script_args: EditR2ScriptArguments):
    """The pipeline to train: the tiny random one, or a path / Hub id (loaded by the trainer)."""
    if script_args.model_name_or_path != "tiny":
        return script_args.model_name_or_path
    from diffusers_editr2.testing import tiny_pipeline

    return tiny_pipeline(seed=script_args.model_seed)


def load_dataset(script_args: EditR2ScriptArguments, num_turns: int):
    """The training sessions."""
    from trl_editr2.data import MiceSessionDataset, ShapesSessionDataset

    if script_args.dataset_name in (None, "mice-shapes"):
        return ShapesSessionDataset(
            script_args.shapes_num_sessions, script_args.shapes_family, num_turns, script_args.shapes_seed,
            script_args.shapes_size,
        )
    return MiceSessionDataset(
        script_args.dataset_name, script_args.image_root, limit=script_args.dataset_limit, min_turns=num_turns
    )


def main(script_args: EditR2ScriptArguments, training_args):
    """Train, save the adapters and the trainer state, and return the trainer."""
    import transformers
    from packaging.version import Version

    from trl_editr2 import EditR2Trainer

    # Model, data and rewards
    model = load_model(script_args)
    dataset = load_dataset(script_args, training_args.num_turns)
    trainer = EditR2Trainer(
        model=model, reward_funcs=script_args.reward_funcs, args=training_args, train_dataset=dataset
    )

    # Train
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    # Save the adapters (pipeline formats) next to trainer_state.json
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.print(f"Adapters saved to {training_args.output_dir}.")
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return trainer


def exit_without_teardown() -> None:
    """End a multi-process run once everything is saved, skipping the interpreter's teardown.

    Freeing the DDP-wrapped model destroys torch's gloo process group under the GIL while one of its worker threads
    may still have to release a finished all-gather's tensors, which needs the GIL: the process then hangs forever
    (about one run in six on CPU with torch 2.13). The trainer is kept alive until here, so the process exits before
    anything is freed; the outputs and trackers are already closed by `main`.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import TrlParser

    from trl_editr2.config import EditR2Config

    dataclass_types = (EditR2ScriptArguments, EditR2Config)
    if subparsers is not None:
        return subparsers.add_parser("editr2", help="Run Edit-R2 RL training", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args = parser.parse_args_and_config()
    trainer = main(script_args, training_args)
    if training_args.world_size > 1:
        exit_without_teardown()

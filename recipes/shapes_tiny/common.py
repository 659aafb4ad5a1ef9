"""Shared pieces of the default-model recipe: configs, the training loop's run (accelerate), seeding, logs, data.

Every stage (`train_vae`, `train_reasoner`, `train_editor`) is a loop of the same shape:

    cfg, run_args = parse_args(StageConfig, argv)              # YAML --config + `--field value` overrides (TrlParser)
    run = Run(cfg, run_args.run_dir, "stage")                  # accelerate Accelerator: device, mixed precision
    model, optimizer = run.prepare(model, optimizer)           # resumes the newest checkpoint (`load_state`), if any
    for step, batch in run.steps(lambda step: make_batch(cfg, step)):   # data depends on (seed, step) only
        ...
        if run.end_step(step + 1, row, evaluate, eval_due):    # log, evaluate, `save_state`, stop / time cap
            break

Data and noise are drawn on the CPU from generators seeded by `(seed, step)` (and moved to the device), so a resumed
run continues exactly as an uninterrupted one would, and a CUDA run sees the same data and noise as a CPU run.
Checkpoints are `accelerator.save_state` folders (`RUN_DIR/checkpoints/step_XXXXXXX/`: `model.safetensors`, the
optimizer and RNG states) plus `trainer_state.json` (step, training time). The defaults (`device="cpu"`,
`mixed_precision="no"`, `data_workers=0`) run exactly the code path the CPU recipe was measured with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CHECKPOINT_PREFIX = "step_"
MIXED_PRECISION = ("no", "bf16")

# ---------------------------------------------------------------------------------------------------------------------
# Configs: dataclasses parsed by TRL's `TrlParser` (a YAML `--config` plus `--field value` overrides)
# ---------------------------------------------------------------------------------------------------------------------


class Seq(tuple):
    """A tuple-valued config field: a YAML list in the config file, or YAML text on the command line
    (`--dim_mult "[1, 2, 2]"`, `--curriculum "[[0.5, 1]]"`); nested lists stay as YAML gives them."""

    def __new__(cls, value=()):
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        if isinstance(value, (int, float, bool, dict)) or value is None:
            raise ValueError(f"{value!r} is not a list: pass e.g. '[1, 2]'.")
        return super().__new__(cls, value)


@dataclasses.dataclass
class TrainConfig:
    """The optimisation and run settings every stage shares (`VAEConfig`, `ReasonerConfig` and `EditorConfig`
    subclass it and set their own defaults; the YAML keys and command-line flags are the field names).

    Args:
        seed: seeds the model init, the data and the noise.
        batch_size: examples per optimiser step.
        lr: peak learning rate (AdamW).
        warmup: linear warm-up steps, then cosine decay to 10% of `lr` at `max_steps` (`lr_at`).
        max_steps: length of the run; it also sets the learning-rate schedule and the curricula (given as fractions
            of it), so train longer in a new run folder rather than by raising it on a resumed one.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clipping.
        eval_every: evaluate every this many steps.
        save_every: checkpoint every this many steps (also at the end, at `--stop_after` and at `max_minutes`).
        keep: checkpoints kept (the newest).
        threads: torch CPU threads of the training process (1 leaves a core to other work on a small machine).
        device: "cpu", "cuda" or "auto" (CUDA when available, else CPU): the `Accelerator`'s device. Checkpoints
            resume on any device.
        mixed_precision: "no" (fp32) or "bf16": the training forward passes run under `accelerator.autocast()` in
            bfloat16 (weights and optimiser states stay fp32). CUDA only: ignored on the CPU. Evaluations run in fp32.
        max_minutes: wall-clock cap of this invocation in minutes, counted from its start (0 = none). When reached,
            the run checkpoints after the current step and finishes as at `max_steps` (final evaluation, export);
            running the same command again resumes from that checkpoint.
        data_workers: processes that generate batches ahead (0 = in the training process, as measured on the CPU).
            Batches depend on `(seed, step)` only, so the result does not depend on this number.
    """

    seed: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 500
    save_every: int = 100
    keep: int = 2
    threads: int = 1
    device: str = "cpu"
    mixed_precision: str = "no"
    max_minutes: float = 0.0
    data_workers: int = 0

    FROZEN_FIELDS = ("seed",)

    def __post_init__(self):
        """Type the values a YAML file gave as they are (lists, numbers, booleans) and refuse the wrong kinds."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type if isinstance(f.type, type) else type(f.default)
            if kind is Seq or isinstance(f.default, tuple):
                setattr(self, f.name, Seq(value))
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif kind in (bool, int, float, str) and (type(value) is not kind):
                hint = "quote it (YAML reads no/yes/on/off as booleans)" if kind is str else f"pass a {kind.__name__}"
                raise ValueError(f"{f.name}: {value!r} is not a {kind.__name__}: {hint}, e.g. --{f.name} {f.default}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: pass one of {MIXED_PRECISION}.")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes={self.max_minutes}: pass 0 (no cap) or a positive number of minutes.")
        if self.data_workers < 0:
            raise ValueError(f"data_workers={self.data_workers}: pass 0 (in process) or a number of processes.")


@dataclasses.dataclass
class RunArguments:
    """The command line of a stage besides its config.

    Args:
        run_dir: where checkpoints, logs and plots go; a run folder that holds checkpoints is resumed.
        stop_after: checkpoint and exit after this step (resume later with the same command).
        no_progress: hide the progress bar.
        export_only: only export (and evaluate) the last checkpoint (VAE and reasoner stages).
    """

    run_dir: str = dataclasses.field(metadata={"help": "run folder (resumed if it holds checkpoints)"})
    stop_after: int | None = dataclasses.field(default=None, metadata={"help": "checkpoint and exit after this step"})
    no_progress: bool = dataclasses.field(default=False, metadata={"help": "hide the progress bar"})
    export_only: bool = dataclasses.field(default=False, metadata={"help": "only export the last checkpoint"})


def parse_args(config_cls, default_config: str, argv: list[str] | None = None):
    """`(config, RunArguments)` from the command line, as `trl_editr2/scripts/editr2.py` parses: `TrlParser` reads
    `--config FILE` (default `configs/<default_config>`) and then `--field value` overrides."""
    import sys

    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(HERE / "configs" / default_config), *argv]
    return TrlParser([config_cls, RunArguments]).parse_args_and_config(argv)


def config_to_dict(cfg) -> dict:
    return {f.name: list(getattr(cfg, f.name)) if isinstance(getattr(cfg, f.name), tuple) else getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)}


def prepare_run_dir(run_dir: str | os.PathLike, cfg) -> Path:
    """Create the run directory; refuse to resume a run whose config differs in a field that changes the model."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    current = json.loads(json.dumps(config_to_dict(cfg)))  # tuples as JSON lists, as saved
    if path.exists():
        saved = json.loads(path.read_text())
        defaults = json.loads(json.dumps(config_to_dict(type(cfg)())))
        changed = [k for k in cfg.FROZEN_FIELDS if saved.get(k, defaults.get(k)) != current.get(k)]
        if changed:
            raise ValueError(f"{run_dir} was trained with other values of {changed}: use a new --run_dir, or "
                             f"the saved values {({k: saved.get(k) for k in changed})}.")
    path.write_text(json.dumps(current, indent=2) + "\n")
    return run_dir


# ---------------------------------------------------------------------------------------------------------------------
# The run: device and mixed precision (accelerate), checkpoints, the time cap and the loop's tail
# ---------------------------------------------------------------------------------------------------------------------


def make_accelerator(cfg: TrainConfig):
    """The `Accelerator` of a config's `device` and `mixed_precision` (bf16 only on CUDA: the CPU path stays fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if cfg.device not in ("cpu", "auto") and not cfg.device.startswith("cuda"):
        raise ValueError(f"device={cfg.device!r}: pass 'cpu', 'cuda' or 'auto'.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r}, but CUDA is not available here (torch {torch.__version__}, CUDA "
                         f"build: {torch.version.cuda}): pass device=cpu, or device=auto to use CUDA only where there "
                         "is one.")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device={cfg.device!r}: pass 'cuda' and pick the GPU with CUDA_VISIBLE_DEVICES.")
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cpu and cfg.mixed_precision != "no":
        print(f"mixed_precision={cfg.mixed_precision!r} is ignored on the CPU (autocast runs on CUDA only)")
    AcceleratorState._reset_state(reset_partial_state=True)  # one run after another in a process may change device
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else cfg.mixed_precision)
    torch.set_num_threads(cfg.threads)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").exists())
    return found[-1] if found else None


def load_weights(module: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a checkpoint folder's `model.safetensors` into `module` (strict, except for tied tensors saved once)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    missing, unexpected = module.load_state_dict(state, strict=False)
    params = module.state_dict()
    tied = {n for n in missing if any(params[o].data_ptr() == params[n].data_ptr() for o in state if o in params)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{checkpoint} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}.")


class Run:
    """One stage's run folder and loop tail: the `Accelerator`, resume (`load_state`), the steps with their progress
    bar, and after each step the log row, the evaluation, the checkpoint (`save_state`) and the stop decision.

    Args:
        cfg: the stage config (checked, and the run folder refused for another architecture, before anything runs).
        run_dir: the run folder.
        name: the progress bar's label.
        show_progress: show the tqdm bar.
        stop_after: checkpoint and stop after this step, as an interruption would (`interrupted` is then True).
    """

    def __init__(self, cfg: TrainConfig, run_dir, name: str, show_progress: bool = True,
                 stop_after: int | None = None):
        self.deadline = time.monotonic() + 60.0 * cfg.max_minutes if cfg.max_minutes > 0 else None
        self.accelerator = make_accelerator(cfg)
        self.cfg, self.name, self.show_progress, self.stop_after = cfg, name, show_progress, stop_after
        self.run_dir = prepare_run_dir(run_dir, cfg)
        self.log = RunLog(self.run_dir)
        self.start, self.train_seconds, self.interrupted, self.state = 0, 0.0, False, {}
        self.save_hooks: list[Callable[[Path], None]] = []  # write more state into a checkpoint folder

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """`accelerator.prepare` the trained model and its optimizer, then resume the newest checkpoint, if any."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        # without the fp32/autocast wrapper of `forward`: a stage autocasts its training passes itself
        # (`accelerator.autocast()`), and evaluations run in fp32
        model = self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            if not (checkpoint / "model.safetensors").is_file():
                raise ValueError(f"{checkpoint} is not an accelerate checkpoint (no model.safetensors; written before "
                                 "the recipe used accelerate): pass a new run_dir.")
            self.accelerator.load_state(str(checkpoint))
            self.state = json.loads((checkpoint / "trainer_state.json").read_text())
            self.start, self.train_seconds = self.state["step"], self.state.get("train_seconds", 0.0)
            if self.state.get("stopped_early"):
                self.start = self.cfg.max_steps  # the gate was reached: nothing left to train
            self.accelerator.print(f"{self.name}: resuming {self.run_dir} from step {self.start} ({checkpoint.name})")
            self.log.truncate(self.start)
            self.log.append({"kind": "resume", "step": self.start, "checkpoint": checkpoint.name})
        return model, optimizer

    def steps(self, make_batch: Callable[[int], Any]):
        """`(step, batch)` from the resumed step to `max_steps`, `make_batch(step)` run in `data_workers` processes
        (moved to the device here), under a progress bar."""
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.bar = tqdm(range(self.start, cfg.max_steps), total=cfg.max_steps, initial=self.start, desc=self.name,
                        disable=not self.show_progress, dynamic_ncols=True)
        self.tick = time.perf_counter()
        batches = step_batches(make_batch, self.start, cfg.max_steps, cfg.data_workers)
        try:
            for step, batch in zip(self.bar, batches):
                yield step, send_to_device(batch, self.device)
        finally:
            del batches  # stops the data workers, if any

    def seconds(self) -> float:
        """Training time so far (evaluations included), over every invocation of the run."""
        return self.train_seconds + time.perf_counter() - self.tick

    def end_step(self, done: int, row: dict, evaluate: Callable[[], dict] | None = None, eval_due: bool = False,
                 eval_at_cap: bool = False, describe: Callable[[dict], str] = json.dumps,
                 gate: Callable[[dict], bool] | None = None, plot: tuple = ("loss",)) -> bool:
        """The tail of a training step: log `row`, evaluate when `eval_due` (or at the time cap with `eval_at_cap`),
        checkpoint every `save_every` steps and whenever the run stops; returns True when the loop must stop (the
        `gate(metrics)` is reached, `stop_after`, or `max_minutes`)."""
        cfg = self.cfg
        self.log.append({"kind": "train", "step": done, **row})
        self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        stop = False
        if evaluate is not None and (eval_due or (eval_at_cap and out_of_time)):
            metrics = evaluate()
            self.log.append({"kind": "eval", "step": done, **metrics})
            self.bar.write(f"step {done}: {describe(metrics)}")
            stop = gate is not None and gate(metrics)
        self.interrupted = self.stop_after is not None and done >= self.stop_after and not stop
        if done % cfg.save_every == 0 or done == cfg.max_steps or stop or self.interrupted or out_of_time:
            self.save(done, stopped_early=stop)
            self.log.plot(self.run_dir / "loss.png", plot, f"{self.name} loss")
        if stop:
            self.bar.write(f"step {done}: the gate is reached, stopping early")
        elif out_of_time and done < cfg.max_steps and not self.interrupted:
            self.bar.write(f"step {done}: max_minutes={cfg.max_minutes} reached; checkpointed (run again to continue)")
        return stop or self.interrupted or out_of_time

    def save(self, step: int, **extra) -> Path:
        """`accelerator.save_state` to `RUN_DIR/checkpoints/step_XXXXXXX/` (written aside, then renamed) with
        `trainer_state.json`; keeps the newest `keep` checkpoints."""
        self.train_seconds = self.seconds()
        self.tick = time.perf_counter()
        root = self.run_dir / "checkpoints"
        final, staging = root / f"{CHECKPOINT_PREFIX}{step:07d}", root / f".staging-{step:07d}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.save_state(str(staging))
        for hook in self.save_hooks:
            hook(staging)
        state = {"step": step, "time": time.time(), "train_seconds": self.train_seconds, **extra}
        (staging / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


# ---------------------------------------------------------------------------------------------------------------------
# Seeding, data workers, schedules, logs and plots
# ---------------------------------------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_rng(seed: int, step: int, salt: str = "data") -> random.Random:
    """The Python RNG of one training step (data depends on `(seed, step)` only)."""
    return random.Random(derive_seed(seed, salt, step))


def step_generator(seed: int, step: int, salt: str = "noise") -> torch.Generator:
    """The torch generator of one training step."""
    return torch.Generator().manual_seed(derive_seed(seed, salt, step))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



class _Steps(torch.utils.data.Dataset):
    def __init__(self, fn, start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        return self.fn(self.start + index)


def step_batches(fn, start: int, stop: int, workers: int = 0):
    """`fn(step)` for `step` in `range(start, stop)`, in order.

    Args:
        fn: the CPU part of a step's batch; it must depend on the step only (data drawn from `step_rng`).
        workers: 0 computes each batch when it is needed, in this process; N > 0 computes them ahead in N forked
            processes (`torch.utils.data.DataLoader`), which only run CPU code (numpy, PIL, tokenizers).
    """
    if workers <= 0:
        return (fn(step) for step in range(start, stop))
    import multiprocessing

    loader = torch.utils.data.DataLoader(_Steps(fn, start, stop), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4,
                                         multiprocessing_context=multiprocessing.get_context("fork"))
    return iter(loader)


# ---------------------------------------------------------------------------------------------------------------------
# Schedules, logs and plots
# ---------------------------------------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup: int, max_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final_fraction * lr` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


class RunLog:
    """Append-only JSON-lines log (`log.jsonl`) of training and evaluation rows, with a loss-curve plot."""

    def __init__(self, run_dir: Path, name: str = "log.jsonl"):
        self.path = Path(run_dir) / name

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self, kind: str | None = None, max_step: int | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if kind is not None:
            rows = [r for r in rows if r.get("kind") == kind]
        if max_step is not None:
            rows = [r for r in rows if r.get("step", 0) <= max_step]
        return rows

    def truncate(self, step: int) -> None:
        """Drop rows after `step` (a resumed run rewrites them)."""
        if self.path.exists():
            keep = [r for r in self.rows() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def plot(self, out: Path, keys: tuple[str, ...] = ("loss",), title: str = "") -> Path | None:
        """Loss curves (raw and EMA) of the train rows, log-scale, to a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows("train")
        if not rows:
            return None
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            steps, values = zip(*pts)
            ax.plot(steps, values, alpha=0.3, lw=0.8)
            ema, smooth = values[0], []
            for v in values:
                ema = 0.95 * ema + 0.05 * v
                smooth.append(ema)
            ax.plot(steps, smooth, label=f"{key} (EMA)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def write_json(path: Path, value) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------------
# MICE-Shapes images
# ---------------------------------------------------------------------------------------------------------------------

# Session seeds the recipe trains on start here; evaluations use seeds below it (the bench default is 0..N).
TRAIN_SEED_OFFSET = 10_000_000


@contextlib.contextmanager
def single_frame_convs():
    """Run the Qwen-Image VAE's causal 3D convolutions on one-frame inputs as the equivalent 2D convolutions.

    A causal `k x 3 x 3` convolution of a single frame sees `k - 1` zero frames before it, so its output is exactly
    the 2D convolution with the kernel's last temporal slice: the same function, about `k` times fewer operations.
    Only a one-frame input without a feature cache is rerouted; everything else runs the original code.
    """
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    original = QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if x.shape[2] != 1 or cache_x is not None or self.stride[0] != 1:
            return original(self, x, cache_x)
        left, right, top, bottom = self._padding[:4]
        y = F.pad(x[:, :, 0], (left, right, top, bottom))
        y = F.conv2d(y, self.weight[:, :, -1], self.bias, self.stride[1:], 0, self.dilation[1:], self.groups)
        return y[:, :, None]

    QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        QwenImageCausalConv3d.forward = original


def scenes_to_tensor(scenes, size: int) -> torch.Tensor:
    """Render scenes to `(B, 3, H, W)` float in [-1, 1] (uint8-rounded, as images are stored)."""
    from editr2.bench.shapes.render import render

    arrays = [np.asarray(render(s, size), dtype=np.float32) / 255.0 for s in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1


def tensor_to_arrays(x: torch.Tensor) -> np.ndarray:
    """`(B, 3, H, W)` in [-1, 1] -> uint8-rounded float `(B, H, W, 3)` in [0, 1] (what a saved PNG holds)."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return np.rint(a * 255.0) / 255.0


def object_weights(scenes, size: int, weight: float, small_weight: float | None = None) -> torch.Tensor:
    """`(B, 1, H, W)` per-pixel loss weights: `weight` on (dilated) object pixels, 1 elsewhere; with `small_weight`,
    that weight on the pixels of small objects instead (their thin parts are what a blurry decoder loses)."""
    from dataclasses import replace

    from editr2.bench.shapes.render import object_mask

    weights = 1.0 + (weight - 1.0) * np.stack([object_mask(s, size, dilate=1) for s in scenes]).astype(np.float32)
    if small_weight is not None and small_weight != weight:
        small = np.stack([object_mask(replace(s, objects=tuple(o for o in s.objects if o.size == "small")), size,
                                      dilate=1) for s in scenes])
        weights[small] = small_weight
    return torch.from_numpy(weights)[:, None]


def scene_key(scene) -> tuple:
    """What the oracle parser can recover of a scene: its objects and tone."""
    return (scene.objects, scene.tone)


# ---------------------------------------------------------------------------------------------------------------------
# Text: the shapes-domain tokenizer and the reasoning targets
# ---------------------------------------------------------------------------------------------------------------------

_TRACE_RULES = (  # the shapes reconstructor's notes -> short traces (the tiny model writes fewer tokens)
    (r"Turn (\d+) sets? the rule: (\w+) color only on the object being added or changed(?:; it still holds)?\.",
     r"Rule from turn \1: \2."),
    (r"The instruction names everything explicitly\.", "Explicit."),
    (r"'([^']+)' refers to the ([a-z ]+?), which turn (\d+) [a-z ]+\.", r"'\1' = the \2 (turn \3)."),
    (r"'([^']+)' refers to the ([a-z ]+?) \(\w[\w ]* in turn (\d+)\)\.", r"'\1' = the \2 (turn \3)."),
    (r"'Undo' reverts turn (\d+):[^.]*\.", r"Undo turn \1."),
    (r"The rule makes the new (\w+) (\w+)\.", r"New \1: \2."),
)


def short_trace(reasoning: str) -> str:
    """The shapes reconstructor's reasoning, rewritten into a short trace (same facts, fewer words)."""
    import re

    text = " ".join(reasoning.split())
    for pattern, repl in _TRACE_RULES:
        text = re.sub(pattern, repl, text)
    return text


def reasoning_trace(instruction: str, reasoning: str, quote_edit: bool = True) -> str:
    """The trace the reasoner learns to write: the current edit clause quoted verbatim (`Edit: ...`, without a
    rule sentence), then the reconstructor's notes, shortened. The quote gives every example a dense copy signal
    and puts the slot words (size, colour, shape, cell) next to the answer that reuses them."""
    from editr2.bench.shapes.grammar import split_color_rule

    trace = short_trace(reasoning)
    if quote_edit:
        edit = split_color_rule(instruction)[1].strip().rstrip(".")
        trace = f"Edit: {edit}. {trace}"
    return trace


def dialogue_before(session, turn: int):
    """The `language.Dialogue` of an everyday-phrasing session before its 0-based `turn` (its gold commands and
    rules replayed: what the oracle reader resolves that turn's words against)."""
    from editr2.bench.shapes.language import Dialogue

    dlg = Dialogue.start(session.scenes[0])
    for t in range(turn):
        dlg = dlg.advance(session.commands[t], session.rules[t])
    return dlg


def natural_trace(session, turn: int, quote_edit: bool = True) -> str:
    """The trace of 0-based `turn` of an everyday-phrasing session: the grammar reconstructor's (as
    `reasoning_trace`) when it reads the words to the gold intent, else the oracle reader's notes
    (`language.interpret(...).reasoning`: what each reference and place resolved to, the policy that applied, the
    rule in force), after the quoted edit clause (the words without the rule sentence, openers and fillers)."""
    from editr2.bench.shapes import language
    from editr2.bench.shapes.reconstruct import reconstruct

    history, instruction = list(session.instruction[:turn]), session.instruction[turn]
    try:
        reasoning, intent = reconstruct(history, instruction)
    except ValueError:
        intent = None
    if intent == session.gold_intent[turn]:
        return reasoning_trace(instruction, reasoning, quote_edit)
    dlg = dialogue_before(session, turn)
    reading = language.interpret(dlg, instruction)
    if reading.command != session.commands[turn] or reading.rule != session.rules[turn]:
        raise ValueError(f"The oracle reader disagrees with the gold edit of {session.family}/{session.seed} "
                         f"turn {turn + 1}: {reading.command} != {session.commands[turn]}.")
    if not quote_edit:
        return reading.reasoning
    edit = language._strip(language._read_rule(dlg, language._normal(instruction))[2]).strip().rstrip(".!?")
    return f"Edit: {edit}. {reading.reasoning}"


def reasoning_example(session, turn: int, quote_edit: bool = True) -> tuple[list[str], str, str]:
    """`(history, instruction, target answer)` of 0-based `turn` of a generated shapes session (grammar sessions:
    the reconstructor's trace; everyday-phrasing sessions: `natural_trace`)."""
    from editr2.bench.shapes.reconstruct import reconstruct
    from editr2.intent import format_answer

    history, instruction = list(session.instruction[:turn]), session.instruction[turn]
    if getattr(session, "phrasing", "grammar") != "grammar":
        return history, instruction, format_answer(natural_trace(session, turn, quote_edit),
                                                   session.gold_intent[turn])
    reasoning, intent = reconstruct(history, instruction)
    if intent != session.gold_intent[turn]:
        raise ValueError(f"The reconstructor disagrees with the gold intent of {session.family}/{session.seed} "
                         f"turn {turn + 1}: {intent!r} != {session.gold_intent[turn]!r}.")
    return history, instruction, format_answer(reasoning_trace(instruction, reasoning, quote_edit), intent)


def tokenizer_corpus(num_sessions: int = 3000, seed: int = 0, phrasing: str = "grammar") -> list[str]:
    """Lines the shapes tokenizer is trained on: the prompt templates, and generated sessions' instructions,
    intents and traces (`phrasing="seen"`: every other session in the training phrasing families; the held-out
    families never enter the vocabulary)."""
    if phrasing not in ("grammar", "seen"):
        raise ValueError(f"phrasing={phrasing!r}: pass 'grammar' or 'seen' (held-out phrasing never trains).")
    from diffusers_editr2.pipeline_editr2 import PROMPT_TEMPLATE_ENCODE
    from editr2 import intent
    from editr2.bench.shapes import generate_session

    lines = [intent.SYSTEM_PROMPT, intent.DEFAULT_TEMPLATE, "Picture 1: Picture 2: Picture 3:", "<think> </think>",
             "Editing history:", "Persistent rules:", "Current instruction:", "Earlier instructions:"]
    lines += [PROMPT_TEMPLATE_ENCODE.format("")] * 2
    for k in range(num_sessions):
        family = ("cm", "cu")[k % 2]
        words = "seen" if phrasing == "seen" and (k // 2) % 2 else "grammar"
        session = generate_session(family, 1 + k % 6, TRAIN_SEED_OFFSET + 7_000_000 + seed * num_sessions + k,
                                   phrasing=words)
        for t in range(session.num_turns):
            _, _, answer = reasoning_example(session, t)
            lines += [session.instruction[t], answer]
    return lines


def build_tokenizer(vocab_size: int = 2048, num_sessions: int = 3000, phrasing: str = "grammar"):
    """A Qwen2 byte-level BPE tokenizer trained on the shapes corpus (`tokenizer_corpus`, deterministic), with
    Qwen2.5-VL's special tokens, `<think>`/`</think>` and the chat template of `diffusers_editr2.testing` (the same
    construction as its `tiny_tokenizer`, on another corpus)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from diffusers_editr2 import testing

    vocab, merges = testing._train_bpe(tuple(tokenizer_corpus(num_sessions, phrasing=phrasing)), vocab_size)
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges),
                               extra_special_tokens=list(testing.QWEN_SPECIAL_TOKENS[1:]), model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in testing.THINK_TOKENS])
    tokenizer.chat_template = testing.CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Model builders (the shipped architecture at tiny size)
# ---------------------------------------------------------------------------------------------------------------------


def build_text_encoder(tokenizer, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                       intermediate_size: int, vision_hidden: int = 32, vision_depth: int = 1):
    """A Qwen2.5-VL text encoder/VLM (tied embeddings) for `tokenizer`, built from a config."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffusers_editr2 import testing

    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]  # temporal, height, width (Qwen: 16, 24, 24 of 64)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            "tie_word_embeddings": True,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": testing.TINY_PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 4 * testing.TINY_PATCH_SIZE,
            "fullatt_block_indexes": list(range(vision_depth)),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids("<|endoftext|>"), eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"), do_sample=False)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline as a MICE-Shapes editor (for `editr2.bench.shapes.runner.run_bench`)
# ---------------------------------------------------------------------------------------------------------------------

# How the shipped model is called: 64x64 working size, references at the working size, the VLM sees 32x32.
CALL_KWARGS = {"height": 64, "width": 64, "reference_area": None, "condition_area": 32 * 32,
               "num_inference_steps": 16, "true_cfg_scale": 1.0, "max_new_tokens": 96}


def __getattr__(name: str):
    # `PipelineEditor` lives in the diffusers integration (`diffusers_editr2.bench`); imported on first use, since it
    # pulls in diffusers. Its default call arguments: the loaded folder's `editr2_call_defaults.json` (`CALL_KWARGS`).
    if name == "PipelineEditor":
        from diffusers_editr2.bench import PipelineEditor

        return PipelineEditor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

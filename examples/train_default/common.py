"""Shared pieces of the default-model recipe: configs, seeding, resumable checkpoints, logs and loss plots.

Every stage script (`train_vae.py`, `train_reasoner.py`, `train_editor.py`) is a loop of the same shape:

    cfg = load_config(StageConfig, args)                # YAML + `--set key=value` overrides
    state = resume(run_dir, modules, optimizer)         # the last checkpoint, if any
    for step in range(state.step, cfg.max_steps):
        batch = make_batch(step_rng(cfg.seed, step))    # data depends on (seed, step) only
        ...
        if due: save_checkpoint(run_dir, step + 1, modules, optimizer)

Data and noise are drawn from generators seeded by `(seed, step)`, so a run resumed from a checkpoint continues
exactly as an uninterrupted one would. Checkpoints hold safetensors (model and optimizer tensors) and JSON (step,
optimizer hyper-parameters, RNG states, config): nothing is pickled.

Every stage config subclasses `TrainConfig` (optimisation, checkpoints, device, mixed precision, wall-clock cap, data
workers). Data is generated on the CPU (numpy / PIL, in `data_workers` forked processes when > 0) and moved to the
device; noise is drawn on the CPU from the step's generator and moved too, so a CUDA run sees the same data and noise
as a CPU run. The defaults (`device="cpu"`, `mixed_precision="no"`, `data_workers=0`) run exactly the code path the
CPU recipe was measured with.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run as `python examples/train_default/train_x.py` from a checkout
    sys.path.insert(0, str(REPO))

CHECKPOINT_PREFIX = "step_"

# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """The optimisation and run settings every stage shares (`VAEConfig`, `ReasonerConfig` and `EditorConfig`
    subclass it and set their own defaults; the YAML keys are the field names).

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
        save_every: checkpoint every this many steps (also at the end, at `--stop-after` and at `max_minutes`).
        keep: checkpoints kept (the newest).
        threads: torch CPU threads of the training process (1 leaves a core to other work on a small machine).
        device: "cpu", "cuda" (or "cuda:N") or "auto" (CUDA when available, else CPU). Models, optimiser states and
            batches live there; checkpoints are always written from CPU copies, so a run resumes on any device.
        mixed_precision: "no" (fp32) or "bf16": the training forward passes run under `torch.autocast` in bfloat16
            (weights and optimiser states stay fp32). CUDA only: ignored on the CPU. Evaluations run in fp32.
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


def _parse_override(value: str, like: Any) -> Any:
    """Parse a `--set` value as YAML, as if it stood in the config file (`load_config` then types it like the file's
    values); a text field keeps the raw text, so `--set mixed_precision=no` stays "no" instead of YAML's False."""
    import yaml

    return value if isinstance(like, str) else yaml.safe_load(value)


def _as_field_type(value: Any, like: Any) -> Any:
    """`value` as the type of the field's default `like`: numbers that YAML 1.1 leaves as text (`5e-4`, which it
    reads only as `5.0e-4`) become numbers; a value that is not a number for a number field is returned unchanged and
    refused by `load_config`."""
    if isinstance(like, bool):
        return value
    if isinstance(like, (int, float)) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(like, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(like, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(like, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """A dataclass config from a YAML file plus `key=value` overrides.

    Args:
        cls: the config dataclass.
        path: a YAML mapping of field names to values (unknown keys are an error).
        overrides: `["lr=1e-3", "dim_mult=[1, 2, 2]"]`, applied after the file.
    """
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"Unknown config keys {unknown} in {path}: valid keys are {sorted(names)}.")
    defaults = cls()
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not `key=value`: pass e.g. --set lr=1e-3.")
        key, value = item.split("=", 1)
        if key not in names:
            raise ValueError(f"Unknown config key {key!r}: valid keys are {sorted(names)}.")
        values[key] = _parse_override(value, getattr(defaults, key))
    for key, value in list(values.items()):
        like = getattr(defaults, key)
        values[key] = value = _as_field_type(value, like)
        if isinstance(like, (bool, int, float)) and (isinstance(value, bool) != isinstance(like, bool)
                                                     or not isinstance(value, (bool, int, float))
                                                     or (type(like) is int and isinstance(value, float))):
            kind = "true or false" if isinstance(like, bool) else "a whole number" if type(like) is int else "a number"
            raise ValueError(f"{key}: {value!r} (config file or --set) is not {kind}: pass e.g. "
                             f"--set {key}={str(like).lower() if isinstance(like, bool) else like}.")
        if isinstance(like, str) and not isinstance(value, str):
            raise ValueError(f"{key}: {value!r} in {path} is not text (YAML reads no/yes/on/off as booleans): quote "
                             f'it, e.g. {key}: "{str(value).lower() if isinstance(value, bool) else value}".')
    return cls(**values)


def config_to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def add_common_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=str(HERE / "configs" / default_config), help="YAML config of the stage")
    parser.add_argument("--run-dir", required=True, help="where checkpoints, logs and plots go (resumed if present)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set max_steps=100")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and exit after this step (resume later with the same command)")


def prepare_run_dir(run_dir: str | os.PathLike, cfg) -> Path:
    """Create the run directory; refuse to resume a run whose config differs in a field that changes the model."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    current = config_to_dict(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        frozen = getattr(cfg, "FROZEN_FIELDS", ())
        defaults = config_to_dict(type(cfg)())
        changed = [k for k in frozen if saved.get(k, defaults.get(k)) != current.get(k)]
        if changed:
            raise ValueError(f"{run_dir} was trained with other values of {changed}: use a new --run-dir, or "
                             f"the saved values {({k: saved.get(k) for k in changed})}.")
    path.write_text(json.dumps(current, indent=2) + "\n")
    return run_dir


# ---------------------------------------------------------------------------------------------------------------------
# Devices, mixed precision, wall-clock caps and data workers
# ---------------------------------------------------------------------------------------------------------------------

MIXED_PRECISION = ("no", "bf16")


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's `device`: "cpu", "cuda", "cuda:N", or "auto" (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda}): pass device=cpu, or device=auto to use CUDA only "
                             f"where there is one.")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but there are {torch.cuda.device_count()} CUDA devices: pass "
                             f"device=cuda or cuda:0..{torch.cuda.device_count() - 1}.")
        return device
    raise ValueError(f"device={name!r}: pass 'cpu', 'cuda', 'cuda:N' or 'auto'.")


def setup_run(cfg: TrainConfig) -> torch.device:
    """Check the run settings, set the CPU threads (and TF32 matmuls on CUDA) and return the training device."""
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r}: pass one of {MIXED_PRECISION}.")
    if cfg.max_minutes < 0:
        raise ValueError(f"max_minutes={cfg.max_minutes}: pass 0 (no cap) or a positive number of minutes.")
    if cfg.data_workers < 0:
        raise ValueError(f"data_workers={cfg.data_workers}: pass 0 (in process) or a number of processes.")
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif cfg.mixed_precision != "no":
        print(f"mixed_precision={cfg.mixed_precision!r} is ignored on the CPU (autocast runs on CUDA only)")
    return device


def autocast(device: torch.device, mixed_precision: str):
    """`torch.autocast` in bfloat16 for "bf16" on CUDA; a no-op otherwise (fp32, the CPU path unchanged)."""
    if mixed_precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch, device: torch.device):
    """Tensors of a (nested) dict / list / tuple moved to `device`; other values are kept."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Deadline:
    """The wall-clock cap of a run (`TrainConfig.max_minutes`), counted from construction; 0 means none."""

    def __init__(self, minutes: float):
        self.end = time.monotonic() + 60.0 * minutes if minutes > 0 else None

    def reached(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


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
# Seeding
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


def rng_state() -> dict:
    """The global RNG states as JSON-serialisable values."""
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CUDA run: its generators too
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():  # saved on CUDA; a resume on the CPU ignores them
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON)
# ---------------------------------------------------------------------------------------------------------------------


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied (shared) tensors kept once, contiguous, on CPU."""
    out, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str = "optimizer") -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str = "optimizer") -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"{name}.safetensors"))
    meta = json.loads((directory / f"{name}.json").read_text())
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, modules: dict[str, torch.nn.Module], optimizer=None,
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Write `run_dir/checkpoints/step_XXXXXXX/` atomically; keep the newest `keep` checkpoints.

    Args:
        modules: name -> module; each is saved as `<name>.safetensors` (trainable or not: the checkpoint is complete).
        optimizer: saved as `optimizer.safetensors` + `optimizer.json`.
        extra: JSON-serialisable values stored in `trainer_state.json` (with the step and the RNG states).
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    staging = root / f".staging-{step:07d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, module in modules.items():
        save_file(_module_state(module), str(staging / f"{name}.safetensors"))
    if optimizer is not None:
        save_optimizer(optimizer, staging)
    state = {"step": step, "rng": rng_state(), "time": time.time(), **(extra or {})}
    (staging / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").exists())
    return found[-1] if found else None


def load_module(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a `.safetensors` state dict (strict, except for tied tensors saved once)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(module, name, state)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}.")


def _is_tied(module: torch.nn.Module, name: str, state: dict) -> bool:
    params = module.state_dict()
    ptr = params[name].data_ptr()
    return any(params[other].data_ptr() == ptr for other in state if other in params and other != name)


def resume(run_dir: Path, modules: dict[str, torch.nn.Module], optimizer=None) -> dict:
    """Load the newest checkpoint of `run_dir` into `modules` / `optimizer`; returns its trainer state
    (`{"step": 0}` when there is none).

    The tensors are read on the CPU and copied into the modules wherever they live; the optimizer (built on the
    modules' parameters) moves its state to their device, so a checkpoint written on one device resumes on another."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return {"step": 0}
    for name, module in modules.items():
        load_module(module, path / f"{name}.safetensors")
    if optimizer is not None:
        load_optimizer(optimizer, path)
    state = json.loads((path / "trainer_state.json").read_text())
    set_rng_state(state["rng"])
    return state


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


def progress(iterable, total: int, initial: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)


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


def images_to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> `(B, 3, H, W)` in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1


def tensor_to_arrays(x: torch.Tensor) -> np.ndarray:
    """`(B, 3, H, W)` in [-1, 1] -> uint8-rounded float `(B, H, W, 3)` in [0, 1] (what a saved PNG holds)."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return np.rint(a * 255.0) / 255.0


def object_weights(scenes, size: int, weight: float) -> torch.Tensor:
    """`(B, 1, H, W)` per-pixel loss weights: `weight` on (dilated) object pixels, 1 elsewhere."""
    from editr2.bench.shapes.render import object_mask

    masks = np.stack([object_mask(s, size, dilate=1) for s in scenes]).astype(np.float32)
    return torch.from_numpy(1.0 + (weight - 1.0) * masks)[:, None]


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
    from editr2.bench.shapes.grammar import split_rule

    trace = short_trace(reasoning)
    if quote_edit:
        edit = split_rule(instruction)[1].strip().rstrip(".")
        trace = f"Edit: {edit}. {trace}"
    return trace


def reasoning_example(session, turn: int, quote_edit: bool = True) -> tuple[list[str], str, str]:
    """`(history, instruction, target answer)` of 0-based `turn` of a generated shapes session."""
    from editr2.bench.shapes.reconstruct import reconstruct
    from editr2.intent import format_answer

    history, instruction = list(session.instruction[:turn]), session.instruction[turn]
    reasoning, intent = reconstruct(history, instruction)
    if intent != session.gold_intent[turn]:
        raise ValueError(f"The reconstructor disagrees with the gold intent of {session.family}/{session.seed} "
                         f"turn {turn + 1}: {intent!r} != {session.gold_intent[turn]!r}.")
    return history, instruction, format_answer(reasoning_trace(instruction, reasoning, quote_edit), intent)


def tokenizer_corpus(num_sessions: int = 3000, seed: int = 0) -> list[str]:
    """Lines the shapes tokenizer is trained on: the prompt templates, and generated sessions' instructions,
    intents and traces."""
    from diffusers_editr2.pipeline_editr2 import PROMPT_TEMPLATE_ENCODE
    from editr2 import intent
    from editr2.bench.shapes import generate_session

    lines = [intent.SYSTEM_PROMPT, intent.DEFAULT_TEMPLATE, "Picture 1: Picture 2: Picture 3:", "<think> </think>",
             "Editing history:", "Persistent rules:", "Current instruction:", "Earlier instructions:"]
    lines += [PROMPT_TEMPLATE_ENCODE.format("")] * 2
    for k in range(num_sessions):
        family = ("cm", "cu")[k % 2]
        session = generate_session(family, 1 + k % 6, TRAIN_SEED_OFFSET + 7_000_000 + seed * num_sessions + k)
        for t in range(session.num_turns):
            _, _, answer = reasoning_example(session, t)
            lines += [session.instruction[t], answer]
    return lines


def build_tokenizer(vocab_size: int = 2048, num_sessions: int = 3000):
    """A Qwen2 byte-level BPE tokenizer trained on the shapes corpus (deterministic), with Qwen2.5-VL's special
    tokens, `<think>`/`</think>` and the chat template of `diffusers_editr2.testing` (the same construction as its
    `tiny_tokenizer`, on another corpus)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from diffusers_editr2 import testing

    vocab, merges = testing._train_bpe(tuple(tokenizer_corpus(num_sessions)), vocab_size)
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

"""Reward functions in TRL's convention, and how the trainer calls them.

A reward function is `fn(prompts, images, **kwargs) -> list[float | None]`: one score per sample (one sample = one
turn of one rollout), `None` where the reward does not apply or could not be computed. The trainer never replaces a
`None` by a default score: a sample whose combined reward is missing gets no advantage and no gradient, and a function
that raises is retried (`EditR2Config.reward_retries`), then all its scores of that batch are marked missing and the
failure is counted in the logs (`rewards/{name}/failures`). A score that is NaN or +-inf (a flaky judge) is marked
missing too, here and only here (`score_samples`), and counted (`rewards/{name}/nonfinite`): one bad score costs that
sample its gradient, not the run.

The keyword arguments the trainer passes are listed in docs/trainer.md (the same names the MICE-Bench judges of
`editr2.bench.judges.rewards` read, so those judges plug in unchanged).

This module provides the MICE-Shapes oracle rewards, IF / CC / GA exactly as `editr2.bench.metrics` defines them,
read off the images by the oracle parser: the ground truth for tests and for RL on MICE-Shapes.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Sequence

from editr2.rewards import collect

logger = logging.getLogger(__name__)

SHAPES_METRICS = ("IF", "CC", "GA")


def reward_name(fn: Callable) -> str:
    """The name a reward function is logged and weighted under: its `__name__` (TRL's convention)."""
    return getattr(fn, "__name__", type(fn).__name__)


# ---------------------------------------------------------------------------------------------------------------------
# MICE-Shapes oracle
# ---------------------------------------------------------------------------------------------------------------------


class ShapesOracle:
    """Scores MICE-Shapes turns with `editr2.bench.metrics.score_session`; shared by the IF, CC and GA rewards.

    Each image is parsed once per batch; the three reward functions of one batch (the same `images` list object) share
    the scores.
    """

    def __init__(self):
        self._images = None
        self._scores: list = []

    def scores(self, images: Sequence, shapes: Sequence, history_images: Sequence[Sequence]) -> list:
        """One `TurnScore` per sample (None where the sample has no MICE-Shapes ground truth)."""
        if images is self._images:
            return self._scores
        import numpy as np

        from editr2.bench.metrics import score_session
        from editr2.bench.shapes.parser import analyze_batch
        from editr2.bench.shapes.render import to_array

        unique: dict[int, Any] = {}
        for image, history in zip(images, history_images):
            for im in (*history, image):
                unique.setdefault(id(im), im)
        order = list(unique)
        parsed_list = analyze_batch(np.stack([to_array(unique[k]) for k in order])) if order else []
        parsed = dict(zip(order, parsed_list))
        out = []
        for image, session, history in zip(images, shapes, history_images):
            if session is None:
                out.append(None)
                continue
            sequence = [*history, image]  # [source, out_1, ..., out_t]
            out.append(score_session(session, sequence, parsed=[parsed[id(im)] for im in sequence])[-1])
        self._images, self._scores = images, out
        return out


class ShapesOracleReward:
    """One MICE-Shapes metric ("IF", "CC" or "GA") as a TRL reward function named after it.

    Reads the keyword arguments `shapes` (the `ShapesSession` ground truth per sample, the column of
    [`~trl_editr2.data.ShapesSessionDataset`]) and `history_images` (`[source, out_1, ..., out_{t-1}]` per sample).

    Args:
        metric (`str`): "IF", "CC" or "GA".
        oracle ([`ShapesOracle`], *optional*): share one between the metrics so images are parsed once.
    """

    def __init__(self, metric: str, oracle: ShapesOracle | None = None):
        if metric not in SHAPES_METRICS:
            raise ValueError(f"metric must be one of {SHAPES_METRICS}, got {metric!r}.")
        self.metric = metric
        self.oracle = oracle or ShapesOracle()
        self.__name__ = metric

    def __call__(self, prompts: Sequence[str], images: Sequence, **kwargs) -> list[float | None]:
        shapes, history = kwargs.get("shapes"), kwargs.get("history_images")
        if shapes is None or history is None:
            raise ValueError(
                "The MICE-Shapes oracle rewards need the `shapes` column (use trl_editr2.data.ShapesSessionDataset) "
                "and `history_images` (passed by EditR2Trainer)."
            )
        scores = self.oracle.scores(images, shapes, history)
        return [None if s is None else float(getattr(s, self.metric)) for s in scores]

    def __repr__(self) -> str:
        return f"ShapesOracleReward({self.metric!r})"


def shapes_oracle_rewards() -> list[ShapesOracleReward]:
    """`[IF, CC, GA]` oracle reward functions sharing one parser pass (weights: `EditR2Config.reward_weights`)."""
    oracle = ShapesOracle()
    return [ShapesOracleReward(metric, oracle) for metric in SHAPES_METRICS]


# ---------------------------------------------------------------------------------------------------------------------
# Loading and calling
# ---------------------------------------------------------------------------------------------------------------------

JUDGE_CONFIG_ENV = "EDITR2_JUDGE_CONFIG"


def mice_judge_rewards() -> list[Callable]:
    """The MICE-Bench judges (`editr2.bench.judges`) as reward functions named "IF", "CC" and "GA".

    The judges are built from the YAML file named by the environment variable `EDITR2_JUDGE_CONFIG` (set it in the
    training config's `env:` block; format in docs/mice_bench.md). Judge failures are retried by the judges, then
    the score is missing (None), never a default.
    """
    from editr2.bench.judges.config import build_judges, load_judge_config
    from editr2.bench.judges.rewards import mice_reward_functions

    path = os.environ.get(JUDGE_CONFIG_ENV)
    if not path:
        raise ValueError(
            f"The 'mice_judges' rewards need a judge config: set {JUDGE_CONFIG_ENV} to its YAML file (e.g. in the "
            "training config's `env:` block)."
        )
    functions, _ = mice_reward_functions(build_judges(load_judge_config(path)))
    return functions


REWARD_REGISTRY: dict[str, Callable[[], list[Callable]]] = {
    "mice_judges": mice_judge_rewards,
    "shapes_oracle": shapes_oracle_rewards,
    "shapes_if": lambda: [ShapesOracleReward("IF")],
    "shapes_cc": lambda: [ShapesOracleReward("CC")],
    "shapes_ga": lambda: [ShapesOracleReward("GA")],
}


def load_reward_funcs(names: Sequence[str | Callable]) -> list[Callable]:
    """Resolve reward functions: callables as they are, registry names (`shapes_oracle` = IF + CC + GA, `shapes_if`,
    `shapes_cc`, `shapes_ga`), or dotted import paths (`my_lib.rewards.my_reward`; a plain function taking no
    required argument is a factory, called to get its list of reward functions, like `shapes_oracle_rewards`)."""
    funcs: list[Callable] = []
    for name in names:
        if callable(name):
            funcs.append(name)
        elif name in REWARD_REGISTRY:
            funcs.extend(REWARD_REGISTRY[name]())
        elif "." in name:
            module_path, attr = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            obj = getattr(importlib.import_module(module_path), attr)
            funcs.extend(list(obj()) if _is_factory(obj) else [obj])
        else:
            raise ValueError(
                f"Unknown reward function {name!r}: pass one of {sorted(REWARD_REGISTRY)} or a dotted import path "
                "(e.g. 'my_lib.rewards.my_reward')."
            )
    if not funcs:
        raise ValueError("No reward functions: pass at least one (e.g. reward_funcs=['shapes_oracle']).")
    names_seen = [reward_name(f) for f in funcs]
    duplicates = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if duplicates:
        raise ValueError(f"Reward function names must be unique (they key the logs and weights), got {duplicates}.")
    return funcs


def _is_factory(fn: Callable) -> bool:
    """A function with no required parameters is a factory returning reward functions (e.g. `shapes_oracle_rewards`)."""
    import inspect

    if not inspect.isfunction(fn):
        return False
    params = inspect.signature(fn).parameters.values()
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _with_retries(fn: Callable, name: str, retries: int, failures: dict[str, int],
                  nonfinite: dict[str, int], timings: dict[str, float] | None = None) -> Callable:
    """`fn` called up to `1 + retries` times; after the last failure its scores are all `None` (missing). Non-finite
    scores become `None`, counted in `nonfinite[name]`. With `timings`, the seconds spent (retries included) are
    stored under `name`."""

    def call(prompts, images, **kwargs):
        start = time.perf_counter()
        try:
            return attempts(prompts, images, **kwargs)
        finally:
            if timings is not None:
                timings[name] = time.perf_counter() - start

    def attempts(prompts, images, **kwargs):
        for attempt in range(retries + 1):
            try:
                values = fn(prompts, images, **kwargs)
            except Exception as err:  # noqa: BLE001 - a judge may fail in any way; it is retried, then marked missing
                logger.warning("reward function %r failed (attempt %d/%d): %r", name, attempt + 1, retries + 1, err)
                continue
            return _nonfinite_as_missing(values, name, nonfinite)
        failures[name] = failures.get(name, 0) + 1
        return [None] * len(prompts)

    return call


def _nonfinite_as_missing(values, name: str, nonfinite: dict[str, int]):
    """`values` with every NaN / +-inf number replaced by None (counted); anything else is left to `collect`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return values  # `collect` names the function and the wrong type
    out = []
    for value in values:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
            nonfinite[name] = nonfinite.get(name, 0) + 1
            value = None
        out.append(value)
    if nonfinite.get(name):
        logger.warning("reward function %r returned %d non-finite score(s); they count as missing.", name,
                       nonfinite[name])
    return out


def score_samples(reward_funcs: Sequence[Callable], prompts: Sequence[str], images: Sequence, retries: int = 1,
                  timings: dict[str, float] | None = None,
                  **kwargs) -> tuple[dict[str, list[float | None]], dict[str, int], dict[str, int]]:
    """Call every reward function on the batch (one call each, with all of the step's samples: a judge sends them
    as parallel requests, up to its back-end's `max_concurrency`).

    `timings`, when given, receives each function's seconds by name (the trainer logs them as
    `timing/reward/{name}`).

    Returns:
        `(scores, failures, nonfinite)`: `{name: [float | None per sample]}` validated by `editr2.rewards.collect` (a
        wrong length, or a value that is neither a number nor None, is an error naming the function); `{name: 1}` for
        each function that failed after its retries (its scores are all None); and `{name: count}` of the NaN / inf
        scores each function returned, which are None (missing) in `scores`.
    """
    failures: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    wrapped = {reward_name(fn): _with_retries(fn, reward_name(fn), retries, failures, nonfinite, timings)
               for fn in reward_funcs}
    return collect(wrapped, prompts, images, **kwargs), failures, nonfinite

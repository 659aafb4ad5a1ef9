"""The reward protocol and the weighted IF / CC / GA combination.

A reward function follows TRL's convention: `fn(prompts, images, **kwargs) -> list[float | None]`, one score per
prompt, None where the reward does not apply or could not be computed (a judge that failed after its retries). A
missing score is never replaced by a default: any None in a weighted component makes the combined reward None, which
`editr2.rl.group_advantages` then leaves out of the statistics.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Mapping, Sequence

RewardFn = Callable[..., list[float | None]]

DEFAULT_WEIGHTS = {"IF": 0.3, "CC": 0.3, "GA": 0.4}  # the paper's weights; copy before changing


def _check_score(value, where: str) -> float | None:
    """A finite float or None; anything else is an error that names `where`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: expected a float or None, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite float or None, got {value}; return None for a missing score")
    return float(value)


def combine(scores: Mapping[str, Sequence[float | None]], weights: Mapping[str, float] = DEFAULT_WEIGHTS):
    """Weighted sum of reward components per sample: `sum_k weights[k] * scores[k][i]` (not renormalised).

    Args:
        scores: component name -> one score (float or None) per sample; all lists the same length.
        weights: component name -> weight. Every component in `scores` needs a weight (0 keeps it out of the sum).

    Returns:
        One combined reward per sample; None where any component with a non-zero weight is None.
    """
    if not scores:
        raise ValueError("scores is empty; pass {name: [score per sample]} for the components in weights")
    missing = [k for k in weights if weights[k] != 0 and k not in scores]
    unknown = [k for k in scores if k not in weights]
    if missing or unknown:
        raise ValueError(
            f"scores has components {sorted(scores)} but weights has {sorted(weights)}: "
            + (f"no scores for {missing}; " if missing else "")
            + (f"no weight for {unknown} (give it weight 0 to keep it out of the sum)" if unknown else "")
        )
    lengths = {k: len(v) for k, v in scores.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"score lists differ in length {lengths}; pass one score per sample for every component")
    used = [k for k in scores if weights[k] != 0]
    combined = []
    for i in range(next(iter(lengths.values()))):
        values = [_check_score(scores[k][i], f"scores[{k!r}][{i}]") for k in used]
        combined.append(None if None in values else sum(weights[k] * v for k, v in zip(used, values)))
    return combined


def collect(reward_fns: Mapping[str, RewardFn] | Sequence[RewardFn], prompts: Sequence, images: Sequence, **kwargs):
    """Calls each reward function on the batch and returns `{name: [float | None per prompt]}`, validated.

    Args:
        reward_fns: name -> function, or a list of functions (named by their `__name__`).
        prompts, images: the batch, passed through (one score per prompt is expected back).
        **kwargs: passed to every function (e.g. `source_images`, `history`, `task_type`).

    Raises:
        ValueError naming the function when it returns the wrong number of scores or a value that is not a finite
        float or None.
    """
    if not isinstance(reward_fns, Mapping):
        reward_fns = {getattr(fn, "__name__", type(fn).__name__): fn for fn in reward_fns}
    results = {}
    for name, fn in reward_fns.items():
        values = fn(prompts, images, **kwargs)
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"reward function {name!r} returned {type(values).__name__}; it must return a list")
        if len(values) != len(prompts):
            raise ValueError(f"reward function {name!r} returned {len(values)} scores for {len(prompts)} prompts")
        results[name] = [_check_score(v, f"reward function {name!r}, sample {i}") for i, v in enumerate(values)]
    return results

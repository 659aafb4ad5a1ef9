"""Small statistics for bench summaries: a percentile bootstrap over sessions."""

from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(data, statistic: Callable[[np.ndarray], float], num_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the rows of `data` (rows are resampled with replacement).

    Args:
        data (array-like): `(N, ...)`, one row per independent unit (a session).
        statistic (`Callable`): maps an `(N, ...)` array to a number; it may return `inf` (e.g. a half-life that is
            never reached), which then lands in the interval's bounds as `inf`.
        num_resamples (`int`, defaults to 1000): bootstrap resamples.
        level (`float`, defaults to 0.95): coverage of the interval.
        seed (`int`, defaults to 0): seed of the resampling (the interval is deterministic given it).

    Returns:
        `(low, high)`. With a single row, both are the statistic itself.

    Example:

    ```py
    >>> import numpy as np
    >>> bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]), np.mean)  # doctest: +SKIP
    (1.5, 3.5)
    ```
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 0 or len(data) == 0:
        raise ValueError(f"`data` has shape {data.shape}: pass at least one row (one per session).")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: pass a coverage in (0, 1), e.g. 0.95.")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples}: pass at least 1.")
    if len(data) == 1:
        value = float(statistic(data))
        return value, value
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(data), size=(num_resamples, len(data)))
    values = np.array([float(statistic(data[idx])) for idx in draws])
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low = np.percentile(values, tail, method="lower")  # no interpolation: stays exact with inf values
    high = np.percentile(values, 100 - tail, method="higher")
    return float(low), float(high)

"""Small statistics for bench summaries: percentile bootstrap intervals over sessions.

- `bootstrap_ci`: the interval of one statistic of one run (e.g. a turn's mean IF in `editr2 bench shapes`).
- `paired_bootstrap_ci`: the interval of a difference between two arms scored on the same sessions (`editr2 bench
  compare`): each resample draws the same session indices for both arms, so what the sessions share cancels.
- `seed_session_bootstrap_ci`: the same for arms trained with several seeds each, resampling the seeds of each arm
  too, so the interval holds the seed-to-seed spread as well as the sessions'.

All resample whole sessions (rows), with a fixed seed: the same data give the same interval.
"""

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
    data = _rows(data, "data")
    _check(level, num_resamples)
    if len(data) == 1:
        value = float(statistic(data))
        return value, value
    values = np.array([float(statistic(data[idx])) for idx in _draws(len(data), num_resamples, seed)])
    return _percentile_interval(values, level)


def paired_bootstrap_ci(a, b, statistic: Callable[[np.ndarray], float] = np.mean, num_resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(b) - statistic(a)` for two arms scored on the same units: each
    resample draws one set of row indices and applies it to both arms (a paired bootstrap).

    Args:
        a, b (array-like): `(N, ...)` each, row i of both being the same unit (session); same shape.
        statistic (`Callable`, defaults to `np.mean`): maps an `(N, ...)` array to a number (e.g. `np.nanmean` where
            `NaN` marks a turn a session does not have).
        num_resamples (`int`, defaults to 1000), level (`float`, defaults to 0.95), seed (`int`, defaults to 0): as
            in `bootstrap_ci` (the same seed draws the same indices as `bootstrap_ci` over `N` rows).

    Returns:
        `(low, high)` of the difference B - A. With a single row, both are the difference itself.

    Example:

    ```py
    >>> import numpy as np
    >>> a = np.array([0.2, 0.5, 0.9, 0.4])
    >>> paired_bootstrap_ci(a, a + 0.1)  # the same shift on every session: no spread at all  # doctest: +SKIP
    (0.1, 0.1)
    ```
    """
    a, b = _rows(a, "a"), _rows(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"`a` has shape {a.shape} and `b` {b.shape}: pass the two arms' scores on the same sessions "
                         "(row i of both is session i).")
    _check(level, num_resamples)
    if len(a) == 1:
        value = float(statistic(b)) - float(statistic(a))
        return value, value
    values = np.array([float(statistic(b[idx])) - float(statistic(a[idx]))
                       for idx in _draws(len(a), num_resamples, seed)])
    return _percentile_interval(values, level)


def seed_session_bootstrap_ci(a, b, num_resamples: int = 1000, level: float = 0.95,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(b) - mean(a) for two arms with several training seeds each, scored on the
    same sessions: each resample draws seeds with replacement in each arm and one set of session indices for both
    (a two-level bootstrap), so the interval covers a new seed's spread, not only the sessions'.

    Args:
        a, b (array-like): `(seeds, N)` each: row s holds seed s's score on every session, column i of both arms
            being the same session; the seed counts may differ.
        num_resamples (`int`, defaults to 1000), level (`float`, defaults to 0.95), seed (`int`, defaults to 0): as
            in `bootstrap_ci`.

    Returns:
        `(low, high)` of the difference B - A, each arm's value being its mean over its seeds and the sessions.
    """
    a, b = np.atleast_2d(_rows(a, "a")), np.atleast_2d(_rows(b, "b"))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"`a` has shape {a.shape} and `b` {b.shape}: pass (seeds, sessions) arrays over the same "
                         "sessions.")
    _check(level, num_resamples)
    rng = np.random.default_rng(seed)
    sessions = rng.integers(0, a.shape[1], size=(num_resamples, a.shape[1]))  # (R, N), shared by both arms
    diffs = np.empty(num_resamples)
    for r in range(num_resamples):
        seeds_a = rng.integers(0, len(a), size=len(a))
        seeds_b = rng.integers(0, len(b), size=len(b))
        diffs[r] = b[seeds_b][:, sessions[r]].mean() - a[seeds_a][:, sessions[r]].mean()
    return _percentile_interval(diffs, level)


def _rows(data, name: str) -> np.ndarray:
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 0 or len(data) == 0:
        raise ValueError(f"`{name}` has shape {data.shape}: pass at least one row (one per session).")
    return data


def _check(level: float, num_resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level}: pass a coverage in (0, 1), e.g. 0.95.")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples}: pass at least 1.")


def _draws(count: int, num_resamples: int, seed: int) -> np.ndarray:
    """`(num_resamples, count)` row indices drawn with replacement (deterministic given `seed`)."""
    return np.random.default_rng(seed).integers(0, count, size=(num_resamples, count))


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of the resampled `values` (NaN resamples dropped; NaN bounds when all are)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low = np.percentile(values, tail, method="lower")  # no interpolation: stays exact with inf values
    high = np.percentile(values, 100 - tail, method="higher")
    return float(low), float(high)

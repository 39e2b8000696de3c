"""Bootstrap intervals for the offline metrics: how far a figure could move on another draw of users.

What is resampled: **users** (evaluation cases -- leave-one-out gives each user exactly one test
case). A metric such as NDCG@10 is the mean of a per-case value (`training.evaluation.case_metrics`);
the bootstrap draws `n_boot` samples of the same number of cases *with replacement* and takes
the mean of each; the interval is the central `level` share of those means (percentile
bootstrap). Users are the unit because they are what the benchmark samples from a population:
items and the model's training are held fixed, so the interval says how much the figure depends
on which users happened to be in the data set, not how much retraining would move it.

Paired: two models are scored on the *same* users, and a user who is easy for one is usually
easy for the other. `paired_bootstrap` therefore resamples the per-user *difference* (the same
drawn users for both models), which cancels that shared difficulty; two independent intervals
that overlap say little about whether the difference is real, the paired interval does.

NaN values (a case a metric is undefined for, e.g. intra-list diversity of a list with < 2
items) do not count: each resample's mean is over its non-NaN values, so a user is still drawn
as a unit. Deterministic: the same `seed`, values and `n_boot` give the same interval; the same
seed and number of cases draw the same users for every metric and model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 1000  # resamples: the ends of a 95% interval move by ~0.1 standard errors between seeds
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_CHUNK_CELLS = 4_000_000  # resample indices held at once (n_boot x n cases, int64: 32 MB)


def _as_values(values: Any, what: str = "values") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{what} must be one value per case (1-D), got shape {v.shape}")
    if len(v) == 0:
        raise ValueError(f"{what} is empty: a bootstrap interval needs at least one case")
    return v


def bootstrap_means(values: Any, *, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """(n_boot,) means of `values` over resamples of its cases (with replacement, NaN skipped).

    A resample whose drawn cases are all NaN gives NaN.
    """
    v = _as_values(values)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: must be >= 1")
    n = len(v)
    ok = ~np.isnan(v)
    filled = np.where(ok, v, 0.0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    step = max(1, BOOTSTRAP_CHUNK_CELLS // n)
    for lo in range(0, n_boot, step):
        hi = min(n_boot, lo + step)
        idx = rng.integers(0, n, size=(hi - lo, n))
        total = filled[idx].sum(axis=1)
        count = ok[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[lo:hi] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return means


def bootstrap_ci(values: Any, *, n_boot: int = BOOTSTRAP_SAMPLES, level: float = BOOTSTRAP_LEVEL, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval `(lo, hi)` of the mean of `values` (one value per user).

    NaN values are skipped (see the module docstring); all-NaN values give `(nan, nan)`.
    Raises ValueError for empty or non-1-D `values`, `level` outside (0, 1), `n_boot` < 1.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: must be strictly between 0 and 1 (e.g. 0.95)")
    means = bootstrap_means(values, n_boot=n_boot, seed=seed)
    means = means[~np.isnan(means)]
    if len(means) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(means, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lo), float(hi)


def paired_bootstrap(a: Any, b: Any, *, n_boot: int = BOOTSTRAP_SAMPLES, level: float = BOOTSTRAP_LEVEL,
                     seed: int = 0) -> dict[str, Any]:
    """`{"diff": mean(a - b), "ci95": [lo, hi]}`: the paired difference of two models' per-case
    values on the same cases (a[i] and b[i] the same user) and its bootstrap interval, both
    resampled with the same drawn users. The key says 95; it holds the `level` interval.

    A case where either value is NaN does not count. Raises ValueError when a and b differ in
    length (they must be the same cases, in the same order) or for bad input as `bootstrap_ci`.
    """
    a = _as_values(a, "a")
    b = _as_values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a has {len(a)} cases, b {len(b)}: a paired bootstrap needs both models' values on the "
                         "same cases, in the same order")
    d = a - b
    lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
    diff = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
    return {"diff": diff, "ci95": [lo, hi]}


def metric_intervals(per_case: Mapping[str, Any], *, n_boot: int = BOOTSTRAP_SAMPLES, level: float = BOOTSTRAP_LEVEL,
                     seed: int = 0) -> dict[str, list[float]]:
    """`{metric: [lo, hi]}` for each per-case array of `per_case` (e.g. `case_metrics(ranks)`), all
    with the same seed, hence the same drawn users. The shape `save_report(ci=...)` takes per
    (model, protocol)."""
    return {key: list(bootstrap_ci(v, n_boot=n_boot, level=level, seed=seed)) for key, v in per_case.items()}


__all__ = ["BOOTSTRAP_CHUNK_CELLS", "BOOTSTRAP_LEVEL", "BOOTSTRAP_SAMPLES", "bootstrap_ci", "bootstrap_means",
           "metric_intervals", "paired_bootstrap"]

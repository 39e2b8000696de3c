"""Tests of training/bootstrap.py: intervals over users, the paired difference, bad input.

Run: `pytest -q tests/training/test_bootstrap.py` (unit-level, a second or two).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import bootstrap
from training.bootstrap import (
    BOOTSTRAP_SAMPLES,
    bootstrap_ci,
    bootstrap_means,
    metric_intervals,
    paired_bootstrap,
)


def _hits(n: int, p: float = 0.2, seed: int = 0) -> np.ndarray:
    """Per-user 0/1 values, like recall10."""
    return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


def test_interval_covers_the_mean_and_matches_the_normal_approximation():
    v = _hits(2000)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi
    se = v.std() / math.sqrt(len(v))
    # percentile bootstrap of a mean ~ mean -/+ 1.96 SE for a sample this large
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_interval_shrinks_with_more_users():
    small = bootstrap_ci(_hits(250, seed=1))
    large = bootstrap_ci(_hits(4000, seed=1))
    # width ~ 1/sqrt(n): 16x the users, ~1/4 the width
    assert (large[1] - large[0]) < 0.5 * (small[1] - small[0])


def test_level_widens_the_interval():
    v = _hits(500)
    lo90, hi90 = bootstrap_ci(v, level=0.9)
    lo99, hi99 = bootstrap_ci(v, level=0.99)
    assert lo99 <= lo90 < hi90 <= hi99


def test_deterministic_given_seed():
    v = np.random.default_rng(5).random(300)
    assert bootstrap_ci(v, seed=7) == bootstrap_ci(v, seed=7)
    assert bootstrap_ci(v, seed=7) != bootstrap_ci(v, seed=8)
    assert len(bootstrap_means(v)) == BOOTSTRAP_SAMPLES


def test_chunking_does_not_change_the_draws(monkeypatch):
    v = np.random.default_rng(2).random(700)
    whole = bootstrap_means(v, seed=4)
    monkeypatch.setattr(bootstrap, "BOOTSTRAP_CHUNK_CELLS", 3 * 700)  # 3 resamples per chunk
    np.testing.assert_array_equal(bootstrap_means(v, seed=4), whole)


def test_constant_values_give_a_point_interval():
    assert bootstrap_ci(np.full(50, 0.25)) == (0.25, 0.25)


def test_nan_values_are_skipped_not_counted_as_zero():
    v = np.where(np.arange(400) % 4 == 0, np.nan, _hits(400, p=0.5, seed=3))
    lo, hi = bootstrap_ci(v)
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo < np.nanmean(v) < hi
    assert bootstrap_ci(np.full(10, np.nan)) == pytest.approx((np.nan, np.nan), nan_ok=True)


def test_paired_interval_of_identical_arrays_is_zero():
    a = np.random.default_rng(0).random(100)
    res = paired_bootstrap(a, a.copy())
    assert res == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_paired_difference_and_its_interval():
    rng = np.random.default_rng(11)
    base = rng.random(1000)  # shared per-user difficulty
    a = base + 0.02 + 0.05 * rng.standard_normal(1000)
    b = base
    res = paired_bootstrap(a, b)
    assert res["diff"] == pytest.approx(float(np.mean(a - b)))
    lo, hi = res["ci95"]
    assert 0.0 < lo < res["diff"] < hi  # a real 0.02 lead: the interval excludes 0
    # pairing cancels the shared difficulty: far narrower than either model's own interval
    lo_a, hi_a = bootstrap_ci(a)
    assert (hi - lo) < 0.5 * (hi_a - lo_a)
    # the same users for both: equal to bootstrapping the per-user differences
    assert tuple(res["ci95"]) == bootstrap_ci(a - b)


def test_metric_intervals_per_metric():
    per_case = {"ndcg10": np.linspace(0, 1, 200), "recall10": _hits(200)}
    out = metric_intervals(per_case, seed=3)
    assert set(out) == {"ndcg10", "recall10"}
    assert out["recall10"] == list(bootstrap_ci(per_case["recall10"], seed=3))
    assert all(len(v) == 2 and v[0] <= v[1] for v in out.values())


@pytest.mark.parametrize("kwargs, match", [
    ({"values": []}, "empty"),
    ({"values": np.ones((3, 2))}, "1-D"),
    ({"values": [1.0, 2.0], "level": 0.0}, "level"),
    ({"values": [1.0, 2.0], "level": 1.0}, "level"),
    ({"values": [1.0, 2.0], "level": 95}, "level"),
    ({"values": [1.0, 2.0], "n_boot": 0}, "n_boot"),
])
def test_bad_input_is_refused(kwargs, match):
    values = kwargs.pop("values")
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(values, **kwargs)


def test_paired_refuses_different_cases():
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])

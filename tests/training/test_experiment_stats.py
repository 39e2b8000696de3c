"""The experiment statistics: intervals, the fixed-horizon test and the canary's sequential rule
(training/experiment_stats.py), checked against known values and by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from training.experiment_stats import Arm, canary_decision, compare, confidence_sequence, wilson


def test_wilson_interval_matches_the_textbook_value():
    lo, hi = wilson(Arm(100, 20))  # Wilson 95% for 20/100: [0.1333, 0.2888]
    assert lo == pytest.approx(0.1333, abs=1e-3) and hi == pytest.approx(0.2888, abs=1e-3)
    assert wilson(Arm(0, 0)) == (0.0, 1.0)


def test_two_proportion_test_matches_the_textbook_value():
    c = compare(Arm(1000, 100), Arm(1000, 130))  # z = 2.1029 pooled -> p = 0.0355
    assert c.diff == pytest.approx(0.03)
    assert c.p_value == pytest.approx(0.0355, abs=5e-4)
    assert compare(Arm(0, 0), Arm(10, 1)).p_value is None


def test_the_confidence_sequence_rarely_excludes_the_truth_over_many_looks():
    rng = np.random.default_rng(7)
    runs, alarms = 300, 0
    for _ in range(runs):
        a = b = na = nb = 0
        for _look in range(30):  # 30 looks of 100 impressions per arm
            na += 100
            nb += 100
            a += rng.binomial(100, 0.3)
            b += rng.binomial(100, 0.3)
            _, lo, hi = confidence_sequence(Arm(na, a), Arm(nb, b), alpha=0.05)
            if lo > 0 or hi < 0:
                alarms += 1
                break
    assert alarms / runs <= 0.05  # always valid: at most alpha over every look (binomial slack included)


def test_canary_rules():
    worse = canary_decision(Arm(3000, 900), Arm(400, 60), min_impressions=2000, margin=0.05, alpha=0.05)
    assert worse.action == "rollback" and "worse than control by more than 5%" in worse.reason
    assert worse.high < -0.05 * 0.3
    same = canary_decision(Arm(20000, 6000), Arm(2000, 600), min_impressions=2000, margin=0.05, alpha=0.05)
    assert same.action == "promote"
    early = canary_decision(Arm(2000, 600), Arm(200, 60), min_impressions=2000, margin=0.05, alpha=0.05)
    assert early.action == "wait" and "200 of 2000" in early.reason
    # 0.27 vs 0.30 at M: a point estimate beyond the margin, but the test cannot show it: promoted
    unproven = canary_decision(Arm(20000, 6000), Arm(2000, 540), min_impressions=2000, margin=0.05, alpha=0.05)
    assert unproven.action == "promote" and unproven.high > -0.015
    # significantly worse, but within the margin: not rolled back (0.295 vs 0.30 with 200k impressions)
    within = canary_decision(Arm(400000, 120000), Arm(200000, 59000), min_impressions=2000, margin=0.05, alpha=0.05)
    assert within.high < 0 and within.action == "promote"
    assert set(worse.record()) == {"decision", "ctr_diff", "cs_low", "cs_high"}
    no_clicks = canary_decision(Arm(20000, 0), Arm(2000, 0), min_impressions=2000, margin=0.05, alpha=0.05)
    assert no_clicks.action == "wait" and "request_id" in no_clicks.reason

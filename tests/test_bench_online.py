"""bench/online.py without the stack: its JSON keys are the issue's, the text table reads a partial
result, the sizes are sane. The full run is the lead's (minutes to an hour of real stack and training)."""

from __future__ import annotations

import pytest

from bench.online import AA_MIN_IMPRESSIONS, FULL, QUICK, RESULT_KEYS, main, render
from streaming.datasets.spec import parse_synthetic_spec

KEYS = {"ctr_popular", "ctr_first_adapter", "ctr_after_incremental", "degraded_rolled_back",
        "degraded_decision_impressions", "false_alarms", "false_alarm_runs", "ctr_hard_negatives_on",
        "ctr_hard_negatives_off"}


def empty_result() -> dict:
    return {k: ([] if k == "ctr_after_incremental" else None) for k in KEYS}


def test_render_reads_a_partial_result():
    out = {**empty_result(), "ctr_popular": 0.12, "ctr_first_adapter": 0.3, "ctr_after_incremental": [0.31, 0.35],
           "degraded_rolled_back": True, "degraded_decision_impressions": 412, "false_alarms": 0,
           "false_alarm_runs": 20}
    text = render(out)
    assert "popular 0.1200 -> first adapter 0.3000 -> after incremental runs 0.3100, 0.3500" in text
    assert "rolled back True at 412" in text and "0 false alarm(s) in 20 runs" in text
    assert "on -, off -" in text


def test_the_keys_are_the_issues():
    assert set(RESULT_KEYS) == KEYS and len(RESULT_KEYS) == len(KEYS)


def test_sizes():
    assert FULL.aa_runs == 20 and FULL.incremental_runs >= 2 and QUICK.measure < FULL.measure
    for size in (FULL, QUICK):
        cfg = parse_synthetic_spec(size.dataset)
        assert cfg.n_events >= size.first_events
    assert AA_MIN_IMPRESSIONS < 2000  # below the default M: the A/A runs are cheap


def test_only_needs_the_learning_phase(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--only", "aa"])
    assert exc.value.code == 2 and "learning" in capsys.readouterr().err

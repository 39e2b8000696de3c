"""streaming.feature_schedule: the feature job beside ingestion, one run at a time, on a timer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from streaming.feature_schedule import PeriodicFeatures


class FakeJob:
    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail
        self.release = threading.Event()

    def __call__(self, settings, redis_client=None):
        self.calls += 1
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("no log files readable")
        return SimpleNamespace(noop=False, version=self.calls, new_events=10, new_files=1)


def test_runs_in_the_background_at_most_once_per_interval_and_one_at_a_time():
    job = FakeJob()
    pf = PeriodicFeatures(settings=None, redis_client=None, interval_s=3600, run=job)
    pf.maybe_run()
    pf.maybe_run()  # a run is in progress: no second one
    job.release.set()
    pf.join()
    pf.maybe_run()  # the interval has not passed
    pf.join()
    assert job.calls == 1 and pf.failures == 0


def test_a_zero_interval_never_runs_and_a_failure_is_counted_not_raised():
    job = FakeJob(fail=True)
    PeriodicFeatures(settings=None, redis_client=None, interval_s=0, run=job).maybe_run()
    assert job.calls == 0
    job.release.set()
    pf = PeriodicFeatures(settings=None, redis_client=None, interval_s=0.001, run=job)
    pf.maybe_run()
    pf.join()
    assert job.calls == 1 and pf.failures == 1

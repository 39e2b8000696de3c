"""The feature job's outcome metrics (`features.prom`, job `streamrec_features`), written after
every run by `run_features` -- whoever called it: `streamrec features`, ingest's timer, the
continuous trainer (streaming/job_metrics.py writes and pushes them).

A failed run is recorded too: last run time and `last_run_ok 0`, with the last success time and
feature version carried over from the previous file, so the staleness alert keeps counting from
the last success. Every run's end also writes the live feature version's click attribution counters
(`streamrec_attribution_*`, streaming/features/attribution.py). A run that found the job busy (another
run holds the lock) is not a run and is not recorded: the run holding the lock records its own end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from streaming.features.attribution import add_attribution_metrics
from streaming.features.tables import read_manifest
from streaming.job_metrics import FEATURES_JOB, metrics_file, read_previous, write_job_metrics

logger = logging.getLogger(__name__)

FEATURES_METRICS = "features"  # <data_dir>/metrics/features.prom

LAST_SUCCESS = "streamrec_features_last_success_timestamp_seconds"
LAST_RUN = "streamrec_features_last_run_timestamp_seconds"
LAST_RUN_OK = "streamrec_features_last_run_ok"
LAST_DURATION = "streamrec_features_last_duration_seconds"
LAST_ROWS = "streamrec_features_last_rows"
LAST_FILES = "streamrec_features_last_files_read"
VERSION = "streamrec_features_version"


def features_registry(*, last_success: float, last_run: float, ok: bool, duration_s: float, rows: int,
                      files: int, version: int) -> CollectorRegistry:
    """The feature job's metrics of one run end (times in Unix seconds; 0 = never)."""
    r = CollectorRegistry()
    for name, doc, value in (
        (LAST_SUCCESS, "end time of the last successful feature run (0: none recorded yet)", last_success),
        (LAST_RUN, "end time of the last feature run, successful or not", last_run),
        (LAST_RUN_OK, "1 if the last feature run succeeded, else 0", 1 if ok else 0),
        (LAST_DURATION, "duration of the last feature run", duration_s),
        (LAST_ROWS, "event rows read by the last feature run", rows),
        (LAST_FILES, "offline log files read by the last feature run", files),
        (VERSION, "feature version the last successful run produced (or found live, with nothing new)", version),
    ):
        Gauge(name, doc, registry=r).set(value)
    return r


def record_features_run(settings: Any, *, started: float, result: Any = None, live_version: int | None = None) -> None:
    """Record one run of the feature job that started at `started` (Unix s) and ends now: `result`
    (a FeatureRunResult) for a success, None for a failure (`live_version`: the live feature
    version then, used when no previous file says which version the last success produced).
    Never raises: the job's outcome must not depend on its metrics (a failure is logged)."""
    ended = time.time()
    try:
        path = metrics_file(settings, FEATURES_METRICS)
        if result is not None:
            reg = features_registry(last_success=ended, last_run=ended, ok=True, duration_s=ended - started,
                                    rows=result.new_events, files=result.new_files, version=result.version)
        else:
            prev = read_previous(path)
            last_success = (prev.value(LAST_SUCCESS) if prev else None) or 0.0
            version = prev.value(VERSION) if prev else None
            reg = features_registry(last_success=last_success, last_run=ended, ok=False, duration_s=ended - started,
                                    rows=0, files=0, version=int(version if version is not None else live_version or 0))
        # The live version's click attribution counters (streaming.features.attribution), whatever this run did.
        add_attribution_metrics(reg, (read_manifest(settings) or {}).get("attribution"))
        write_job_metrics(settings, FEATURES_METRICS, reg, job=FEATURES_JOB)
    except Exception as exc:  # a full disk, an unwritable metrics dir: the run itself is what matters
        logger.warning("could not write the feature job's metrics (%s: %s)", type(exc).__name__, exc)


__all__ = [
    "FEATURES_METRICS",
    "LAST_DURATION",
    "LAST_FILES",
    "LAST_ROWS",
    "LAST_RUN",
    "LAST_RUN_OK",
    "LAST_SUCCESS",
    "VERSION",
    "features_registry",
    "record_features_run",
]

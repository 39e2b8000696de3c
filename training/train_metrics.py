"""The trainer's outcome metrics (`train-<scene>.prom`, job `streamrec_train` grouped by scene),
written after every run by `streamrec train` and by the continuous trainer (`streamrec train-loop`);
streaming/job_metrics.py writes and pushes them.

A run's end (`training.train_run`'s outcome kinds, as `streamrec train --outcome-json` reports them)
maps onto four metric outcomes: published, refused (the gate), nothing_new (too little new data)
and failed. A `--no-publish` run is an experiment, not the trainer at work: it is not recorded, so
it cannot hide a trainer that stopped publishing.

What accumulates across runs -- runs by outcome, gate refusals in a row, the last success -- is
carried over from the previous file (`next_totals`), so one-shot runs (a CronJob's `streamrec
train`) add up as well as the loop's. The live adapter's validation NDCG@10 is read from its
manifest in the registry after the run (absent when the scene has no live adapter).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from streaming.job_metrics import TRAIN_JOB, JobMetrics, metrics_file, read_previous, write_job_metrics
from training.train_run import CANARY, FAILED, GATE_REFUSED, NOTHING_NEW, PUBLISHED

logger = logging.getLogger(__name__)

# the `outcome` label values, in the order the metrics list them
OUTCOME_PUBLISHED, OUTCOME_REFUSED, OUTCOME_NOTHING_NEW, OUTCOME_FAILED = "published", "refused", "nothing_new", "failed"
TRAIN_OUTCOMES = (OUTCOME_PUBLISHED, OUTCOME_REFUSED, OUTCOME_NOTHING_NEW, OUTCOME_FAILED)
METRIC_OUTCOME = {PUBLISHED: OUTCOME_PUBLISHED, GATE_REFUSED: OUTCOME_REFUSED, NOTHING_NEW: OUTCOME_NOTHING_NEW,
                  FAILED: OUTCOME_FAILED,  # train_run's outcome kind -> label; the others are not recorded
                  CANARY: OUTCOME_PUBLISHED}  # a canary is published (not live): training/canary.py has its metrics
LIVE_METRIC = "val_ndcg10"  # the manifest's metrics key of the validation NDCG@10

LAST_SUCCESS = "streamrec_train_last_success_timestamp_seconds"
LAST_RUN = "streamrec_train_last_run_timestamp_seconds"
LAST_DURATION = "streamrec_train_last_duration_seconds"
LAST_OUTCOME = "streamrec_train_last_outcome"
RUNS = "streamrec_train_runs_total"
REFUSALS_IN_A_ROW = "streamrec_train_gate_refusals_in_a_row"
LIVE_NDCG = "streamrec_train_live_ndcg_at_10"


def train_metrics_name(scene: str) -> str:
    """The metrics file's name of `scene`'s trainer: train-<scene> (.prom)."""
    return f"train-{scene}"


@dataclass(frozen=True)
class TrainTotals:
    """What carries over from run to run."""

    last_success: float  # Unix s; 0 = no run ended without error yet
    runs: dict[str, int]  # outcome label -> runs
    refusals_in_a_row: int


def next_totals(previous: JobMetrics | None, scene: str, outcome: str, ended: float) -> TrainTotals:
    """The totals after a run of `scene` that ended at `ended` with `outcome` (a TRAIN_OUTCOMES
    label), on top of the previous file's (None: the first run recorded). A refusal adds one to the
    refusals in a row, a publish resets them, nothing_new and failed leave them as they were (a
    failure says nothing about the gate)."""
    if outcome not in TRAIN_OUTCOMES:
        raise ValueError(f"outcome {outcome!r}: expected one of {TRAIN_OUTCOMES}")

    def prev(name: str, **labels: str) -> float:
        value = previous.value(name, scene=scene, **labels) if previous is not None else None
        return value if value is not None else 0.0

    runs = {o: int(prev(RUNS, outcome=o)) + (o == outcome) for o in TRAIN_OUTCOMES}
    refusals = {OUTCOME_REFUSED: int(prev(REFUSALS_IN_A_ROW)) + 1, OUTCOME_PUBLISHED: 0}.get(
        outcome, int(prev(REFUSALS_IN_A_ROW)))
    last_success = prev(LAST_SUCCESS) if outcome == OUTCOME_FAILED else ended
    return TrainTotals(last_success, runs, refusals)


def train_registry(scene: str, outcome: str, totals: TrainTotals, *, ended: float, duration_s: float,
                   live_ndcg: float | None) -> CollectorRegistry:
    """The trainer's metrics of one run end of `scene`."""
    r = CollectorRegistry()
    Gauge(LAST_SUCCESS, "end of the last training run that ended without error (published, gate refused, "
          "nothing new; 0: none recorded yet)", ["scene"], registry=r).labels(scene).set(totals.last_success)
    Gauge(LAST_RUN, "end of the last training run, whatever its outcome", ["scene"], registry=r).labels(scene).set(ended)
    Gauge(LAST_DURATION, "duration of the last training run", ["scene"], registry=r).labels(scene).set(duration_s)
    last = Gauge(LAST_OUTCOME, "1 for the outcome of the last training run, 0 for the others", ["scene", "outcome"],
                 registry=r)
    runs = Gauge(RUNS, "training runs by outcome, accumulated across runs in the metrics file (a gauge: each push "
                 "replaces the last)", ["scene", "outcome"], registry=r)
    for o in TRAIN_OUTCOMES:
        last.labels(scene, o).set(1 if o == outcome else 0)
        runs.labels(scene, o).set(totals.runs[o])
    Gauge(REFUSALS_IN_A_ROW, "consecutive gate refusals (reset by a publish)", ["scene"],
          registry=r).labels(scene).set(totals.refusals_in_a_row)
    live = Gauge(LIVE_NDCG, "validation NDCG@10 of the live adapter (from its manifest; absent: no live adapter)",
                 ["scene"], registry=r)
    if live_ndcg is not None:
        live.labels(scene).set(live_ndcg)
    return r


def live_ndcg(settings: Any, scene: str) -> float | None:
    """Validation NDCG@10 of `scene`'s live adapter, from its manifest; None when there is no live
    adapter, it has no such metric, or the registry cannot be read now (logged)."""
    from training.registry import Registry, RegistryError

    try:
        info = Registry(settings.registry_uri).current(scene)
    except (RegistryError, OSError) as exc:
        logger.warning("could not read scene %r's live adapter for the trainer's metrics (%s: %s)", scene,
                       type(exc).__name__, exc)
        return None
    value = ((info.manifest.get("metrics") or {}) if info is not None else {}).get(LIVE_METRIC)
    return float(value) if value is not None else None


def record_train_run(settings: Any, scene: str, kind: str, *, started: float) -> None:
    """Record one training run of `scene` that started at `started` (Unix s), ends now and ended as
    `kind` (training.train_run's outcome kind). Kinds without a metric outcome (--no-publish) are
    not recorded. Never raises: a run's outcome must not depend on its metrics (a failure is logged)."""
    outcome = METRIC_OUTCOME.get(kind)
    if outcome is None:
        return
    ended = time.time()
    try:
        name = train_metrics_name(scene)
        totals = next_totals(read_previous(metrics_file(settings, name)), scene, outcome, ended)
        reg = train_registry(scene, outcome, totals, ended=ended, duration_s=max(0.0, ended - started),
                             live_ndcg=live_ndcg(settings, scene))
        write_job_metrics(settings, name, reg, job=TRAIN_JOB, grouping_key={"scene": scene})
    except Exception as exc:  # a full disk, an unwritable metrics dir: the run itself is what matters
        logger.warning("could not write the trainer's metrics of scene %r (%s: %s)", scene, type(exc).__name__, exc)


__all__ = [
    "LAST_DURATION",
    "LAST_OUTCOME",
    "LAST_RUN",
    "LAST_SUCCESS",
    "LIVE_METRIC",
    "LIVE_NDCG",
    "METRIC_OUTCOME",
    "REFUSALS_IN_A_ROW",
    "RUNS",
    "TRAIN_OUTCOMES",
    "TrainTotals",
    "live_ndcg",
    "next_totals",
    "record_train_run",
    "train_metrics_name",
    "train_registry",
]

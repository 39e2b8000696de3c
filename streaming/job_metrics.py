"""Outcome metrics of the batch runs (the feature job, the trainer): written after every run to
`<data_dir>/metrics/<name>.prom` and pushed to a Prometheus Pushgateway when one is configured.

A batch run has no process left to scrape when Prometheus comes by, so each run leaves its outcome
behind in two places:

* a file in the Prometheus text format (`metrics_file`), replaced atomically (a reader never sees
  half of one), which `streamrec status` reads (`read_job_metrics`), a node-exporter textfile
  collector can export, and the next run reads to carry totals over (last success, runs by outcome);
* the Pushgateway at `STREAMREC_PUSHGATEWAY_URL` (grouping key job=<job>[, scene=<scene>]), when
  set. The push is best effort: a failure is logged at WARNING and counted in
  `streamrec_metrics_push_failures_total{job}` (the process's default registry), and never fails
  the run -- the file is written first, and the staleness alerts catch a gateway that stays away.

The metric names of each run are fixed in the metric contract (see README's monitoring section):
`streaming/features/run_metrics.py` (the feature job), `training/train_metrics.py` (the trainer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, generate_latest, push_to_gateway
from prometheus_client.parser import text_string_to_metric_families

from streaming.versioned_store import atomic_write_bytes, is_temp_name

logger = logging.getLogger(__name__)

METRICS_SUFFIX = ".prom"
PUSH_TIMEOUT_S = 5.0  # an unreachable gateway delays the end of a run by at most this, once
FEATURES_JOB = "streamrec_features"  # the push's job label of the feature job
TRAIN_JOB = "streamrec_train"  # ... and of the trainer (grouped by scene too)

# In the process's default registry (prometheus_client.REGISTRY), for a long-running process that
# exports it; for a one-shot command the WARNING line is what tells.
PUSH_FAILURES = Counter("streamrec_metrics_push_failures_total",
                        "pushes of a batch run's outcome metrics to the Pushgateway that failed", ["job"])


class MetricsFileError(ValueError):
    """A metrics file that exists but does not parse as the Prometheus text format."""


def metrics_file(settings: Any, name: str) -> Path:
    """Where the outcome metrics of run `name` ("features", "train-<scene>") live."""
    return Path(settings.metrics_dir) / f"{name}{METRICS_SUFFIX}"


def list_job_metrics(settings: Any) -> dict[str, Path]:
    """Name -> file of every batch run's metrics file (e.g. {"features": ..., "train-default": ...})."""
    root = Path(settings.metrics_dir)
    if not root.is_dir():
        return {}
    return {p.name[: -len(METRICS_SUFFIX)]: p for p in sorted(root.iterdir())
            if p.is_file() and p.name.endswith(METRICS_SUFFIX) and not is_temp_name(p.name)}


def write_job_metrics(settings: Any, name: str, registry: CollectorRegistry, *, job: str,
                      grouping_key: Mapping[str, str] | None = None) -> Path:
    """Write `registry` to `metrics_file(settings, name)` (atomically), then push it to the
    Pushgateway when `settings.pushgateway_url` is set (see `push_job_metrics`). Raises only for
    the file (OSError); the callers decide that a run does not fail for its metrics."""
    path = atomic_write_bytes(metrics_file(settings, name), generate_latest(registry))
    if settings.pushgateway_url:
        push_job_metrics(settings.pushgateway_url, registry, job=job, grouping_key=grouping_key)
    return path


def push_job_metrics(url: str, registry: CollectorRegistry, *, job: str,
                     grouping_key: Mapping[str, str] | None = None) -> bool:
    """Push `registry` to the Pushgateway at `url`, replacing the group job=`job` + `grouping_key`.
    False (logged at WARNING, counted in PUSH_FAILURES) when that fails: never raises."""
    try:
        push_to_gateway(url, job=job, registry=registry, grouping_key=dict(grouping_key or {}),
                        timeout=PUSH_TIMEOUT_S)
    except Exception as exc:  # any failure of a best-effort push (refused, timeout, 4xx/5xx, a bad URL)
        PUSH_FAILURES.labels(job).inc()
        logger.warning("could not push the %s metrics to the Pushgateway at %s (%s: %s); the run's metrics "
                       "file is written all the same", job, url, type(exc).__name__, exc)
        return False
    return True


@dataclass(frozen=True)
class JobMetrics:
    """A parsed metrics file: sample name -> [(labels, value)], and the file's modification time."""

    path: Path | None
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    modified: float | None = None

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the first sample `name` whose labels include `labels`; None when there is none."""
        for have, value in self.samples.get(name, ()):
            if all(have.get(k) == v for k, v in labels.items()):
                return value
        return None

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of `name`: [(labels, value)]."""
        return list(self.samples.get(name, ()))


def parse_job_metrics(text: str, source: str = "<text>") -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of Prometheus text `text`; MetricsFileError naming `source`."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as exc:  # what the parser raises for a malformed line
        raise MetricsFileError(f"{source}: not Prometheus text format ({type(exc).__name__}: {exc}); the next "
                               "run of its job rewrites it (or delete it)") from None
    return samples


def read_job_metrics(path: str | Path) -> JobMetrics | None:
    """The metrics file at `path` parsed; None when it does not exist (that run never ended here);
    MetricsFileError when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise MetricsFileError(f"{path}: not UTF-8 text ({exc})") from None
    return JobMetrics(path, parse_job_metrics(text, str(path)), modified)


def read_previous(path: Path) -> JobMetrics | None:
    """The previous run's file for carrying values over; a malformed one is logged and ignored
    (the run then starts its totals afresh rather than failing)."""
    try:
        return read_job_metrics(path)
    except (MetricsFileError, OSError) as exc:
        logger.warning("ignoring the previous metrics file: %s", exc)
        return None


__all__ = [
    "FEATURES_JOB",
    "METRICS_SUFFIX",
    "PUSH_FAILURES",
    "PUSH_TIMEOUT_S",
    "TRAIN_JOB",
    "JobMetrics",
    "MetricsFileError",
    "list_job_metrics",
    "metrics_file",
    "parse_job_metrics",
    "push_job_metrics",
    "read_job_metrics",
    "read_previous",
    "write_job_metrics",
]

"""What `streamrec ingest` tells Prometheus and Kubernetes: GET /metrics and GET /healthz on one port.

    STREAMREC_INGEST_METRICS_PORT=9310 streamrec ingest     # default; 0 turns the server off
    curl -s localhost:9310/metrics | grep ^streamrec_ingest
    curl -s localhost:9310/healthz                          # 200 "ok ...", or 503 and the reason

The names, types and labels are the metric contract of the alerts, the dashboard and `streamrec
status` (README, "Monitoring"): records per topic/partition, DLQ records by reason, the latency of
a batch applied to Redis / written to the log and of a commit, consumer lag, the last commit, the
assigned partitions, the rewinds after a Redis that lost its last second, and -- when this process
runs the feature job on its timer -- the feature runs it started.

Cost: the consume loop updates them once per polled batch (per partition), never per record; the
lag is refreshed every `LAG_REFRESH_S`; `seconds_since_last_commit` is computed when scraped.

`/healthz` is the ingest pods' liveness and readiness probe: 200 while the consume loop has polled
within `liveness_bound_s(settings)` (at least `LIVENESS_STALL_S`, and `LIVENESS_POLL_INTERVALS`
times Kafka's max.poll.interval: a loop that has not polled for that long has long lost its
partitions and is hung, e.g. on a Redis that stopped answering), else 503 with a one-line reason.

Port: one ingest process per pod under Kubernetes, so the fixed default suits the PodMonitor.
On one machine, `streamrec up` hands its ingest the configured port when it is free and a free
one otherwise (and prints which); the tests' settings (`tests/streaming/helpers.py`) turn it off
(0) and tests that scrape pick a free port, so concurrent ingest processes never collide. A port
that is taken is a configuration error naming STREAMREC_INGEST_METRICS_PORT (`MetricsPortError`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

LIVENESS_STALL_S = 60.0  # /healthz fails when the loop has not polled for this long (at least) ...
LIVENESS_POLL_INTERVALS = 3  # ... or for this many max.poll.interval.ms, whichever is longer
LAG_REFRESH_S = 2.0  # consumer lag and assigned partitions are recomputed this often, not per batch
LAG_POSITION_TIMEOUT_MS = 100  # a partition whose position is not known yet is skipped, not waited for
# Kubernetes probes and Prometheus reach the pod on its own address, so the server listens on all
# interfaces (it serves read-only numbers).
METRICS_BIND_HOST = "0.0.0.0"
PORT_VARIABLE = "STREAMREC_INGEST_METRICS_PORT"

# Seconds. A Redis batch takes ~1-50 ms, a log file ~10-500 ms, a commit ~1-20 ms on a healthy stack.
APPLY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

OUTPUT_REDIS, OUTPUT_LOG = "redis", "log"
RUN_OK, RUN_FAILED = "ok", "failed"


class MetricsPortError(RuntimeError):
    """The metrics port cannot be bound; the message names STREAMREC_INGEST_METRICS_PORT."""


def liveness_bound_s(max_poll_interval_ms: int) -> float:
    """Seconds without a poll after which /healthz reports the consume loop as stuck."""
    return max(LIVENESS_STALL_S, LIVENESS_POLL_INTERVALS * max_poll_interval_ms / 1000)


class IngestMetrics:
    """The metrics of one ingest process, in a registry of its own (several `Ingestor`s in one
    process, as in tests, never clash); `exposition()` adds the process's default registry
    (process CPU/memory, and the Pushgateway failures of feature runs started here).

    `features_timer`: export the feature-run metrics (only when this process runs the feature job
    on its timer; otherwise a never-updated last-success time would look stale to the alerts)."""

    def __init__(self, *, liveness_bound_s: float = LIVENESS_STALL_S, features_timer: bool = False,
                 features_last_success: float = 0.0) -> None:
        self.registry = r = CollectorRegistry()
        self.liveness_bound_s = liveness_bound_s
        self.started = time.time()
        self.last_poll = time.monotonic()  # written by the consume loop once per poll
        self.stopped: str | None = None
        self.last_commit = 0.0
        self.records = Counter("streamrec_ingest_records_total", "records consumed (good and bad)",
                               ["topic", "partition"], registry=r)
        self.dlq = Counter("streamrec_ingest_dlq_records_total",
                           "records sent to the DLQ, by reason code (streaming/events.py)", ["reason"], registry=r)
        self.apply_seconds = Histogram("streamrec_ingest_apply_seconds",
                                       "latency of applying one partition batch to Redis (output=redis) or of "
                                       "writing one log file (output=log)", ["output"], buckets=APPLY_BUCKETS_S,
                                       registry=r)
        self.commit_seconds = Histogram("streamrec_ingest_commit_seconds", "latency of one offset commit",
                                        buckets=COMMIT_BUCKETS_S, registry=r)
        self.lag = Gauge("streamrec_ingest_consumer_lag",
                         "high-water mark minus position, per partition, from the consumer's fetch metadata "
                         f"(refreshed every {LAG_REFRESH_S:g} s). The embedded broker (Tansu) under-reports its "
                         "high-water marks, so there this reads low: use it on a real Kafka.",
                         ["topic", "partition"], registry=r)
        self.last_commit_ts = Gauge("streamrec_ingest_last_commit_timestamp_seconds",
                                    "Unix time of the last successful offset commit (0 before the first)", registry=r)
        since = Gauge("streamrec_ingest_seconds_since_last_commit",
                      "seconds since the last successful commit (since the process started, before the first); "
                      "computed when scraped", registry=r)
        since.set_function(lambda: time.time() - (self.last_commit or self.started))
        self.assigned = Gauge("streamrec_ingest_assigned_partitions", "partitions this process holds",
                              ["topic"], registry=r)
        self.forgotten = Counter("streamrec_ingest_forgotten_events_total",
                                 "events refused because their user asked to be forgotten (streamrec forget)",
                                 registry=r)
        self.tombstones = Counter("streamrec_ingest_tombstones_applied_total",
                                  "forget tombstones this process applied (online state, log rows)", registry=r)
        self.rewinds = Counter("streamrec_ingest_redis_rewinds_total",
                               "partitions sought back to the Redis watermark + 1 at assignment, because Redis "
                               "had lost offsets that Kafka had committed (it lost its last second)",
                               ["topic", "partition"], registry=r)
        self.features_runs = self.features_last_success = None
        if features_timer:
            self.features_runs = Counter("streamrec_features_runs_total",
                                         "feature job runs started by this ingest process, by outcome", ["outcome"],
                                         registry=r)
            for outcome in (RUN_OK, RUN_FAILED):
                self.features_runs.labels(outcome)
            self.features_last_success = Gauge("streamrec_features_last_success_timestamp_seconds",
                                               "end time of the last successful feature run (this process's, or "
                                               "the one recorded in features.prom when it started)", registry=r)
            self.features_last_success.set(features_last_success)
        self.redis_apply = self.apply_seconds.labels(OUTPUT_REDIS)
        self.log_write = self.apply_seconds.labels(OUTPUT_LOG)
        self._records_of: dict[Any, Any] = {}
        self._dlq_seen: Tally = Tally()
        self._dlq_total = 0
        self._lag_labels: set[tuple[str, str]] = set()
        self._topics: set[str] = set()

    # --- updates from the consume loop (once per batch, never per record) ----------------------
    def consumed(self, tp: Any, n: int) -> None:
        child = self._records_of.get(tp)
        if child is None:
            child = self._records_of[tp] = self.records.labels(tp.topic, str(tp.partition))
        child.inc(n)

    def sync_dlq(self, total: int, by_reason: Mapping[str, int]) -> None:
        """Catch the DLQ counters up with the ingestor's running totals (cheap when nothing changed)."""
        if total == self._dlq_total:
            return
        self._dlq_total = total
        for reason, n in by_reason.items():
            delta = n - self._dlq_seen[reason]
            if delta:
                self.dlq.labels(reason).inc(delta)
                self._dlq_seen[reason] = n

    def committed(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.last_commit = time.time()
        self.last_commit_ts.set(self.last_commit)

    def rewound(self, tp: Any) -> None:
        self.rewinds.labels(tp.topic, str(tp.partition)).inc()

    def refresh_partitions(self, consumer: Any, positions: Mapping[Any, int | None]) -> None:
        """Assigned partitions per topic and consumer lag, from `positions` (partition -> the offset
        after the last record processed, None when none was yet: then the consumer's position)."""
        per_topic = Tally(tp.topic for tp in positions)
        for topic in self._topics | set(per_topic):
            self.assigned.labels(topic).set(per_topic.get(topic, 0))
        self._topics |= set(per_topic)
        seen = set()
        for tp, position in positions.items():
            try:
                high = consumer.highwater(tp)
                if position is None:
                    position = consumer.position(tp, timeout_ms=LAG_POSITION_TIMEOUT_MS)
            except Exception as exc:  # revoked meanwhile, position not fetched yet: no sample this time
                log.debug("no lag for %s: %s", tp, exc)
                continue
            if high is None or position is None:
                continue
            labels = (tp.topic, str(tp.partition))
            self.lag.labels(*labels).set(max(high - position, 0))
            seen.add(labels)
        held = {(tp.topic, str(tp.partition)) for tp in positions}
        for labels in self._lag_labels - held:  # partitions given away: no stale lag left behind
            self.lag.remove(*labels)
        self._lag_labels = (self._lag_labels & held) | seen

    def feature_run(self, ok: bool) -> None:
        """One feature run this process started ended (`PeriodicFeatures.on_outcome`)."""
        if self.features_runs is None:
            return
        self.features_runs.labels(RUN_OK if ok else RUN_FAILED).inc()
        if ok:
            self.features_last_success.set(time.time())

    # --- what the server answers -------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(alive, one-line reason) for GET /healthz."""
        if self.stopped is not None:
            return False, f"ingest stopped: {self.stopped}"
        idle = time.monotonic() - self.last_poll
        if idle > self.liveness_bound_s:
            return False, (f"the consume loop has not polled Kafka for {idle:.0f} s (limit "
                           f"{self.liveness_bound_s:.0f} s): stuck, e.g. on a Redis or disk that stopped answering")
        return True, f"ok: last poll {idle:.1f} s ago"

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        if path == "/metrics":
            code, ctype, body = 200, CONTENT_TYPE_LATEST, metrics.exposition()
        elif path == "/healthz":
            ok, reason = metrics.health()
            code, ctype, body = (200 if ok else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
        else:
            code, ctype, body = 404, "text/plain; charset=utf-8", b"not found: GET /metrics or /healthz\n"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass  # probes and scrapes every few seconds would flood the ingest log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: IngestMetrics) -> None:
        self.metrics = metrics
        super().__init__(address, _Handler)


class MetricsServer:
    """The HTTP server of GET /metrics and GET /healthz, on a daemon thread; `close()` stops it."""

    def __init__(self, metrics: IngestMetrics, port: int, host: str = METRICS_BIND_HOST) -> None:
        try:
            self.httpd = _Server((host, port), metrics)
        except OSError as exc:
            raise MetricsPortError(
                f"{PORT_VARIABLE}={port}: cannot serve the ingest metrics there ({exc.strerror or exc}; another "
                f"`streamrec ingest` may hold it): set {PORT_VARIABLE} to a free port, or to 0 to turn the "
                "metrics server off") from None
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ingest-metrics", daemon=True)
        self.thread.start()
        log.info("ingest metrics on http://%s:%d/metrics (health: /healthz)", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def features_last_success_recorded(settings: Any) -> float:
    """The last successful feature run recorded in `<data_dir>/metrics/features.prom` (0: none), so
    an ingest restart does not reset the exported time to 0 (and make the feature job look stale)."""
    try:
        from streaming.features.run_metrics import FEATURES_METRICS, LAST_SUCCESS
        from streaming.job_metrics import metrics_file, read_previous

        previous = read_previous(metrics_file(settings, FEATURES_METRICS))
        return float((previous.value(LAST_SUCCESS) if previous else None) or 0.0)
    except Exception as exc:  # the metrics must never stop ingestion
        log.warning("could not read the feature job's last success time: %s", exc)
        return 0.0


def start_ingest_metrics(settings: Any) -> tuple[IngestMetrics, MetricsServer | None]:
    """The metrics of a `streamrec ingest` process, and their server on `settings.ingest_metrics_port`
    (None when it is 0). Raises MetricsPortError when the port cannot be bound."""
    timer = settings.features_interval_s > 0
    metrics = IngestMetrics(liveness_bound_s=liveness_bound_s(settings.max_poll_interval_ms), features_timer=timer,
                            features_last_success=features_last_success_recorded(settings) if timer else 0.0)
    port = settings.ingest_metrics_port
    return metrics, (MetricsServer(metrics, port) if port else None)


__all__ = [
    "APPLY_BUCKETS_S", "COMMIT_BUCKETS_S", "LAG_REFRESH_S", "LIVENESS_POLL_INTERVALS", "LIVENESS_STALL_S",
    "METRICS_BIND_HOST", "OUTPUT_LOG", "OUTPUT_REDIS", "PORT_VARIABLE", "IngestMetrics", "MetricsPortError",
    "MetricsServer", "features_last_success_recorded", "liveness_bound_s", "start_ingest_metrics",
]

"""Prometheus metrics of one API replica, and how an error that a replica survives is reported.

Each replica has a registry of its own (its `GET /metrics` exports it, every series labelled
`replica`), so that unit tests and several replicas in one process do not share counters.

A replica survives some errors on purpose -- Redis down (popularity fallback), a registry
that cannot be read this second, one malformed catalog record -- and keeps serving. Such an error
must not vanish: `ServeMetrics.survived` counts every one (`streamrec_background_errors_total{loop}`
for the follower loops, `streamrec_request_errors_total{what}` for a request answered in a degraded
way) and logs it at WARNING, at most once per `ERROR_LOG_INTERVAL_S` for each label, so a Redis
outage under load writes a line every half minute instead of one per request.

Requests refused before they ran are counted by reason (`refused`: 429 over an API key's rate
limit, 413/414/431 too large). Answers are counted by scene and source (`answered`: the fallback
share an alert watches), and the validation NDCG@10 of each version a scene serves is exported
when it is swapped in (`serving`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

ERROR_LOG_INTERVAL_S = 30.0  # per label: the first error is logged at once, the next ones at most this often
LATENCY_BUCKETS_S = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)

# the follower loops of a replica (label `loop` of streamrec_background_errors_total)
BACKGROUND_LOOPS = ("registry", "catalog", "popularity", "heartbeat", "experiments")
# what a request does without (label `what` of streamrec_request_errors_total)
# ("rate_limit": Redis down, so the per-key limit was not enforced -- it fails open)
REQUEST_DEGRADATIONS = ("recent_items", "model", "genres", "trending", "replicas", "rate_limit")
# why a request was refused before it ran (label `reason` of streamrec_requests_refused_total)
REFUSAL_REASONS = ("rate_limit", "body_too_large", "query_too_long", "headers_too_large")
# where an answer to /v1/recommend came from (label `source` of streamrec_recommendations_total)
SOURCE_MODEL, SOURCE_FALLBACK = "model", "fallback"
ANSWER_SOURCES = (SOURCE_MODEL, SOURCE_FALLBACK)
# why an impression record was dropped (label `reason` of streamrec_impressions_dropped_total)
IMPRESSION_DROP_REASONS = ("buffer_full", "kafka_error", "serialize")


class ServeMetrics:
    def __init__(self, replica: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        r = self.registry = CollectorRegistry()
        # process_resident_memory_bytes & co. of the replica: an index of 10^6 items is its largest
        # allocation, and two versions are held during a swap
        ProcessCollector(registry=r)
        self.latency = Histogram("streamrec_request_seconds", "request latency", ["route"], registry=r,
                                 buckets=LATENCY_BUCKETS_S)
        self.requests = Counter("streamrec_requests_total", "answers by route and status, errors included (route `unmatched`: a path no route has)", ["route", "status"],
                                registry=r)
        self.version = Gauge("streamrec_active_adapter", "1 for the active version of each scene",
                             ["scene", "version"], registry=r)
        self.reloads = Counter("streamrec_adapter_reloads_total", "adapter versions swapped in", ["scene"], registry=r)
        self.reload_failures = Counter("streamrec_adapter_reload_failures_total", "versions refused", ["scene"],
                                       registry=r)
        self.fallbacks = Counter("streamrec_fallbacks_total", "answers not from the model", ["kind"], registry=r)
        self.index_size = Gauge("streamrec_index_items", "items in the active index", ["scene"], registry=r)
        self.adapters_loaded = Gauge("streamrec_adapters_loaded", "adapter versions this replica holds in memory "
                                     "(live, loading, experiment candidates; a replaced one until the sweep drops it)",
                                     registry=r)
        self.catalog_items_added = Counter("streamrec_catalog_items_added_total",
                                           "new catalog items added to the active indexes", registry=r)
        self.catalog_upsert_seconds = Counter(
            "streamrec_catalog_upsert_seconds_total",
            "seconds spent adding new catalog items: `embed` (the item tower over their text), `index` (FAISS + rank state)",
            ["stage"], registry=r)
        self.index_recall = Gauge("streamrec_index_recall", "recall@100 of the active index vs exact search, measured when the version was published (1 = exact)",
                                  ["scene"], registry=r)
        self.background_errors = Counter(
            "streamrec_background_errors_total",
            "errors a follower loop survived (Redis or registry unreachable, a malformed record, a load to retry)",
            ["loop"], registry=r)
        self.request_errors = Counter(
            "streamrec_request_errors_total",
            "errors a request survived by answering without something (recent items, the model, the genre filter, ...)",
            ["what"], registry=r)
        self.ready = Gauge("streamrec_replica_ready", "1 once every scene of the registry's live set is loaded or on "
                           "fallback on this replica (GET /readyz)", registry=r)
        self.scene_fallback = Gauge("streamrec_scene_fallback", "1 for a live scene no version of which can answer on "
                                    "this replica: its answers come from the popular/trending fallback", ["scene"],
                                    registry=r)
        self.replica = Gauge("streamrec_replica_info", "the replica these metrics come from", ["replica"], registry=r)
        self.recommendations = Counter(
            "streamrec_recommendations_total",
            "answers to /v1/recommend by where they came from (source: model or fallback); the fallback share is "
            "fallback / all", ["scene", "source"], registry=r)
        self.adapter_ndcg = Gauge("streamrec_active_adapter_ndcg_at_10", "validation NDCG@10 of the version this "
                                  "replica serves (from its manifest)", ["scene", "version"], registry=r)
        self.refusals = Counter(
            "streamrec_requests_refused_total",
            "requests refused before they ran: 429 over the API key's rate limit (rate_limit), 413/414/431 too large "
            "(body_too_large, query_too_long, headers_too_large)", ["reason"], registry=r)
        self.impressions_written = Counter(
            "streamrec_impressions_written_total",
            "impression records (one per recommendation answer) the broker acknowledged (services/impressions.py)",
            registry=r)
        self.impressions_dropped = Counter(
            "streamrec_impressions_dropped_total",
            "impression records dropped, never retried and never failing the request: buffer_full (the replica's "
            "STREAMREC_IMPRESSION_BUFFER_MAX records were waiting), kafka_error (Kafka unreachable or no "
            "acknowledgement in time), serialize (not JSON)", ["reason"], registry=r)
        # (scene, source) -> its counter child: `answered` runs on every request, `labels()` takes a lock
        self._answers: dict[tuple[str, str], Any] = {}
        self.replica.labels(replica).set(1)
        self.replica_id = replica
        for loop in BACKGROUND_LOOPS:  # exported at 0 from the start: an alert can use rate() at once
            self.background_errors.labels(loop)
        for what in REQUEST_DEGRADATIONS:
            self.request_errors.labels(what)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for reason in IMPRESSION_DROP_REASONS:
            self.impressions_dropped.labels(reason)
        self._clock = clock
        self._log_lock = threading.Lock()  # catalog work runs in threads
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def exposition(self) -> bytes:
        """This replica's `GET /metrics` body: every series labelled `replica`. On Kubernetes a worker
        pod's port is answered by any of its replicas, one per scrape; without the label their counters
        would look like one series that keeps resetting, and rates over them would be wrong."""
        return generate_latest(_ReplicaLabelled(self.registry, self.replica_id))

    def answered(self, scene: str, source: str) -> None:
        """Count one /v1/recommend answer for `scene` from `source` (SOURCE_MODEL or SOURCE_FALLBACK)."""
        child = self._answers.get((scene, source))
        if child is None:
            if source not in ANSWER_SOURCES:
                raise ValueError(f"unknown answer source {source!r}: expected one of {ANSWER_SOURCES}")
            child = self._answers[(scene, source)] = self.recommendations.labels(scene, source)
        child.inc()

    def refused(self, reason: str) -> None:
        """Count one request refused before it ran (a REFUSAL_REASONS entry)."""
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}: expected one of {REFUSAL_REASONS}")
        self.refusals.labels(reason).inc()

    def serving(self, scene: str, version: str, previous: str | None, ndcg_at_10: float | None) -> None:
        """`scene` now serves `version` (was `previous`): its validation NDCG@10 replaces the previous
        version's series (absent when the manifest has none), and the scene's answer counters are
        exported at 0 so a rate() of the fallback share exists from the start."""
        if previous is not None and previous != version:
            self.adapter_ndcg.remove(scene, previous)  # (a no-op when it was never set)
        if ndcg_at_10 is not None:
            self.adapter_ndcg.labels(scene, version).set(ndcg_at_10)
        else:
            self.adapter_ndcg.remove(scene, version)
        for source in ANSWER_SOURCES:
            self.recommendations.labels(scene, source)

    def survived(self, where: str, exc: BaseException, what: str, *, level: int = logging.WARNING) -> None:
        """Count `exc`, which `where` (a background loop or a request degradation) survived, and log
        `what` happened (rate-limited per `where`)."""
        if where in BACKGROUND_LOOPS:
            self.background_errors.labels(where).inc()
        elif where in REQUEST_DEGRADATIONS:
            self.request_errors.labels(where).inc()
        else:
            raise ValueError(f"unknown error site {where!r}: expected one of {BACKGROUND_LOOPS + REQUEST_DEGRADATIONS}")
        now = self._clock()
        with self._log_lock:
            last = self._last_logged.get(where)
            if last is not None and now - last < ERROR_LOG_INTERVAL_S:
                self._unlogged[where] = self._unlogged.get(where, 0) + 1
                return
            self._last_logged[where] = now
            skipped = self._unlogged.pop(where, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        logger.log(level, "%s: %s (%s: %s)%s", where, what, type(exc).__name__, exc, more)


class _ReplicaLabelled:
    """A collector view of `registry` whose samples all carry `replica` (kept where one already does)."""

    def __init__(self, registry: CollectorRegistry, replica: str) -> None:
        self.registry, self.replica = registry, replica

    def collect(self):
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s if "replica" in s.labels else s._replace(labels={**s.labels, "replica": self.replica})
                                for s in family.samples]
            yield labelled


__all__ = ["ANSWER_SOURCES", "BACKGROUND_LOOPS", "ERROR_LOG_INTERVAL_S", "IMPRESSION_DROP_REASONS", "REFUSAL_REASONS",
           "REQUEST_DEGRADATIONS", "SOURCE_FALLBACK", "SOURCE_MODEL", "ServeMetrics"]

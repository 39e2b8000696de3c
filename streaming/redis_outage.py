"""Living through a Redis outage in `streamrec ingest`: the back-off, and the one log line each way.

When Redis stops answering (killed, restarting, loading its AOF, a network cut), ingest does not
exit: it pauses its partitions (it keeps polling, so it stays in the consumer group), commits
nothing, and asks Redis again after a back-off that doubles from `BACKOFF_FIRST_S` up to
`BACKOFF_MAX_S`. The outage is logged once at WARNING when it starts (`RedisOutage`) and once at
INFO when Redis answers again, with its duration; the retries in between log at DEBUG only.

Metrics (on ingest's registry, `outage_metrics`): `streamrec_ingest_redis_up` (0 during an outage),
`streamrec_ingest_redis_outages_total`, `streamrec_ingest_redis_down_seconds_total`.

What ingest then does to come out exact is `Ingestor.resync_after_outage` (`streaming.ingest`):
every held partition is sought back to the first offset that Redis or the log may lack, and the
idempotent writers skip what they already hold.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge

# First wait after Redis failed, then doubling up to the cap: a restart that takes a second is
# caught within a fraction of one; a long outage costs one PING per cap interval.
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
BACKOFF_FACTOR = 2.0


def backoff_delays(first_s: float = BACKOFF_FIRST_S, cap_s: float = BACKOFF_MAX_S,
                   factor: float = BACKOFF_FACTOR) -> Iterator[float]:
    """Seconds to wait before each retry: first_s, doubling, capped at cap_s (endless)."""
    delay = min(first_s, cap_s)
    while True:
        yield delay
        delay = min(delay * factor, cap_s)


class OutageMetrics:
    """The outage metrics of one registry (ingest's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("streamrec_ingest_redis_up", "1 while Redis answers ingest, 0 while ingest waits out an "
                        "outage (paused, committing nothing)", registry=registry)
        self.up.set(1)
        self.outages = Counter("streamrec_ingest_redis_outages_total", "Redis outages ingest waited out (or is "
                               "waiting out)", registry=registry)
        self.down_seconds = Counter("streamrec_ingest_redis_down_seconds_total", "seconds ingest spent waiting "
                                    "for Redis, counted when each outage ends", registry=registry)


_METRICS: "weakref.WeakKeyDictionary[CollectorRegistry, OutageMetrics]" = weakref.WeakKeyDictionary()


def outage_metrics(registry: CollectorRegistry) -> OutageMetrics:
    """The outage metrics registered on `registry` (made on first use, once per registry)."""
    if registry not in _METRICS:
        _METRICS[registry] = OutageMetrics(registry)
    return _METRICS[registry]


class RedisOutage:
    """One outage as a log sees it: `__init__` logs the WARNING, `retry_failed` logs at DEBUG,
    `end` logs the INFO line with the outage's duration and returns it (seconds)."""

    def __init__(self, log: logging.Logger, where: str, exc: BaseException, cap_s: float,
                 metrics: OutageMetrics | None = None) -> None:
        self.log, self.where, self.metrics = log, where, metrics
        self.started = time.monotonic()
        self.retries = 0
        if metrics is not None:
            metrics.up.set(0)
            metrics.outages.inc()
        log.warning("Redis at %s stopped answering (%s: %s): ingest pauses -- nothing is committed past what Redis "
                    "holds -- and retries with back-off (every %.1f s at most); it resumes by itself when Redis "
                    "answers", where, type(exc).__name__, exc, cap_s)

    def retry_failed(self, exc: BaseException) -> None:
        self.retries += 1
        self.log.debug("Redis still down after %.1f s (%s: %s)", time.monotonic() - self.started,
                       type(exc).__name__, exc)

    def end(self, detail: str | None) -> float:
        """Redis answers again (`detail`: what was done about it), or ingest stopped waiting (None)."""
        down_s = time.monotonic() - self.started
        if self.metrics is not None:
            self.metrics.down_seconds.inc(down_s)
            if detail is not None:
                self.metrics.up.set(1)
        if detail is None:
            return down_s
        self.log.info("Redis at %s answers again after %.1f s down (%d retries); %s", self.where, down_s,
                      self.retries, detail)
        return down_s


__all__ = ["BACKOFF_FACTOR", "BACKOFF_FIRST_S", "BACKOFF_MAX_S", "OutageMetrics", "RedisOutage", "backoff_delays",
           "outage_metrics"]

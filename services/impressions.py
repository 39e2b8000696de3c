"""Impressions: what each recommendation answer showed, written to Kafka without ever slowing a request.

One record per answer (the contract: `streaming.events.Impression`, built by `services/serve_app.py`)
goes to `STREAMREC_IMPRESSIONS_TOPIC`, keyed by the user's pseudonym. Ingest logs the topic
(`log/<impressions topic>/`) and the feature job joins it with clicks by `request_id`.

The request path serializes the record and hands it to a confluent-kafka (librdkafka) producer
(`ImpressionWriter.write`: a few microseconds; it never raises and never blocks). librdkafka batches,
sends and retries from its own C threads; one daemon thread here only serves its callbacks
(`poll`), which count the outcome. Nothing is retried on the request path; a record is dropped and
counted (`streamrec_impressions_dropped_total{reason}`) when

* `buffer_full`: `STREAMREC_IMPRESSION_BUFFER_MAX` records are already waiting in the producer (queued
  or sent and not yet acknowledged) -- Kafka is slow or down;
* `kafka_error`: the broker did not acknowledge it within `MESSAGE_TIMEOUT_MS` (Kafka down at start
  included: librdkafka keeps trying to connect, the records wait and then time out), the producer
  refused it, or no producer could be made (a transport configuration librdkafka rejects);
* `serialize`: the record is not JSON (a non-finite score, an object) or its key is not text -- a bug
  of the caller.

`streamrec_impressions_written_total` counts the records the broker acknowledged.

Why confluent-kafka here while every other client of the project is kafka-python (both made by
`streaming.kafka_io`, so the transport settings apply alike): the request path cannot afford a Python
producer. kafka-python's `send` costs ~33 us of CPU per record, and its IO thread holds the GIL while
the request threads wait; with it (and a sender thread of our own) impressions cost the API ~10% of its
throughput (163 -> 146 req/s on 2 cores, `bench/serve.py --impressions-compare`) and p50 11.4 -> 12.1 ms.
confluent-kafka's `produce` costs ~2.4 us per record and librdkafka does the IO outside the GIL.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from services.metrics import IMPRESSION_DROP_REASONS, ServeMetrics
from streaming import kafka_io
from streaming.settings import Settings

logger = logging.getLogger(__name__)

# librdkafka batches records for this long before sending (throughput over a few ms of freshness).
LINGER_MS = 20
# A record the broker has not acknowledged this long after `write` is dropped (`kafka_error`);
# librdkafka's own retries and reconnects happen inside this time, on its threads.
MESSAGE_TIMEOUT_MS = 30_000
# The callback thread waits this long in each `poll`; the GIL is released while it waits.
POLL_S = 0.1
ERROR_LOG_INTERVAL_S = 30.0  # one WARNING per this many seconds about drops, and one about the client
JOIN_MARGIN_S = 1.0  # `close` waits this long past a poll for the callback thread to end

DROP_BUFFER_FULL, DROP_KAFKA_ERROR, DROP_SERIALIZE = IMPRESSION_DROP_REASONS

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


class _RateLimited:
    """One WARNING per ERROR_LOG_INTERVAL_S, with how many were held back since the last one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def due(self, n: int = 1) -> int | None:
        """The count to report when a WARNING is due now, else None (and `n` is held back)."""
        now = time.monotonic()
        with self._lock:
            self._held += n
            if self._last is not None and now - self._last < ERROR_LOG_INTERVAL_S:
                return None
            self._last, held, self._held = now, self._held, 0
            return held


class _ClientLog:
    """librdkafka's log lines (confluent-kafka's `logger`: served by `poll` on the callback thread) into
    this module's logger: a Kafka-down replica logs one WARNING per ERROR_LOG_INTERVAL_S, not one line
    to stderr per reconnect."""

    def __init__(self, limiter: _RateLimited) -> None:
        self._limiter = limiter

    def log(self, level: int, fmt: str, *args) -> None:
        if level >= logging.WARNING and (held := self._limiter.due()) is not None:
            logger.warning("impressions: Kafka client (%d messages since the last WARNING): " + fmt, held, *args)
        else:
            logger.debug("impressions: Kafka client: " + fmt, *args)


class ImpressionWriter:
    """`write(key, record)` from any thread, `close(timeout_s)` once. See the module's docstring."""

    def __init__(self, settings: Settings, metrics: ServeMetrics) -> None:
        self.settings = settings
        self.topic = settings.impressions_topic
        self.capacity = settings.impression_buffer_max
        self._written = metrics.impressions_written
        self._dropped = {reason: metrics.impressions_dropped.labels(reason) for reason in IMPRESSION_DROP_REASONS}
        self._drops_log = _RateLimited()
        self._client_log = _RateLimited()
        # records accepted and not yet settled: counted here, not `len(producer)`, which also counts
        # librdkafka's queued log lines and errors
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_callbacks, name="impressions", daemon=True)
        self._producer = None
        self._no_producer = "the writer is closed"  # why `write` drops with `kafka_error` when there is no producer
        try:
            self._producer = kafka_io.make_confluent_producer(settings, **self.producer_config())
        except Exception as exc:  # noqa: BLE001 (an impression never fails a replica: each write drops instead)
            self._no_producer = f"no producer: {exc}"
            logger.error("impressions: no producer, every impression will be dropped (kafka_error): %s", exc)
        else:
            self._thread.start()

    def producer_config(self) -> dict:
        """librdkafka's configuration of the writer's producer (the transport comes from kafka_io)."""
        return {
            "client.id": "streamrec-impressions",
            "queue.buffering.max.messages": self.capacity,  # beyond it `produce` refuses: buffer_full
            "linger.ms": LINGER_MS,
            "message.timeout.ms": MESSAGE_TIMEOUT_MS,
            # the leader's acknowledgement is enough for exposure data; idempotence (acks=all) is off: no
            # IdempotentWrite ACL needed
            "acks": 1,
            "enable.idempotence": False,
            "partitioner": "murmur2_random",  # the same partition for a key as kafka-python (and Java) picks
            "on_delivery": self._delivered,
            "error_cb": self._client_error,
            "logger": _ClientLog(self._client_log),
            "log.connection.close": False,  # a broker closing an idle connection is not news
        }

    # --- the request path -------------------------------------------------------------------
    def write(self, key: str | None, record: dict) -> bool:
        """Hand one impression to the producer; False when it was dropped (counted). Never raises or blocks."""
        try:
            value = _dumps(record).encode()
            raw_key = None if key is None else key.encode()
        except Exception:  # noqa: BLE001 (the guarantee: an impression never fails a request)
            self._dropped[DROP_SERIALIZE].inc()
            return False
        producer = self._producer
        if producer is None:
            self._drop(DROP_KAFKA_ERROR, self._no_producer)
            return False
        with self._lock:
            self._pending += 1
        try:
            producer.produce(self.topic, value, raw_key)
        except BufferError:
            self._unpend()
            self._dropped[DROP_BUFFER_FULL].inc()
            return False
        except Exception as exc:  # noqa: BLE001 (refused by the producer: too large, bad topic name)
            self._unpend()
            self._drop(DROP_KAFKA_ERROR, f"{type(exc).__name__}: {exc}")
            return False
        return True

    def pending(self) -> int:
        """Records handed to the producer and not yet settled (acknowledged or dropped)."""
        return self._pending

    # --- the callback thread (librdkafka's callbacks run inside `poll`) -------------------------
    def _serve_callbacks(self) -> None:
        producer = self._producer
        while not self._stop.is_set():
            try:
                producer.poll(POLL_S)
            except Exception:  # noqa: BLE001 (a bug in a callback: keep serving the others)
                logger.exception("impressions: a producer callback failed")
                self._stop.wait(POLL_S)

    def _delivered(self, err, _msg) -> None:
        self._unpend()
        if err is None:
            self._written.inc()
        else:
            self._drop(DROP_KAFKA_ERROR, str(err))

    def _client_error(self, err) -> None:
        if (held := self._client_log.due()) is not None:
            logger.warning("impressions: Kafka client (%d messages since the last WARNING): %s", held, err)
        else:
            logger.debug("impressions: Kafka client: %s", err)

    def _unpend(self) -> None:
        with self._lock:
            self._pending -= 1

    def _drop(self, reason: str, detail: str) -> None:
        self._dropped[reason].inc()
        if (dropped := self._drops_log.due()) is not None:
            logger.warning("impressions: %d records dropped (Kafka at KAFKA_BOOTSTRAP_SERVERS=%r, topic %r: %s); "
                           "requests are not affected, see streamrec_impressions_dropped_total",
                           dropped, self.settings.kafka_bootstrap_servers, self.topic, detail)

    # --- lifecycle --------------------------------------------------------------------------
    def close(self, timeout_s: float = 2.0) -> None:
        """Wait up to `timeout_s` for the broker to acknowledge what is pending, drop (and count) the rest,
        then stop. Later writes are dropped (`kafka_error`)."""
        self._stop.set()
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self._thread.join(POLL_S + JOIN_MARGIN_S)
        try:
            if producer.flush(timeout_s):  # flush serves the callbacks; what is left is not acknowledged
                producer.purge()
                producer.poll(0)  # their callbacks: kafka_error
        except Exception as exc:  # noqa: BLE001
            logger.debug("impressions: close: %s", exc)


__all__ = ["DROP_BUFFER_FULL", "DROP_KAFKA_ERROR", "DROP_SERIALIZE", "ERROR_LOG_INTERVAL_S", "LINGER_MS",
           "MESSAGE_TIMEOUT_MS", "POLL_S", "ImpressionWriter"]

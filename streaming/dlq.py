"""The dead-letter topic: writing it (`ErrorHandler`, ingest's one handler of bad records) and reading it.

Every record ingest refuses goes to `STREAMREC_DLQ_TOPIC` with its bytes (except an oversize payload)
and headers that say why and where it came from (`dlq.reason`, `dlq.detail`, `dlq.source.topic`,
`dlq.source.partition`, `dlq.source.offset`, `dlq.consumer.group`); `read_dlq` reads them back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kafka import TopicPartition

from streaming import kafka_io
from streaming.events import BadRecord
from streaming.settings import Settings

if TYPE_CHECKING:  # (ingest imports this module)
    from streaming.ingest import IngestStats

log = logging.getLogger(__name__)

PREVIEW_CHARS = 80
POLL_TIMEOUT_MS = 200
DLQ_HEADER_PREFIX = "dlq."


class ErrorHandler:
    """The one typed handler for per-record stream errors: every bad record goes to the DLQ.

    Headers carry `dlq.reason` (a stable code from `streaming.events`), `dlq.detail`,
    `dlq.source.topic`, `dlq.source.partition`, `dlq.source.offset`, `dlq.consumer.group`.
    """

    def __init__(self, producer, settings: Settings, stats: IngestStats):
        self.producer = producer
        self.settings = settings
        self.stats = stats

    def __call__(self, record, bad: BadRecord) -> None:
        headers = [
            (DLQ_HEADER_PREFIX + "reason", bad.reason.encode()),
            (DLQ_HEADER_PREFIX + "detail", bad.detail.encode("utf-8", "replace")),
            (DLQ_HEADER_PREFIX + "source.topic", record.topic.encode()),
            (DLQ_HEADER_PREFIX + "source.partition", str(record.partition).encode()),
            (DLQ_HEADER_PREFIX + "source.offset", str(record.offset).encode()),
            (DLQ_HEADER_PREFIX + "consumer.group", self.settings.consumer_group.encode()),
        ]
        # An oversize payload is kept out of the DLQ body too (it may exceed the topic's limit).
        value = record.value if bad.reason != "payload_too_large" else None
        self.producer.send(self.settings.dlq_topic, key=record.key, value=value, headers=headers)
        self.stats.bad += 1
        self.stats.bad_by_reason[bad.reason] += 1
        log.debug("DLQ %s[%d]@%d: %s %s", record.topic, record.partition, record.offset, bad.reason, bad.detail)


@dataclass(frozen=True)
class DlqEntry:
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None

    @property
    def preview(self) -> str:
        if self.value is None:
            return "<no payload>"
        text = self.value[:PREVIEW_CHARS].decode("utf-8", "backslashreplace")
        return text + ("..." if len(self.value) > PREVIEW_CHARS else "")


def read_dlq(settings: Settings, *, limit: int | None = None, idle_timeout_s: float = 3.0) -> list[DlqEntry]:
    """Read the DLQ from the beginning (no consumer group, nothing committed) until `limit`
    entries or `idle_timeout_s` seconds without one."""
    consumer = kafka_io.make_consumer(settings, group_id=None, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
        tps = [TopicPartition(settings.dlq_topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[DlqEntry] = []
        last = time.monotonic()
        while (limit is None or len(out) < limit) and time.monotonic() - last < idle_timeout_s:
            for records in consumer.poll(timeout_ms=POLL_TIMEOUT_MS).values():
                last = time.monotonic()
                out.extend(_entry(r) for r in records)
        return out[:limit] if limit is not None else out
    finally:
        consumer.close(autocommit=False)


def _entry(record) -> DlqEntry:
    h = {k[len(DLQ_HEADER_PREFIX):]: v.decode("utf-8", "replace") for k, v in (record.headers or []) if k.startswith(DLQ_HEADER_PREFIX)}
    return DlqEntry(
        reason=h.get("reason", "?"),
        detail=h.get("detail", ""),
        source_topic=h.get("source.topic", "?"),
        source_partition=int(h.get("source.partition", -1)),
        source_offset=int(h.get("source.offset", -1)),
        key=record.key,
        value=record.value,
    )

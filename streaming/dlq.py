"""Reading the dead-letter topic (what `streaming.ingest.ErrorHandler` wrote)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import TopicPartition

from streaming import kafka_io
from streaming.ingest import DLQ_HEADER_PREFIX
from streaming.settings import Settings

PREVIEW_CHARS = 80
POLL_TIMEOUT_MS = 200


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

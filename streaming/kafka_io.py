"""Kafka plumbing shared by the producer, the ingestion consumer and the tools.

All clients are kafka-python. The consumer never auto-commits: `streaming.ingest` commits
offsets itself, after its outputs are durable.
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streaming.settings import Settings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_MS = 30_000
PRODUCER_LINGER_MS = 5
PRODUCER_BATCH_BYTES = 512 * 1024
FETCH_MAX_BYTES = 64 * 1024 * 1024
PARTITION_FETCH_MAX_BYTES = 16 * 1024 * 1024
HEARTBEAT_INTERVAL_MS = 1000


class KafkaUnavailable(RuntimeError):
    """The configured Kafka cluster cannot be reached."""


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise KafkaUnavailable(
            "no Kafka address: set KAFKA_BOOTSTRAP_SERVERS or let the CLI start the embedded stack"
        )
    return settings.kafka_bootstrap_servers


def _unreachable(settings: Settings, exc: Exception) -> KafkaUnavailable:
    return KafkaUnavailable(
        f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers!r}: {exc}"
    )


def ensure_topics(settings: Settings) -> None:
    """Create the events, items and DLQ topics if they do not exist (idempotent)."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=_bootstrap(settings), request_timeout_ms=REQUEST_TIMEOUT_MS)
    except (KafkaError, OSError) as exc:
        raise _unreachable(settings, exc) from exc
    try:
        existing = set(admin.list_topics())
        wanted = [settings.events_topic, settings.items_topic, settings.dlq_topic]
        missing = [
            NewTopic(name, settings.topic_partitions, settings.topic_replication)
            for name in wanted
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
                log.info("created topics %s", [t.name for t in missing])
            except TopicAlreadyExistsError:
                pass  # another process won the race
    finally:
        admin.close()


def make_producer(settings: Settings, **overrides) -> KafkaProducer:
    """A producer that waits for all in-sync replicas: a send the producer calls done is durable."""
    config = dict(
        bootstrap_servers=_bootstrap(settings),
        acks="all",
        linger_ms=PRODUCER_LINGER_MS,
        batch_size=PRODUCER_BATCH_BYTES,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        retries=5,
    )
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except (KafkaError, OSError) as exc:
        raise _unreachable(settings, exc) from exc


def make_consumer(settings: Settings, *topics: str, **overrides) -> KafkaConsumer:
    """A group consumer with manual commits, tuned for micro-batches."""
    config = dict(
        bootstrap_servers=_bootstrap(settings),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_poll_records,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=min(HEARTBEAT_INTERVAL_MS, settings.session_timeout_ms // 3),
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_MAX_BYTES,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    config.update(overrides)
    try:
        consumer = KafkaConsumer(**config)
    except (KafkaError, OSError) as exc:
        raise _unreachable(settings, exc) from exc
    return consumer

"""Helpers shared by the streaming integration tests (real broker, real Redis)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pyarrow as pa

from streaming.events import EVENT_LOG_SCHEMA, ITEM_LOG_SCHEMA
from streaming.kafka_io import ensure_topics
from streaming.offline_log import OfflineLog, read_table
from streaming.redis_io import make_redis
from streaming.settings import Settings, load_settings

WAIT_POLL_S = 0.05


def isolated_settings(stack, data_dir: Path, **overrides) -> Settings:
    """Settings with topics, group and Redis prefix of their own, on the shared embedded stack."""
    tag = uuid.uuid4().hex[:8]
    values = dict(
        kafka_bootstrap_servers=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        data_dir=data_dir,
        events_topic=f"events-{tag}",
        items_topic=f"items-{tag}",
        dlq_topic=f"events-{tag}.dlq",
        consumer_group=f"ingest-{tag}",
        redis_prefix=f"t{tag}:",
        max_poll_interval_ms=3000,
        session_timeout_ms=3000,
        log_flush_interval_s=0.2,
        features_interval_s=0,
        ingest_metrics_port=0,  # ingest processes of concurrent tests must not collide on the metrics port
    )
    values.update(overrides)
    settings = load_settings(**values)
    ensure_topics(settings)
    return settings


def wait_for(condition, timeout_s: float, what: str):
    """Poll `condition()` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(WAIT_POLL_S)


def read_log(settings: Settings, topic: str | None = None) -> pa.Table:
    log = OfflineLog(settings.log_dir)
    topic = topic or settings.events_topic
    schema = ITEM_LOG_SCHEMA if topic == settings.items_topic else EVENT_LOG_SCHEMA
    return read_table(log, log.list_files(topic), schema)


def assert_no_overlap(settings: Settings, topic: str) -> None:
    files = OfflineLog(settings.log_dir).list_files(topic)
    last_end: dict[int, int] = {}
    for f in files:
        assert f.start > last_end.get(f.partition, -1), f"overlapping log files at {f}"
        last_end[f.partition] = f.end


def popularity_total(settings: Settings) -> int:
    r = make_redis(settings)  # the settings' credentials too
    return int(sum(score for _, score in r.zrange(f"{settings.redis_prefix}pop:all", 0, -1, withscores=True)))

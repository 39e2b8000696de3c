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
    # a test may name its own Redis (or broker) in the overrides: that one wins over the stack's
    return isolated_settings_at(overrides.pop("kafka_bootstrap_servers", stack.kafka_bootstrap),
                                overrides.pop("redis_url", stack.redis_url), data_dir, **overrides)


def isolated_settings_at(kafka_bootstrap: str | None, redis_url: str | None, data_dir: Path,
                         **overrides) -> Settings:
    """`isolated_settings` on these addresses (bench/chaos_scenarios use it too); an address that is
    None is left to the settings' default, and the topics are created only when there is a broker."""
    tag = uuid.uuid4().hex[:8]
    values = dict(
        kafka_bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        data_dir=data_dir,
        events_topic=f"events-{tag}",
        items_topic=f"items-{tag}",
        dlq_topic=f"events-{tag}.dlq",
        forget_topic=f"forget-{tag}",
        impressions_topic=f"impressions-{tag}",
        consumer_group=f"ingest-{tag}",
        redis_prefix=f"t{tag}:",
        max_poll_interval_ms=3000,
        session_timeout_ms=3000,
        log_flush_interval_s=0.2,
        features_interval_s=0,
        ingest_metrics_port=0,  # ingest processes of concurrent tests must not collide on the metrics port
    )
    values.update(overrides)
    settings = load_settings(**{k: v for k, v in values.items() if v is not None})
    if kafka_bootstrap:
        ensure_topics(settings)
    return settings


class WaitTimeout(AssertionError, TimeoutError):
    """`wait_for` gave up: a failed assertion to a test, a TimeoutError to the chaos scenarios."""


def wait_for(condition, timeout_s: float, what: str):
    """Poll `condition()` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f} s waiting for {what}")
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


def pseudonym(settings: Settings, user_id: object) -> str:
    """What the stores hold for a raw user id (ingest and the API hash it with the data dir's key)."""
    from streaming.pseudonym import Pseudonymizer

    return Pseudonymizer.from_settings(settings)(str(user_id))


def popularity_total(settings: Settings) -> int:
    r = make_redis(settings)  # the settings' credentials too
    return int(sum(score for _, score in r.zrange(f"{settings.redis_prefix}pop:all", 0, -1, withscores=True)))

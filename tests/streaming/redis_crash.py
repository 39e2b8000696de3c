"""What the two tests that SIGKILL a Redis under `streamrec ingest` share (test_redis_recovery.py: ingest
stopped and restarted against a Redis that came back behind; test_redis_outage.py: ingest waiting the
outage out): ingest as a subprocess, the Redis watermarks against Kafka's committed offsets, the crash
itself, and the check that every event was counted and logged exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path

from streaming.kafka_io import make_admin
from streaming.online_store import OnlineStore
from streaming.settings import settings_env
from tests.fixtures.redis_server import RedisServer
from tests.streaming.helpers import popularity_total, pseudonym, read_log, wait_for


def spawn_ingest(settings, log_path: Path, metrics_port: int = 0) -> subprocess.Popen:
    """`streamrec ingest` in a process of its own (SIGKILL-able), its output in `log_path` (also `.log_path`)."""
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1",
           "STREAMREC_INGEST_METRICS_PORT": str(metrics_port)}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest", "--no-progress", "--features-every",
                                 "0"], env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def watermarks(store: OnlineStore, settings) -> dict[tuple[str, int], int]:
    return {(t, p): store.watermark(t, p) for t in (settings.events_topic, settings.items_topic)
            for p in range(settings.topic_partitions)}


def applied_events(store: OnlineStore, settings) -> int:
    """Events the online store holds, by its watermarks."""
    return sum(max(store.watermark(settings.events_topic, p) + 1, 0) for p in range(settings.topic_partitions))


def committed(settings) -> dict[tuple[str, int], int]:
    """The consumer group's committed offsets."""
    admin = make_admin(settings)
    try:
        offsets = admin.list_group_offsets({settings.consumer_group: None}).get(settings.consumer_group, {})
    finally:
        admin.close()
    return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}


def ahead(committed_offsets: dict, marks: dict) -> list:
    """Partitions whose committed offset is past watermark + 1: what a Redis holding only `marks` lost."""
    return [tp for tp, offset in committed_offsets.items() if offset > marks.get(tp, -1) + 1]


def crash_behind(server: RedisServer, store: OnlineStore, settings, feeder: threading.Thread,
                 timeout_s: float) -> None:
    """SIGKILL Redis, while `feeder` still produces, once Kafka has committed past what the synced part
    of its AOF holds; then cut the file back to that part: SIGKILL alone leaves every write in the page
    cache (the file keeps all of it), a machine crash loses the unsynced tail (up to a second with
    everysec), which the cut does."""
    synced_size = server.aof.stat().st_size  # what an fsync a moment before the crash would have kept
    synced = watermarks(store, settings)  # at least what that prefix of the file holds
    wait_for(lambda: ahead(committed(settings), synced), timeout_s,
             "Kafka commits past what the synced part of the AOF holds")
    assert feeder.is_alive(), "events must still flow when Redis dies"
    server.kill()
    with open(server.aof, "r+b") as fh:
        fh.truncate(synced_size)


def assert_exact(settings, store: OnlineStore, events: list[dict], items: list[dict]) -> None:
    """Every event counted once in Redis (popularity, each user's recent items) and logged once."""
    n = len(events)
    assert popularity_total(settings) == n  # none lost, none counted twice
    assert store.popularity(sorted({e["item_id"] for e in events})) == dict(Counter(e["item_id"] for e in events))
    latest = defaultdict(dict)  # user -> item -> last ts
    for ev in events:
        seen = latest[ev["user_id"]]
        seen[ev["item_id"]] = max(ev["ts"], seen.get(ev["item_id"], 0))
    for user, seen in latest.items():
        newest = sorted(seen, key=lambda item: -seen[item])[: settings.recent_items_max]
        assert store.recent_items(pseudonym(settings, user)) == newest, user
    assert store.live_items() == {it["item_id"] for it in items}
    ids = read_log(settings).column("event_id").to_pylist()
    assert len(ids) == n and set(ids) == {e["event_id"] for e in events}

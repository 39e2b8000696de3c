"""Ingestion against the real embedded broker and Redis: round trip, bad input, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter, defaultdict

import pytest
import redis

from streaming.datasets import SyntheticConfig, synthetic_dataset
from streaming.dlq import read_dlq
from streaming.ingest import Ingestor
from streaming.online_store import OnlineStore
from streaming.producer import EventProducer, replay
from streaming.settings import settings_env
from tests.streaming.helpers import (
    assert_no_overlap,
    isolated_settings,
    popularity_total,
    pseudonym,
    read_log,
    wait_for,
)

pytestmark = pytest.mark.integration

IDLE_EXIT_S = 2.0
PRODUCE_RATE = 800  # events/s in the crash test: ~37 s of traffic, room for 5+ kills when restarts are slow


def _store(settings) -> OnlineStore:
    return OnlineStore(redis.Redis.from_url(settings.redis_url), settings.redis_prefix, settings.recent_items_max)


def test_round_trip_redis_and_parquet(embedded_stack, tmp_path):
    settings = isolated_settings(embedded_stack, tmp_path, recent_items_max=3)
    items = [
        {"item_id": "i1", "title": "Alien", "text": "space horror", "attributes": {"genre": "sci-fi"}, "ts": 1},
        {"item_id": "i2", "title": "Heat", "ts": 1},
        {"item_id": "i3", "title": "Up", "ts": 1},
        {"item_id": "i2", "title": "Heat (1995)", "ts": 2},  # update: last write wins
        {"item_id": "i3", "title": "Up", "ts": 3, "deleted": True},
    ]
    base = 1_700_000_000_000
    events = [
        {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click", "ts": base + 10, "scene": "home"},
        {"event_id": "e2", "user_id": "u1", "item_id": "i2", "type": "view", "ts": base + 20, "context": {"device": "ios"}},
        {"event_id": "e3", "user_id": "u1", "item_id": "i3", "type": "click", "ts": base + 30},
        {"event_id": "e4", "user_id": "u1", "item_id": "i4", "type": "purchase", "ts": base + 40},
        {"event_id": "e5", "user_id": "u1", "item_id": "i0", "type": "click", "ts": base + 5},  # late
        {"event_id": "e6", "user_id": 7, "item_id": 1, "type": "like", "ts": base + 50},  # numeric ids
        {"event_id": "e7", "user_id": "u2", "item_id": "i1", "type": "click", "ts": base + 60, "extra": "dropped"},
    ]
    with EventProducer(settings) as producer:
        for it in items:
            producer.send_item(it)
        for ev in events:
            producer.send_event(ev)

    stats = Ingestor(settings).run(until_idle_s=IDLE_EXIT_S)
    assert (stats.events, stats.items, stats.bad) == (7, 5, 0)

    store = _store(settings)
    assert store.recent_items(pseudonym(settings, "u1")) == ["i4", "i3", "i2"]  # newest first, capped at 3
    assert store.recent_items(pseudonym(settings, "7")) == ["1"]
    assert store.recent_items("u1") == []  # stored under its pseudonym only
    assert store.popularity(["i1", "i2", "i0", "1"]) == {"i1": 2, "i2": 1, "i0": 1, "1": 1}
    assert store.item("i1") == {
        "item_id": "i1", "title": "Alien", "text": "space horror",
        "attributes": {"genre": "sci-fi"}, "ts": 1, "deleted": False,
    }
    assert store.item("i2")["title"] == "Heat (1995)"
    assert store.item("i3")["deleted"] is True
    r = redis.Redis.from_url(settings.redis_url)
    assert {m.decode() for m in r.smembers(store.live_items_key)} == {"i1", "i2"}

    log = read_log(settings).to_pylist()
    by_id = {row["event_id"]: row for row in log}
    assert sorted(by_id) == [f"e{i}" for i in range(1, 8)]
    assert by_id["e1"]["scene"] == "home" and by_id["e1"]["ts"] == base + 10
    assert json.loads(by_id["e2"]["context"]) == {"device": "ios"}
    assert by_id["e6"]["user_id"] == pseudonym(settings, 7) and by_id["e6"]["item_id"] == "1"
    assert all(row["offset"] >= 0 and row["ingest_ts"] > 0 for row in log)
    item_log = read_log(settings, settings.items_topic)
    assert item_log.num_rows == 5
    assert_no_overlap(settings, settings.events_topic)

    # A second consumer of the same group finds everything committed: nothing is read twice.
    again = Ingestor(settings).run(until_idle_s=IDLE_EXIT_S)
    assert again.consumed == 0
    assert read_log(settings).num_rows == 7
    assert popularity_total(settings) == 7


BAD_KINDS = {
    "not_utf8": lambda i: b"\xff\xfe\xfa" + str(i).encode(),
    "not_json": lambda i: b"{not json " + str(i).encode(),
    "not_object": lambda i: json.dumps([i, "x"]).encode(),
    "missing_field": lambda i: json.dumps({"event_id": f"b{i}", "user_id": "u", "type": "click", "ts": 1}).encode(),
    "invalid_field": lambda i: json.dumps({"event_id": f"b{i}", "user_id": "u", "item_id": "x", "type": "click", "ts": "yesterday"}).encode(),
    "unknown_event_type": lambda i: json.dumps({"event_id": f"b{i}", "user_id": "u", "item_id": "x", "type": "teleport", "ts": 1}).encode(),
    "payload_too_large": lambda i: json.dumps({"event_id": f"b{i}", "user_id": "u", "item_id": "x", "type": "click", "ts": 1, "context": {"pad": "x" * 2000}}).encode(),
    "empty_payload": lambda i: b"",
}


def test_bad_records_go_to_dlq_and_the_stream_goes_on(embedded_stack, tmp_path):
    settings = isolated_settings(embedded_stack, tmp_path, max_payload_bytes=1024)
    rng = random.Random(7)
    n_bad, n_good = 1200, 3000
    plan = ["good"] * n_good + [rng.choice(sorted(BAD_KINDS)) for _ in range(n_bad)]
    rng.shuffle(plan)
    sent = []  # (future, kind)
    with EventProducer(settings) as producer:
        for i, kind in enumerate(plan):
            if kind == "good":
                ev = {"event_id": f"g{i}", "user_id": f"u{i % 50}", "item_id": f"i{i % 70}", "type": "click", "ts": 1_000 + i}
                fut = producer.send_event(ev)
            else:
                fut = producer.send_raw(settings.events_topic, BAD_KINDS[kind](i), key=f"u{i % 50}".encode())
            sent.append((fut, kind))
    expected_bad = {}
    for fut, kind in sent:
        md = fut.get(timeout=30)
        if kind != "good":
            expected_bad[(md.partition, md.offset)] = kind

    stats = Ingestor(settings).run(until_idle_s=IDLE_EXIT_S)
    assert stats.events == n_good
    assert stats.bad == n_bad
    assert dict(stats.bad_by_reason) == dict(Counter(expected_bad.values()))

    entries = read_dlq(settings, idle_timeout_s=2.0)
    got = {(e.source_partition, e.source_offset): e for e in entries}
    assert len(entries) == n_bad  # no crash here, so no repeats either
    assert set(got) == set(expected_bad)
    for key, kind in expected_bad.items():
        entry = got[key]
        assert entry.reason == kind
        assert entry.source_topic == settings.events_topic
        assert entry.detail
    assert popularity_total(settings) == n_good
    assert read_log(settings).num_rows == n_good


def _spawn_ingest(settings, tmp_path, n: int):
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    path = tmp_path / f"ingest-{n}.log"
    cmd = [sys.executable, "-m", "services.cli", "ingest", "--no-progress", "--features-every", "0"]
    with open(path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.stdout_path = path
    return proc


@pytest.mark.slow
def test_sigkill_restarts_count_every_event_exactly_once(embedded_stack, tmp_path):
    """Two consumers of one group split the partitions; one of them is SIGKILLed at random
    points at least 5 times and restarted. Afterwards every event is counted once."""
    settings = isolated_settings(
        embedded_stack, tmp_path, max_poll_records=400, log_flush_records=1500, log_flush_interval_s=0.3
    )
    ds = synthetic_dataset(SyntheticConfig(n_users=300, n_items=200, n_events=30_000, seed=11))
    events = list(ds.event_dicts())
    n = len(events)
    store = _store(settings)

    def applied() -> int:
        return sum(max(store.watermark(settings.events_topic, p) + 1, 0) for p in range(settings.topic_partitions))

    # Events keep arriving while the consumers die and come back (about 37 s of traffic).
    producer = EventProducer(settings, validate=False)
    feeder = threading.Thread(
        target=replay, args=(producer, ds.item_dicts(), events), kwargs=dict(rate=PRODUCE_RATE, progress=False)
    )
    feeder.start()
    rng = random.Random(3)
    survivor = _spawn_ingest(settings, tmp_path, 0)
    victim = _spawn_ingest(settings, tmp_path, 1)
    kills = 0
    try:
        for k in range(6):
            # The victim must own partitions and be mid-stream when it dies: wait for its
            # assignment, then kill at a random point of progress (the watermarks are the
            # consumers' own Redis writes).
            log_path = tmp_path / f"ingest-{k + 1}.log"
            wait_for(lambda: "assigned" in log_path.read_text(), 90, f"consumer {k + 1} to get partitions")
            target = applied() + rng.randint(200, 1500)
            if target >= n - 300:
                break
            wait_for(lambda: applied() >= target, 90, f"ingestion to pass {target} events")
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            kills += 1
            victim = _spawn_ingest(settings, tmp_path, k + 2)
        assert kills >= 5, f"only {kills} kills happened mid-stream; slow the consumers down"
        feeder.join()
        producer.close()
        # Both run until everything is in Redis and the log holds every event.
        wait_for(lambda: popularity_total(settings) >= n and read_log(settings).num_rows >= n, 180, "all events")
    finally:
        for proc in (survivor, victim):
            proc.send_signal(signal.SIGTERM)
        for proc in (survivor, victim):
            rc = proc.wait(30)
            assert rc == 0, f"{proc.args} exited {rc}:\n" + open(proc.stdout_path).read()[-3000:]

    assert popularity_total(settings) == n
    latest = defaultdict(dict)  # user -> item -> last ts
    for ev in events:
        seen = latest[ev["user_id"]]
        seen[ev["item_id"]] = max(ev["ts"], seen.get(ev["item_id"], 0))
    for user in rng.sample(sorted(latest), 60):
        newest = sorted(latest[user], key=lambda item: -latest[user][item])[: settings.recent_items_max]
        assert store.recent_items(pseudonym(settings, user)) == newest, user
    expected_pop = Counter(ev["item_id"] for ev in events)
    assert store.popularity(sorted(expected_pop)) == dict(expected_pop)
    log = read_log(settings)
    ids = log.column("event_id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    assert set(ids) == {ev["event_id"] for ev in events}
    assert_no_overlap(settings, settings.events_topic)
    # The survivor got partitions too: the group really split the work.
    assert "assigned" in (tmp_path / "ingest-0.log").read_text()

"""Ingestion against the real embedded broker and Redis: round trip, bad input (crashes: tests/test_chaos.py)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import redis

from streaming.dlq import read_dlq
from streaming.ingest import Ingestor
from streaming.online_store import OnlineStore
from streaming.producer import EventProducer
from tests.streaming.helpers import (
    assert_no_overlap,
    isolated_settings,
    popularity_total,
    pseudonym,
    read_log,
)

pytestmark = pytest.mark.integration

IDLE_EXIT_S = 2.0


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


# Consumers SIGKILLed mid-stream and restarted (every event counted once, popularity and recent items exact,
# no overlapping log files): the chaos scenario bench/chaos_scenarios/ingest_kill.py, run by
# tests/test_chaos.py::test_ingest_sigkilled_five_times_loses_and_duplicates_nothing.

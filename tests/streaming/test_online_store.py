"""The online store's catalog change log against a real Redis (the embedded stack's)."""

from __future__ import annotations

import uuid

import pytest
import redis

from streaming import online_store
from streaming.events import Item
from streaming.online_store import OnlineStore

pytestmark = pytest.mark.integration

TS = 1_700_000_000_000


@pytest.fixture()
def store(embedded_stack) -> OnlineStore:
    return OnlineStore(redis.Redis.from_url(embedded_stack.redis_url), f"t{uuid.uuid4().hex[:8]}:")


def _item(item_id: str, deleted: bool = False) -> Item:
    return Item(item_id=item_id, title=f"T {item_id}", text="x", ts=TS, deleted=deleted)


def test_catalog_log_follows_writes_in_order(store):
    assert store.catalog_position() == "0-0"
    store.apply_items("items", 0, [(0, _item("a")), (1, _item("b"))])
    pos = store.catalog_position()
    store.apply_items("items", 0, [(2, _item("c")), (3, _item("a", deleted=True))])
    store.apply_items("items", 0, [(3, _item("a"))])  # a replayed offset: no new entry
    got = store.catalog_changes(pos)
    assert got is not None
    last, changes = got
    assert changes == [("c", False), ("a", True)]
    assert store.catalog_changes(last) == (last, [])
    assert store.catalog_changes("0-0")[1] == [("a", False), ("b", False), ("c", False), ("a", True)]


def test_a_follower_behind_the_trimmed_log_is_told_to_resync(store, monkeypatch):
    monkeypatch.setattr(online_store, "CATALOG_LOG_MAX", 1)
    store.apply_items("items", 0, [(0, _item("a"))])
    pos = store.catalog_position()
    for offset in range(1, 400):  # approximate trimming only drops whole macro nodes: write plenty
        store.apply_items("items", 0, [(offset, _item(f"i{offset}"))])
    assert store.r.xlen(store.catalog_log_key) < 400
    assert store.catalog_changes(pos) is None


def test_applied_offsets_sum_every_partitions_watermark(store):
    from streaming.events import Event

    assert store.applied_offsets("events") == 0
    ev = lambda n: Event(event_id=f"e{n}", user_id="u", item_id="i", type="click", ts=TS + n)
    store.apply_events("events", 0, [(0, ev(0)), (1, ev(1)), (2, ev(2))])
    store.apply_events("events", 3, [(7, ev(3))])  # offsets 0..6 of partition 3 were other records
    store.apply_items("items", 0, [(0, _item("a"))])
    assert store.applied_offsets("events") == 3 + 8 and store.applied_offsets("items") == 1


def test_apply_events_keeps_exact_ts_scores_caps_recent_items_and_skips_replays(embedded_stack):
    from streaming.events import TS_MAX_MS, Event

    store = OnlineStore(redis.Redis.from_url(embedded_stack.redis_url), f"t{uuid.uuid4().hex[:8]}:", recent_items_max=3)
    ev = lambda n, item, ts: Event(event_id=f"e{n}", user_id="u", item_id=item, type="click", ts=ts)
    batch = [(0, ev(0, "a", TS)), (1, ev(1, "b", TS + 1)), (2, ev(2, "a", TS - 5)),  # late: a keeps TS
             (3, ev(3, "c", TS_MAX_MS)), (4, ev(4, "d", TS + 2))]
    assert store.apply_events("events", 0, batch) == 5
    assert store.apply_events("events", 0, batch[3:]) == 0  # a replay changes nothing
    recent = store.r.zrange(store.recent_key("u"), 0, -1, withscores=True)
    # Scores are the events' exact epoch ms (the largest a double holds exactly is far above TS_MAX_MS).
    assert [(m.decode(), int(s)) for m, s in recent] == [("b", TS + 1), ("d", TS + 2), ("c", TS_MAX_MS)]
    assert store.popularity() == {"a": 2, "b": 1, "c": 1, "d": 1}
    assert store.watermark("events", 0) == 4

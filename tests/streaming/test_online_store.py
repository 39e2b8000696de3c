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

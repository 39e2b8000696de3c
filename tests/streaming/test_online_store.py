"""The online store against a real Redis (the embedded stack's): catalog change log, events script, per-user TTL."""

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


def _events(user: str, items: str, first_offset: int) -> list:
    from streaming.events import Event

    return [(first_offset + n, Event(event_id=f"{user}-{first_offset + n}", user_id=user, item_id=item, type="click",
                                     ts=TS + first_offset + n)) for n, item in enumerate(items)]


def test_events_renew_their_users_ttl_once_per_batch(embedded_stack):
    ttl = 1000
    store = OnlineStore(redis.Redis.from_url(embedded_stack.redis_url), f"t{uuid.uuid4().hex[:8]}:", user_ttl_s=ttl)
    store.apply_events("events", 0, _events("u1", "abc", 0) + _events("u2", "a", 3))
    for user in ("u1", "u2"):
        assert ttl - 5 <= store.r.ttl(store.recent_key(user)) <= ttl  # seconds left, counting down
    store.r.expire(store.recent_key("u1"), 50)
    store.r.expire(store.recent_key("u2"), 50)
    # A later event of u1 -- even one that adds no member (an item it already has, an older ts) -- renews
    # u1's TTL; u2, not in this batch, keeps counting down.
    late = [(4, _events("u1", "a", 0)[0][1].model_copy(update={"event_id": "late", "ts": TS - 1}))]
    assert store.apply_events("events", 0, late) == 1
    assert ttl - 5 <= store.r.ttl(store.recent_key("u1")) <= ttl
    assert store.r.ttl(store.recent_key("u2")) <= 50
    # A replayed offset is skipped whole: no write, no renewal.
    store.r.expire(store.recent_key("u1"), 50)
    assert store.apply_events("events", 0, late) == 0
    assert store.r.ttl(store.recent_key("u1")) <= 50
    # A TTL that has run down by less than the slack is only read, not rewritten (writes cost more).
    nearly_full = ttl - int(ttl * online_store.TTL_RENEW_SLACK) + 5
    store.r.expire(store.recent_key("u1"), nearly_full)
    store.apply_events("events", 0, _events("u1", "d", 5))
    assert store.r.ttl(store.recent_key("u1")) <= nearly_full


def test_a_ttl_of_zero_means_the_users_key_never_expires(embedded_stack):
    client = redis.Redis.from_url(embedded_stack.redis_url)
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = OnlineStore(client, prefix, user_ttl_s=0)
    store.apply_events("events", 0, _events("u", "ab", 0))
    assert store.r.ttl(store.recent_key("u")) == -1  # exists, no expiry
    # Switching from a TTL to 0: the next event of the user drops the TTL set before.
    OnlineStore(client, prefix, user_ttl_s=1000).apply_events("events", 0, _events("u", "c", 2))
    assert store.r.ttl(store.recent_key("u")) > 0
    store.apply_events("events", 0, _events("u", "d", 3))
    assert store.r.ttl(store.recent_key("u")) == -1 and store.recent_items("u") == ["d", "c", "b", "a"]


def test_the_ttl_comes_from_the_settings_and_is_bounded(embedded_stack):
    from streaming.settings import DEFAULT_USER_TTL_S, Settings, SettingsError, load_settings

    assert Settings.model_fields["user_ttl_s"].default == DEFAULT_USER_TTL_S == 30 * 86_400
    with pytest.raises(SettingsError, match="STREAMREC_USER_TTL_S=-1"):
        load_settings(user_ttl_s=-1)
    with pytest.raises(ValueError, match="user_ttl_s=-1"):
        OnlineStore(redis.Redis.from_url(embedded_stack.redis_url), "t:", user_ttl_s=-1)

"""The right to be forgotten in the streaming half (streaming/forget.py): tombstones, the log purge,
ingest's refusal of a forgotten user's events (also when they are replayed), the feature rebuild."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.events import EVENT_LOG_SCHEMA, Tombstone
from streaming.forget import TombstoneSet, new_tombstone, purge_log, read_durable, record_durable
from streaming.offline_log import OfflineLog, check_log_file
from streaming.pseudonym import Pseudonymizer, forget_marker

K1, K2 = bytes(range(32)), bytes(range(1, 33))


def _rows(users: list[str], ts: list[int], start: int = 0) -> pa.Table:
    n = len(users)
    given = {"event_id": [f"e{start + i}" for i in range(n)], "user_id": users, "item_id": ["i1"] * n,
             "type": ["click"] * n, "ts": ts, "partition": [0] * n, "offset": list(range(start, start + n)),
             "ingest_ts": [1] * n}
    return pa.table({name: given.get(name, [None] * n) for name in EVENT_LOG_SCHEMA.names}, schema=EVENT_LOG_SCHEMA)


def _tombstones(p: Pseudonymizer, *users_at: tuple[str, int]) -> TombstoneSet:
    out = TombstoneSet()
    for user, ts in users_at:
        t = new_tombstone(p, user, now_ms=ts)
        out.add(t.tombstone_id, forget_marker(t.pseudonym), t.ts)
    return out


# --- unit ------------------------------------------------------------------------------------
def test_a_tombstone_refuses_the_users_events_up_to_its_time_only():
    p = Pseudonymizer((K1,))
    tombs = _tombstones(p, ("alice", 5_000))
    assert tombs.refuses("alice", 4_999, p) and tombs.refuses("alice", 5_000, p)
    assert not tombs.refuses("alice", 5_001, p)  # a returning user's new events are taken
    assert not tombs.refuses("bob", 1, p)


def test_a_tombstone_survives_a_key_rotation():
    old = Pseudonymizer((K1,))
    tombs = _tombstones(old, ("alice", 5_000))  # made under generation 1
    assert tombs.refuses("alice", 10, old.rotated(K2))  # a replay after the rotation is still refused


def test_the_durable_tombstone_holds_neither_the_id_nor_the_pseudonym(tmp_path):
    log = OfflineLog(tmp_path / "log")
    t = new_tombstone(Pseudonymizer((K1,)), "alice-123")
    record_durable(log, t)
    record_durable(log, t)  # idempotent
    files = list((tmp_path / "log" / "forget").iterdir())
    assert [f.name for f in files] == [f"{t.tombstone_id}.json"]
    text = files[0].read_text()
    assert "alice-123" not in text and t.pseudonym not in text
    back = read_durable(log)
    assert back.ids == {t.tombstone_id} and back.markers == {forget_marker(t.pseudonym): t.ts}
    assert back.requested_at == {t.tombstone_id: t.ts}


def test_the_purge_rewrites_only_files_with_forgotten_rows(tmp_path):
    p = Pseudonymizer((K1,))
    alice, bob = p("alice"), p("bob")
    log = OfflineLog(tmp_path / "log")
    mixed = log.write("events", 0, _rows([alice, bob, alice], [1, 2, 9_000], start=0))
    only_alice = log.write("events", 0, _rows([alice], [3], start=3))
    clean = log.write("events", 1, _rows([bob], [4], start=0))
    before = pq.read_table(clean.path)
    result = purge_log(log, "events", _tombstones(p, ("alice", 5_000)))
    assert (result.files_rewritten, result.rows_removed) == (2, 2)
    assert pq.read_table(mixed.path).column("user_id").to_pylist() == [bob, alice]  # the later event stays
    assert pq.read_table(only_alice.path).num_rows == 0
    check_log_file(log, log.list_files("events", 0)[1], EVENT_LOG_SCHEMA, read_pages=True)  # still a valid file
    assert pq.read_table(clean.path).equals(before)
    assert purge_log(log, "events", _tombstones(p, ("alice", 5_000))).files_rewritten == 0  # idempotent
    assert [f.path for f in log.list_files("events")] == [mixed.path, only_alice.path, clean.path]


def test_a_tombstone_record_is_validated():
    with pytest.raises(ValueError):
        Tombstone.model_validate_json(json.dumps({"tombstone_id": "x", "pseudonym": "alice", "generation": 1,
                                                  "ts": 1_700_000_000_000}))


# --- integration: real broker, Redis, Ray ----------------------------------------------------
@pytest.mark.integration
def test_forget_erases_the_user_and_a_replay_cannot_bring_them_back(embedded_stack, ray_local, tmp_path):
    from streaming.features import load_feature_tables, run_features
    from streaming.forget import publish_tombstone
    from streaming.ingest import Ingestor
    from streaming.online_store import OnlineStore
    from streaming.producer import EventProducer
    from streaming.redis_io import make_redis
    from tests.streaming.helpers import isolated_settings, pseudonym, read_log

    settings = isolated_settings(embedded_stack, tmp_path)
    ts0 = 1_700_000_000_000
    events = [{"event_id": f"e{i}", "user_id": ["alice", "bob", "carol"][i % 3], "item_id": f"i{i % 7}",
               "type": "click", "ts": ts0 + i} for i in range(60)]

    def produce(evs):
        with EventProducer(settings) as producer:
            for ev in evs:
                producer.send_event(ev)
            producer.flush(30)

    produce(events)
    assert Ingestor(settings).run(until_idle_s=2.0).events == 60
    run_features(settings, progress=False)
    alice = pseudonym(settings, "alice")
    store = OnlineStore(make_redis(settings), settings.redis_prefix)
    assert store.recent_items(alice) and alice in read_log(settings).column("user_id").to_pylist()

    tombstone = new_tombstone(Pseudonymizer.from_settings(settings), "alice")
    publish_tombstone(settings, tombstone)
    produce(events[:30])  # and a replay of the user's old events, with new event ids' offsets
    stats = Ingestor(settings).run(until_idle_s=2.0)
    assert stats.forgotten == 10 and stats.events == 20  # alice's 10 replayed events refused

    assert store.recent_items(alice) == []
    keys = [k.decode() for k in store.r.scan_iter(match=f"{settings.redis_prefix}*")]
    assert not [k for k in keys if alice in k]
    log_users = read_log(settings).column("user_id").to_pylist()
    assert alice not in log_users and pseudonym(settings, "bob") in log_users
    assert read_durable(OfflineLog(settings.log_dir)).ids == {tombstone.tombstone_id}

    result = run_features(settings, progress=False)
    tables = load_feature_tables(settings)
    assert not result.noop and tables.manifest["forgotten"] == [tombstone.tombstone_id]
    assert tables.manifest["last_run"]["full"]  # the aggregates are rebuilt, not patched
    assert alice not in tables.sequences.column("user_id").to_pylist()
    versions = sorted(p.name for p in (tmp_path / "features").iterdir() if p.name.startswith("v"))
    assert versions == [f"v{tables.version:06d}"]  # older versions, which held alice, are collected at once
    assert tables.manifest["counts"]["events"] == 40  # bob's and carol's 40 (their replayed ids deduplicated)
    popularity = dict(zip(tables.popularity.column("item_id").to_pylist(), tables.popularity.column("count").to_pylist()))
    assert sum(popularity.values()) == 40

    # A new ingest process (a restart, another region) knows the tombstone from the log alone.
    produce(events[:3])
    assert Ingestor(settings).run(until_idle_s=2.0).forgotten == 1

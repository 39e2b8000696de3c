"""Ingest logs the impressions topic: good records to `log/<impressions topic>/` (never Redis), bad ones to
the DLQ, forgotten users' impressions refused and purged. Real broker and Redis (the session's stack)."""

from __future__ import annotations

import json
import time

import pytest

from streaming import kafka_io
from streaming.events import IMPRESSION_LOG_SCHEMA, Impression
from streaming.offline_log import OfflineLog, read_table
from streaming.settings import Settings
from tests.streaming.helpers import isolated_settings, pseudonym

pytestmark = pytest.mark.integration

TS = 1_732_350_000_000
IDLE_S = 2.0
SEND_TIMEOUT_S = 30


def impression(request_id: str, user: str | None, ts: int = TS) -> dict:
    return Impression(request_id=request_id, user_id=user, scene="home", version="v000002", variant="v000002",
                      experiment="exp-1", item_ids=["i3", "i1", "i7"], scores=[0.9, 0.5, 0.25], fallback=None,
                      ts=ts).model_dump(exclude_none=True)


def produce(settings: Settings, records: list[tuple[str | None, bytes]]) -> None:
    producer = kafka_io.make_producer(settings)
    try:
        for key, value in records:
            producer.send(settings.impressions_topic, key=None if key is None else key.encode(), value=value)
        producer.flush(SEND_TIMEOUT_S)
    finally:
        producer.close()


def logged(settings: Settings):
    log = OfflineLog(settings.log_dir)
    return read_table(log, log.list_files(settings.impressions_topic), IMPRESSION_LOG_SCHEMA)


def test_impressions_are_logged_the_bad_one_goes_to_the_dlq_and_redis_holds_only_watermarks(embedded_stack, tmp_path):
    from streaming.dlq import read_dlq
    from streaming.ingest import Ingestor
    from streaming.online_store import OnlineStore
    from streaming.redis_io import make_redis

    settings = isolated_settings(embedded_stack, tmp_path)
    user = pseudonym(settings, "alice")
    good = [impression(f"r-{i}", user if i % 4 else None, TS + i) for i in range(20)]
    bad = {**impression("r-bad", user), "scores": [0.9]}  # three items, one score
    records = [(g.get("user_id"), json.dumps(g).encode()) for g in good]
    records.insert(7, (user, json.dumps(bad).encode()))
    produce(settings, records)

    stats = Ingestor(settings).run(until_idle_s=IDLE_S)
    assert (stats.impressions, stats.bad, stats.events, stats.items) == (20, 1, 0, 0)

    table = logged(settings)
    assert table.schema.equals(IMPRESSION_LOG_SCHEMA)
    rows = sorted(table.select(["request_id", "user_id", "item_ids", "scores", "ts"]).to_pylist(),
                  key=lambda r: r["ts"])
    assert [r["request_id"] for r in rows] == [g["request_id"] for g in good]
    assert [r["user_id"] for r in rows] == [g.get("user_id") for g in good]
    assert all(r["item_ids"] == ["i3", "i1", "i7"] and r["scores"] == [0.9, 0.5, 0.25] for r in rows)
    assert set(table.column("experiment").to_pylist()) == {"exp-1"}

    dlq = read_dlq(settings)
    assert [(e.source_topic, e.reason) for e in dlq] == [(settings.impressions_topic, "invalid_field")]
    assert json.loads(dlq[0].value)["request_id"] == "r-bad"

    # no online state, but the watermarks cover every offset (the bad one too): a restart re-reads nothing
    store = OnlineStore(make_redis(settings), settings.redis_prefix)
    assert store.applied_offsets(settings.impressions_topic) == 21
    assert not [k for k in store.r.scan_iter(match=f"{settings.redis_prefix}*") if user.encode() in k]
    again = Ingestor(settings).run(until_idle_s=IDLE_S)
    assert again.consumed == 0 and logged(settings).num_rows == 20


def test_a_forgotten_users_impressions_are_purged_and_refused(embedded_stack, tmp_path):
    from streaming.forget import new_tombstone, publish_tombstone
    from streaming.ingest import Ingestor
    from streaming.pseudonym import Pseudonymizer

    settings = isolated_settings(embedded_stack, tmp_path)
    alice, bob = pseudonym(settings, "alice"), pseudonym(settings, "bob")
    first = [impression(f"r-{i}", [alice, bob, None][i % 3], TS + i) for i in range(30)]
    produce(settings, [(f.get("user_id"), json.dumps(f).encode()) for f in first])
    assert Ingestor(settings).run(until_idle_s=IDLE_S).impressions == 30
    assert alice in logged(settings).column("user_id").to_pylist()

    tombstone = new_tombstone(Pseudonymizer.from_settings(settings), "alice")
    publish_tombstone(settings, tombstone)
    later_ms = int(time.time() * 1000) + 60_000  # alice comes back after asking to be forgotten
    second = [impression("r-old-alice", alice, TS + 100), impression("r-new-bob", bob, TS + 101),
              impression("r-back", alice, later_ms)]
    produce(settings, [(s["user_id"], json.dumps(s).encode()) for s in second])
    stats = Ingestor(settings).run(until_idle_s=IDLE_S)
    assert stats.forgotten == 1 and stats.impressions == 2

    table = logged(settings)
    kept = dict(zip(table.column("request_id").to_pylist(), table.column("user_id").to_pylist()))
    assert "r-old-alice" not in kept and kept["r-back"] == alice and kept["r-new-bob"] == bob
    assert [r for r, u in kept.items() if u == alice] == ["r-back"]  # the first ten purged from the log
    assert sum(u is None for u in kept.values()) == 10 and sum(u == bob for u in kept.values()) == 11

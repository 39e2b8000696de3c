"""`streamrec rebuild-online`: the pure parts, the command's errors, and the rebuilt store against
the one ingest built (real broker, two real Redis servers, the real feature job)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import redis
from typer.testing import CliRunner

from services.cli import app
from streaming.events import EVENT_LOG_SCHEMA, ITEM_LOG_SCHEMA, Event, Item, event_log_row, item_log_row
from streaming.offline_log import LogFile, OfflineLog
from streaming.online_rebuild import (
    EVENT_COLUMNS_READ,
    OnlineEvent,
    RebuildRefused,
    committed_offsets,
    merge_committed,
    item_from_row,
    rebuild_online,
    recent_windows,
    split_events,
    watermarks_from_files,
)
from streaming.online_store import TTL_RENEW_SLACK, OnlineStore
from streaming.settings import load_settings, settings_env

HOUR_MS = 3_600_000
IDLE_EXIT_S = 2.0
EXPIRY_ROUNDING_MS = 2  # PTTL rounds to ms, TIME to us


# --- the pure parts -------------------------------------------------------------------------------
def windows(rows: list[tuple[str, int]], ttl_s: int, now_ms: int):
    users = pa.array([u for u, _ in rows], pa.string())
    return recent_windows(users, np.array([t for _, t in rows], dtype=np.int64), ttl_s, now_ms)


def test_recent_windows_follow_the_ttl_policy():
    ttl_s, h = 3600, HOUR_MS
    now = 99 * h + h // 2
    w = windows(
        [
            ("steady", 98 * h), ("steady", 98 * h + h // 2), ("steady", 99 * h),  # pauses under a TTL
            ("back", 10 * h), ("back", 99 * h), ("back", 99 * h + 5),  # came back after a long pause
            ("gone", 97 * h), ("gone", 98 * h + h // 2),  # last read exactly a TTL ago: its key expired
            ("edge", 97 * h), ("edge", 98 * h), ("edge", 99 * h - 1),  # a pause of exactly a TTL, then one under
        ],
        ttl_s, now,
    )
    assert w.recent_from_ms == {"steady": 98 * h, "back": 99 * h, "edge": 98 * h}
    assert w.expire_at_ms == {"steady": 100 * h, "back": 100 * h + 5, "edge": 100 * h - 1}
    assert w.expired_users == 1


def test_recent_windows_ignore_input_order_and_take_chunked_ids():
    rows = [("a", 5), ("b", 7), ("a", 1), ("a", 3_600_005), ("b", 2)]
    chunked = pa.chunked_array([pa.array(["a", "b"]), pa.array(["a", "a", "b"])])
    w = recent_windows(chunked, np.array([t for _, t in rows]), 3600, 3_600_007)
    assert w.recent_from_ms == {"a": 3_600_005}
    assert w.expired_users == 1
    assert recent_windows(pa.array([], pa.string()), np.array([], np.int64), 10, 0).recent_from_ms == {}
    with pytest.raises(ValueError, match="ttl_s=0"):
        recent_windows(chunked, np.array([t for _, t in rows]), 0, 0)


def test_split_events_keeps_only_the_window_and_counts_the_rest():
    rows = {"offset": [3, 4, 5, 6], "user_id": ["a", "a", "b", "c"], "item_id": ["x", "y", "x", "z"],
            "ts": [10, 20, 30, 40], "ingest_ts": [100, 200, 150, 160]}
    assert tuple(rows) == EVENT_COLUMNS_READ
    w = recent_windows(pa.array(["a", "a", "b"]), np.array([100, 200 + 3_600_000, 150]), 3600, 3_700_000)
    records, outside = split_events(rows, w)
    # a's window starts at its last read (after a pause), b's key has expired, c never had a window
    assert records == [] and outside == {"x": 2, "y": 1, "z": 1}
    w = recent_windows(pa.array(["a", "a", "b"]), np.array([100, 200, 150]), 3600, 1000)
    records, outside = split_events(rows, w)
    assert records == [(3, OnlineEvent("a", "x", 10)), (4, OnlineEvent("a", "y", 20)), (5, OnlineEvent("b", "x", 30))]
    assert outside == {"z": 1}
    records, outside = split_events(rows, None)  # no TTL: every event feeds its user's key
    assert [o for o, _ in records] == [3, 4, 5, 6] and not outside


def test_watermarks_are_the_last_offsets_the_files_hold():
    files = [LogFile("ev", 0, 0, 9, "p"), LogFile("ev", 0, 11, 20, "p"), LogFile("ev", 3, 0, 4, "p"),
             LogFile("it", 1, 5, 5, "p")]
    assert watermarks_from_files(files) == {"ev": {0: 20, 3: 4}, "it": {1: 5}}


def test_committed_offsets_raise_watermarks_over_dlq_records():
    marks = {"ev": {0: 20, 1: 7}, "it": {0: 3}}
    committed = {("ev", 0): 21, ("ev", 1): 12, ("ev", 2): 5, ("ev", 3): 0, ("it", 0): 2}
    # ev/1 ended in DLQ records; ev/2 held only DLQ records; ev/3 committed nothing; it/0 is behind its log
    assert merge_committed(marks, committed) == {"ev": {0: 20, 1: 11, 2: 4}, "it": {0: 3}}
    assert merge_committed(marks, None) == marks


def test_a_logged_item_comes_back_as_the_item_ingest_applied():
    for item in (Item(item_id="i1", title="Alien", text="space", attributes={"g": "sci-fi", "n": [1, 2]}, ts=5),
                 Item(item_id="i2", title="Heat", ts=1, deleted=True)):
        row = dict(zip(ITEM_LOG_SCHEMA.names, item_log_row(item, 0, 7, 123)))
        assert item_from_row(row) == item
    event = Event(event_id="e", user_id="u", item_id="i", type="click", ts=9)
    row = dict(zip(EVENT_LOG_SCHEMA.names, event_log_row(event, 0, 7, 123)))
    assert OnlineEvent(*(row[f] for f in OnlineEvent._fields)) == OnlineEvent("u", "i", 9)


def test_the_refusal_names_the_count_and_the_prefix():
    exc = RebuildRefused("sr:", 12, ["sr:a", "sr:b"])
    assert "12 key(s)" in str(exc) and "'sr:'" in str(exc) and "--force" in str(exc) and "sr:a, sr:b, ..." in str(exc)


# --- the command's errors (no Redis needed: they are found first) ---------------------------------
def test_cli_without_a_log_exits_2_naming_it(tmp_path):
    env = {"STREAMREC_DATA_DIR": str(tmp_path / "nowhere"), "STREAMREC_REDIS_URL": "redis://127.0.0.1:1/0"}
    got = CliRunner().invoke(app, ["rebuild-online", "--no-progress"], env=env)
    assert got.exit_code == 2, got.output
    assert "no offline log at" in got.output and "nowhere" in got.output


def test_cli_with_redis_unreachable_exits_2_naming_it(tmp_path):
    settings = load_settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    event = Event(event_id="e", user_id="u", item_id="i", type="click", ts=9)
    table = pa.Table.from_pylist([dict(zip(EVENT_LOG_SCHEMA.names, event_log_row(event, 0, 0, 1)))],
                                 schema=EVENT_LOG_SCHEMA)
    OfflineLog(settings.log_dir).write(settings.events_topic, 0, table)
    got = CliRunner().invoke(app, ["rebuild-online", "--no-progress"], env=settings_env(settings))
    assert got.exit_code == 2, got.output
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in got.output


# --- the TTL policy against a real Redis (log files written directly) -------------------------------
def write_events(settings, partition: int, rows: list[tuple[str, str, int, int]]) -> None:
    """(user, item, ts, ingest_ts) rows as one log file of `partition`, offsets from 0."""
    table = pa.Table.from_pylist(
        [dict(zip(EVENT_LOG_SCHEMA.names, event_log_row(
            Event(event_id=f"e{partition}-{k}", user_id=u, item_id=i, type="click", ts=ts), partition, k, read_at)))
         for k, (u, i, ts, read_at) in enumerate(rows)],
        schema=EVENT_LOG_SCHEMA)
    OfflineLog(settings.log_dir).write(settings.events_topic, partition, table)


@pytest.mark.integration
def test_the_ttl_policy_drops_inactive_users_and_restarts_returning_ones(embedded_stack, tmp_path):
    import uuid

    client = redis.Redis.from_url(embedded_stack.redis_url)
    (now_s, now_us) = client.time()
    now = now_s * 1000 + now_us // 1000
    minute = 60_000
    base = dict(data_dir=tmp_path, redis_url=embedded_stack.redis_url, recent_items_max=3)
    with_ttl = load_settings(**base, user_ttl_s=3600, redis_prefix=f"t{uuid.uuid4().hex[:8]}:")
    no_ttl = with_ttl.model_copy(update={"user_ttl_s": 0, "redis_prefix": f"t{uuid.uuid4().hex[:8]}:"})
    write_events(with_ttl, 0, [
        ("gone", "a", 1, now - 120 * minute), ("gone", "b", 2, now - 119 * minute),  # read over a TTL ago
        ("back", "x", 3, now - 300 * minute), ("back", "y", 4, now - 299 * minute),  # then a pause of hours
        ("back", "z", 5, now - 10 * minute),
    ])
    write_events(with_ttl, 1, [("active", i, ts, now - 20 * minute) for i, ts in (("a", 9), ("c", 6), ("d", 8), ("e", 7))])

    result = rebuild_online(with_ttl, client)
    p = with_ttl.redis_prefix
    assert (result.users, result.expired_users) == (2, 1)
    assert not client.exists(f"{p}u:gone:recent")
    assert client.zrange(f"{p}u:back:recent", 0, -1) == [b"z"]
    assert client.zrevrange(f"{p}u:active:recent", 0, -1) == [b"a", b"d", b"e"]  # capped at 3, newest first
    (t_s, t_us), pttl = client.pipeline(transaction=True).time().pttl(f"{p}u:back:recent").execute()
    assert abs(t_s * 1000 + t_us // 1000 + pttl - (now - 10 * minute + 3_600_000)) <= EXPIRY_ROUNDING_MS
    # every event counts in popularity, those of expired keys too (ingest counted them)
    assert dict(client.zrange(f"{p}pop:all", 0, -1, withscores=True)) == {
        b"a": 2.0, b"b": 1.0, b"x": 1.0, b"y": 1.0, b"z": 1.0, b"c": 1.0, b"d": 1.0, b"e": 1.0}
    assert client.get(f"{p}wm:{with_ttl.events_topic}:0") == b"4" and client.get(f"{p}wm:{with_ttl.events_topic}:1") == b"3"

    # Without a TTL every user keeps every event, and no key expires.
    result = rebuild_online(no_ttl, client)
    q = no_ttl.redis_prefix
    assert (result.users, result.expired_users) == (3, 0)
    assert client.zrevrange(f"{q}u:back:recent", 0, -1) == [b"z", b"y", b"x"]
    assert client.zrevrange(f"{q}u:gone:recent", 0, -1) == [b"b", b"a"]
    assert all(client.pttl(k) == -1 for k in client.scan_iter(match=f"{q}*"))
    for prefix in (p, q):
        client.delete(*client.scan_iter(match=f"{prefix}*"))


# --- against the store ingest built ---------------------------------------------------------------
def dump(client: redis.Redis, prefix: str) -> dict[str, tuple[str, object, int | None]]:
    """Every key under `prefix`: (type, content, absolute expiry in ms or None). A stream's
    content is the catalog state it states (its last entry per item), see the test."""
    out = {}
    for raw in client.scan_iter(match=prefix + "*", count=1000):
        key, kind = raw.decode(), client.type(raw).decode()
        if kind == "string":
            value: object = client.get(raw)
        elif kind == "hash":
            value = client.hgetall(raw)
        elif kind == "set":
            value = client.smembers(raw)
        elif kind == "zset":
            value = client.zrange(raw, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(raw, 0, -1)
        elif kind == "stream":
            value = {f[b"item_id"]: f[b"deleted"] for _, f in client.xrange(raw)}
        else:
            raise AssertionError(f"{key}: unexpected type {kind}")
        # TIME and PTTL in one transaction: the same instant, so their sum is the expiry itself
        (now_s, now_us), pttl = client.pipeline(transaction=True).time().pttl(raw).execute()
        out[key] = (kind, value, now_s * 1000 + now_us // 1000 + pttl if pttl >= 0 else None)
    return out


@pytest.mark.integration
def test_rebuild_equals_the_store_ingest_built(embedded_stack, ray_local, tmp_path):
    from services.stack import EmbeddedStack
    from streaming.datasets import SyntheticConfig, synthetic_dataset
    from streaming.features import run_features
    from streaming.ingest import Ingestor
    from streaming.producer import EventProducer, replay
    from tests.streaming.helpers import isolated_settings, read_log

    ttl_s = 3600
    settings = isolated_settings(embedded_stack, tmp_path / "data", recent_items_max=4, user_ttl_s=ttl_s,
                                 max_poll_records=300, log_flush_records=700, popular_push_n=40)
    ds = synthetic_dataset(SyntheticConfig(n_users=60, n_items=50, n_events=3000, seed=14))
    with EventProducer(settings, validate=False) as producer:
        replay(producer, ds.item_dicts(), ds.event_dicts(), progress=False)
        for k in range(4):  # catalog changes after the first load: retitled items, a deletion
            producer.send_item({"item_id": f"i{k}", "title": f"retitled {k}", "ts": 10 + k,
                                "attributes": {"rev": k, "tags": ["a", "b"]}})
        producer.send_item({"item_id": "i5", "title": "gone", "ts": 20, "deleted": True})
        for k in range(6):  # bad records: gaps in the offsets, which watermarks and log files skip alike
            producer.send_raw(settings.events_topic, b"{not json " + str(k).encode(), key=f"u{k}".encode())
    stats = Ingestor(settings).run(until_idle_s=IDLE_EXIT_S)
    assert (stats.events, stats.bad) == (3000, 6)
    live = redis.Redis.from_url(settings.redis_url)
    pushed = run_features(settings, redis_client=live)
    assert live.exists(f"{settings.redis_prefix}feat:popular")

    with EmbeddedStack(tmp_path / "second", kafka=False) as second:
        target = settings.model_copy(update={"redis_url": second.redis_url})
        client = redis.Redis.from_url(second.redis_url)
        # A serving replica already heartbeating into the new Redis does not make it "not empty".
        heartbeat = f"{settings.redis_prefix}serve:replicas"
        client.hset(heartbeat, "replica-1", json.dumps({"ts": 0}))
        result = rebuild_online(target, client, committed=committed_offsets(settings))
        client.delete(heartbeat)  # serving's own key, not online state: out of the comparison
        from_log = watermarks_from_files([*OfflineLog(settings.log_dir).list_files(settings.events_topic)])
        # the scenario has partitions that ended in DLQ records: only the committed offsets tell
        assert from_log[settings.events_topic] != result.watermarks[settings.events_topic]
        assert (result.events, result.items, result.feature_version) == (3000, 55, pushed.version)
        want, got = dump(live, settings.redis_prefix), dump(client, settings.redis_prefix)

        # Legitimately different: the broker identity ingest records beside the watermarks (the
        # log does not say which broker it came from; the next `streamrec ingest` records it).
        want.pop(f"{settings.redis_prefix}broker", None)
        assert sorted(got) == sorted(want)
        log = read_log(settings)
        last_read = dict(zip(*log.group_by("user_id").aggregate([("ingest_ts", "max")]).to_pydict().values()))
        read_at = log["ingest_ts"].to_numpy()
        # The rebuild's expiry is the policy's: a TTL after the user's last event was read. Ingest
        # renews a key only once a 30th of the TTL has run down, so its expiry is up to that 30th
        # sooner, and it counts from when it applied a batch, not when it read it: the two differ
        # by at most that 30th plus the span of the reads.
        slack_ms = TTL_RENEW_SLACK * ttl_s * 1000 + int(read_at.max() - read_at.min())
        users = 0
        for key, (kind, value, expire_at) in want.items():
            g_kind, g_value, g_expire_at = got[key]
            assert (g_kind, g_value) == (kind, value), key
            if expire_at is None:
                assert g_expire_at is None, key
            else:
                users += 1
                user = key[len(settings.redis_prefix) + 2:-len(":recent")]
                assert abs(g_expire_at - (last_read[user] + ttl_s * 1000)) <= EXPIRY_ROUNDING_MS, key
                assert abs(g_expire_at - expire_at) <= slack_ms, (key, g_expire_at - expire_at)
        assert users == result.users == 60
        # Catalog change streams are compared by the state they state (last entry per item): ingest
        # writes one entry per item and poll batch, so their entry counts depend on the batching;
        # entry ids are new ones (Redis makes them), newer than any position a replica held.
        stream = f"{settings.redis_prefix}items:log"
        assert got[stream][1][b"i5"] == b"1" and got[stream][1][b"i0"] == b"0"
        old_last = live.xrevrange(stream, count=1)[0][0]
        assert client.xrange(stream, count=1)[0][0] > old_last
        # so a serving replica's catalog follower, at any position in the lost stream, finds it gone
        # and re-reads the live set (services.catalog_follower)
        assert OnlineStore(client, settings.redis_prefix).catalog_changes(old_last.decode()) is None

        # A second rebuild into the now full target is refused, naming the count and the prefix...
        with pytest.raises(RebuildRefused) as refused:
            rebuild_online(target, client)
        assert refused.value.count == len(got) and refused.value.prefix == settings.redis_prefix
        cli = CliRunner().invoke(app, ["rebuild-online", "--no-progress"], env=settings_env(target))
        assert cli.exit_code == 2 and f"already holds {len(got)} key(s)" in cli.output, cli.output
        # ...and the command with --force replaces it with the same store.
        cli = CliRunner().invoke(app, ["rebuild-online", "--force", "--no-progress"], env=settings_env(target))
        assert cli.exit_code == 0, cli.output
        assert f"{len(got)} earlier key(s) deleted" in cli.output
        again = dump(client, settings.redis_prefix)
        assert {k: v[:2] for k, v in again.items()} == {k: v[:2] for k, v in got.items()}

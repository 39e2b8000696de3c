"""The incremental feature job (`streamrec features`): exactness, idempotence, crash safety, push."""

from __future__ import annotations

import fcntl
import json
import math
import random
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from streaming import features
from streaming.events import EVENT_LOG_SCHEMA, ITEM_LOG_SCHEMA
from streaming.features import load_feature_tables, push_popularity_to_redis, run_features, run_metrics, store
from streaming.features.tables import entry_files
from streaming.job_metrics import metrics_file, read_job_metrics
from streaming.offline_log import OfflineLog
from streaming.settings import Settings

EVENTS, ITEMS = "events", "items"
HALF_LIFE_S = 100.0  # short, so the random data's ~20 min span gives trending values of every size
TS0 = 1_700_000_000_000  # epoch ms


def make_settings(data_dir: Path, **kw) -> Settings:
    base = dict(data_dir=data_dir, user_buckets=4, covisit_window=2, covisit_topk=3,
                trending_half_life_s=HALF_LIFE_S, popular_push_n=1000)
    base.update(kw)
    return Settings(**base)


def ev(event_id, user, item, ts, partition, offset, type_="click", scene=None) -> dict:
    return dict(event_id=event_id, user_id=user, item_id=item, type=type_, ts=ts, scene=scene,
                context=None, partition=partition, offset=offset, ingest_ts=0)


def it(item, title, ts, partition, offset, deleted=None) -> dict:
    return dict(item_id=item, title=title, text=None, attributes=None, ts=ts, deleted=deleted,
                partition=partition, offset=offset, ingest_ts=0)


def write(settings: Settings, topic: str, rows: list[dict]) -> None:
    """Write `rows` as one log file per partition (like the consumer's flush)."""
    log = OfflineLog(settings.log_dir)
    schema = EVENT_LOG_SCHEMA if topic == EVENTS else ITEM_LOG_SCHEMA
    by_part = defaultdict(list)
    for r in rows:
        by_part[r["partition"]].append(r)
    for p, rs in sorted(by_part.items()):
        log.write(topic, p, pa.Table.from_pylist(sorted(rs, key=lambda r: r["offset"]), schema=schema))


def canonical(tables) -> dict[str, list[dict]]:
    """Every table as a list of rows in key order (file and bucket layout may differ)."""
    key = {"sequences": "user_id", "items": "item_id", "popularity": "item_id",
           "covisit_topk": "item_id", "covisit_counts": ("item_a", "item_b")}
    out = {}
    for name, k in key.items():
        rows = getattr(tables, name).to_pylist()
        out[name] = sorted(rows, key=(lambda r: tuple(r[c] for c in k)) if isinstance(k, tuple) else (lambda r: r[k]))
    return out


def assert_same_tables(a, b) -> None:
    ca, cb = canonical(a), canonical(b)
    for name in ca:
        if name == "popularity":
            assert [(r["item_id"], r["count"]) for r in ca[name]] == [(r["item_id"], r["count"]) for r in cb[name]]
            for ra, rb in zip(ca[name], cb[name]):
                assert math.isclose(ra["trending"], rb["trending"], rel_tol=1e-9, abs_tol=1e-12), ra["item_id"]
        else:
            assert ca[name] == cb[name], name
    assert a.manifest["ref_ts"] == b.manifest["ref_ts"]
    assert a.manifest["watermarks"] == b.manifest["watermarks"]
    assert a.manifest["counts"] == b.manifest["counts"]


def snapshot(features_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(features_dir)): p.stat().st_mtime_ns for p in features_dir.rglob("*") if p.is_file()}


# --- random log with duplicates, late events, equal timestamps, item updates and deletes -------


def random_log(seed: int = 7, partitions: int = 3, n_events: int = 400):
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(14)]
    items = [f"i{i}" for i in range(12)]
    part_of = {u: zlib.crc32(u.encode()) % partitions for u in users}
    per_part = defaultdict(list)  # offset order
    sent = []
    for n in range(n_events):
        r = rng.random()
        if sent and r < 0.12:  # a producer retry: same event_id, a later offset
            orig = dict(rng.choice(sent))
            if rng.random() < 0.5:  # ...sometimes with an earlier ts / another item (it wins the dedup)
                orig["ts"] -= rng.randrange(0, 60_000)
                orig["item_id"] = rng.choice(items)
            e = orig
        else:
            u = rng.choice(users)
            ts = TS0 + rng.randrange(0, 40) * 30_000  # coarse grid: many equal timestamps
            if n > n_events // 2 and rng.random() < 0.2:
                ts -= 600_000  # late: older than what earlier chunks already hold
            e = dict(event_id=f"e{n}", user_id=u, item_id=rng.choice(items), ts=ts,
                     type=rng.choice(["view", "click", "purchase"]), scene=rng.choice([None, "home", "search"]))
            sent.append(e)
        p = part_of[e["user_id"]]
        per_part[p].append(ev(e["event_id"], e["user_id"], e["item_id"], e["ts"], p, len(per_part[p]) * 2,
                              e["type"], e["scene"]))  # offsets with gaps (DLQ'd records)
    item_rows = defaultdict(list)
    for n in range(60):
        i = rng.choice(items)
        p = int(i[1:]) % 2
        item_rows[p].append(it(i, f"{i}-v{n}", TS0 + rng.randrange(0, 10) * 1000, p, len(item_rows[p]),
                               deleted=rng.choice([None, False, False, True]) if rng.random() < 0.3 else None))
    return per_part, item_rows


def chunks(per_part: dict[int, list], k: int) -> list[list[dict]]:
    out = [[] for _ in range(k)]
    for rows in per_part.values():
        size = math.ceil(len(rows) / k)
        for c in range(k):
            out[c].extend(rows[c * size:(c + 1) * size])
    return out


def reference(events: list[dict], item_rows: list[dict], window: int, topk: int, half_life_s: float):
    """The tables recomputed from scratch, in plain Python."""
    by_user = defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    seqs, count, pairs = {}, Counter(), Counter()
    kept_all = []
    for u, es in by_user.items():
        es.sort(key=lambda e: (e["ts"], e["partition"], e["offset"]))
        seen, kept = set(), []
        for e in es:
            if e["event_id"] not in seen:
                seen.add(e["event_id"])
                kept.append(e)
        seqs[u] = [e["item_id"] for e in kept]
        kept_all += kept
        for i in range(len(kept)):
            for j in range(i + 1, min(i + window, len(kept) - 1) + 1):
                a, b = kept[i]["item_id"], kept[j]["item_id"]
                if a != b:
                    pairs[(a, b)] += 1
                    pairs[(b, a)] += 1
    ref = max(e["ts"] for e in events)
    trending = defaultdict(float)
    for e in kept_all:
        count[e["item_id"]] += 1
        trending[e["item_id"]] += 2 ** (-(ref - e["ts"]) / (half_life_s * 1000))
    neigh = defaultdict(list)
    for (a, b), c in pairs.items():
        neigh[a].append((-c, b))
    topk_rows = {a: [b for _, b in sorted(v)[:topk]] for a, v in neigh.items()}
    latest = {}
    for r in sorted(item_rows, key=lambda r: (r["ts"], r["partition"], r["offset"])):
        latest[r["item_id"]] = r
    return seqs, count, trending, pairs, topk_rows, latest, ref


@pytest.mark.integration
def test_incremental_equals_full_and_reference(tmp_path, ray_local):
    per_part, item_rows = random_log()
    inc = make_settings(tmp_path / "inc")
    full = make_settings(tmp_path / "full")
    ev_chunks, it_chunks = chunks(per_part, 4), chunks(item_rows, 3)
    for c in range(4):
        for s in (inc, full):
            write(s, EVENTS, ev_chunks[c])
            if c < len(it_chunks):
                write(s, ITEMS, it_chunks[c])
        r = run_features(inc)
        assert not r.noop and r.version == c + 1 and r.new_events == len(ev_chunks[c])
        assert r.users_touched == len({e["user_id"] for e in ev_chunks[c]})
    r_full = run_features(full)
    log = OfflineLog(full.log_dir)
    assert r_full.version == 1 and r_full.new_files == len(log.list_files(EVENTS)) + len(log.list_files(ITEMS))
    a, b = load_feature_tables(inc), load_feature_tables(full)
    assert_same_tables(a, b)
    assert a.manifest["last_run"]["full"] is False and b.manifest["last_run"]["full"] is True

    # ...and both equal a plain-Python recompute.
    events = [e for c in ev_chunks for e in c]
    # (the data does exercise the hard case: a retry in a later chunk that sorts before the stored original)
    first_seen = {}
    for c, chunk in enumerate(ev_chunks):
        for e in chunk:
            first_seen.setdefault(e["event_id"], (c, e["ts"]))
    assert any(first_seen[e["event_id"]][0] < c and e["ts"] < first_seen[e["event_id"]][1]
               for c, chunk in enumerate(ev_chunks) for e in chunk)
    seqs, count, trending, pairs, topk_rows, latest, ref = reference(
        events, [r for c in it_chunks for r in c], inc.covisit_window, inc.covisit_topk, HALF_LIFE_S)
    assert a.manifest["ref_ts"] == ref
    assert {r["user_id"]: r["item_ids"] for r in a.sequences.to_pylist()} == seqs
    assert all(r["n"] == len(r["item_ids"]) == len(r["ts"]) == len(r["offsets"]) for r in a.sequences.to_pylist())
    pop = {r["item_id"]: r for r in a.popularity.to_pylist()}
    assert {k: v["count"] for k, v in pop.items()} == dict(count)
    for k, v in pop.items():
        assert math.isclose(v["trending"], trending[k], rel_tol=1e-9, abs_tol=1e-12)
    assert {(r["item_a"], r["item_b"]): r["count"] for r in a.covisit_counts.to_pylist()} == dict(pairs)
    assert {r["item_id"]: r["neighbors"] for r in a.covisit_topk.to_pylist()} == topk_rows
    assert {r["item_id"]: (r["title"], bool(r["deleted"])) for r in a.items.to_pylist()} == {
        k: (v["title"], bool(v["deleted"])) for k, v in latest.items()}
    # Garbage collection kept exactly the directories the last KEEP_VERSIONS manifests use.
    assert a.manifest["history"] == [2, 3, 4]
    used = {f"v{v:06d}" for v in a.manifest["history"]}
    for v in a.manifest["history"]:
        m = json.loads((inc.features_dir / f"v{v:06d}" / "manifest.json").read_text())
        used |= {f.split("/")[0] for name, es in m["tables"].items() for e in es for f in entry_files(name, e)}
    assert {p.name for p in inc.features_dir.glob("v*")} == used

    # A second run with no new files: a no-op that writes nothing.
    manifest_bytes = inc.features_dir.joinpath("manifest.json").read_bytes()
    before = snapshot(inc.features_dir)
    r2 = run_features(inc, progress=True)
    assert r2.noop and r2.version == 4 and r2.new_files == 0
    assert inc.features_dir.joinpath("manifest.json").read_bytes() == manifest_bytes
    assert snapshot(inc.features_dir) == before
    assert_same_tables(load_feature_tables(inc), a)

    # full=True rebuilds from the whole log as a new version, with the same content.
    r3 = run_features(inc, full=True)
    assert r3.version == 5 and not r3.noop
    rebuilt = load_feature_tables(inc)
    assert rebuilt.manifest["last_run"]["full"] and rebuilt.manifest["history"] == [3, 4, 5]
    assert_same_tables(rebuilt, a)

    # A changed parameter (the co-visitation window) forces a rebuild with the new value.
    wider = make_settings(tmp_path / "inc", covisit_window=3)
    assert not run_features(wider).noop
    t = load_feature_tables(wider)
    assert t.manifest["last_run"]["full"] and t.manifest["params"]["covisit_window"] == 3
    pairs3 = reference(events, [r for c in it_chunks for r in c], 3, inc.covisit_topk, HALF_LIFE_S)[3]
    assert {(r["item_a"], r["item_b"]): r["count"] for r in t.covisit_counts.to_pylist()} == dict(pairs3)


@pytest.mark.integration
def test_hand_checked_values(tmp_path, ray_local):
    s = make_settings(tmp_path, covisit_window=2, covisit_topk=2, trending_half_life_s=1.0)
    write(s, EVENTS, [
        ev("e1", "u1", "i1", 1000, 0, 0),
        ev("e2", "u1", "i2", 2000, 0, 1, scene="home"),
        ev("e3", "u1", "i3", 2000, 0, 2),  # same ts as e2: source order (offset) decides
    ])
    write(s, ITEMS, [it("i1", "one", 100, 0, 0), it("i2", "two", 100, 1, 0), it("i3", "three", 500, 0, 1)])
    run_features(s)
    t = load_feature_tables(s)
    assert t.manifest["ref_ts"] == 2000
    assert sorted((r["item_id"], r["count"], r["trending"]) for r in t.popularity.to_pylist()) == [
        ("i1", 1, 0.5), ("i2", 1, 1.0), ("i3", 1, 1.0)]

    write(s, EVENTS, [
        ev("e2", "u1", "i2", 2000, 0, 3),  # retry of e2: dropped
        ev("e4", "u1", "i1", 1500, 0, 4, type_="like"),  # late: lands between e1 and e2
        ev("e5", "u2", "i2", 3000, 1, 0),
        ev("e6", "u2", "i3", 3000, 1, 1),
    ])
    write(s, ITEMS, [
        it("i1", "one v2", 200, 0, 2),  # update
        it("i2", "two", 300, 1, 1, deleted=True),  # delete
        it("i3", "three old", 400, 0, 3),  # older ts than the live record: ignored
    ])
    before = time.time()
    r = run_features(s)
    assert (r.version, r.new_files, r.new_events, r.users_touched) == (2, 4, 4, 2)
    # ...and the run's outcome metrics (streaming/features/run_metrics.py) say the same.
    prom = read_job_metrics(metrics_file(s, run_metrics.FEATURES_METRICS))
    assert [prom.value(n) for n in (run_metrics.LAST_RUN_OK, run_metrics.VERSION, run_metrics.LAST_FILES,
                                    run_metrics.LAST_ROWS)] == [1, 2, 4, 4]
    assert before <= prom.value(run_metrics.LAST_SUCCESS) == prom.value(run_metrics.LAST_RUN) <= time.time()
    assert 0 < prom.value(run_metrics.LAST_DURATION) <= prom.value(run_metrics.LAST_RUN) - before
    t = load_feature_tables(s)
    seq = {row["user_id"]: row for row in t.sequences.to_pylist()}
    assert seq["u1"]["item_ids"] == ["i1", "i1", "i2", "i3"]
    assert seq["u1"]["ts"] == [1000, 1500, 2000, 2000]
    assert seq["u1"]["event_ids"] == ["e1", "e4", "e2", "e3"]
    assert seq["u1"]["offsets"] == [0, 4, 1, 2]
    assert seq["u1"]["types"] == ["click", "like", "click", "click"]
    assert seq["u1"]["scenes"] == [None, None, "home", None]
    assert seq["u1"]["n"] == 4 and seq["u2"]["item_ids"] == ["i2", "i3"]
    # ref_ts 3000, half-life 1 s: 2^(-(3000 - ts)/1000) per event.
    pop = {row["item_id"]: (row["count"], row["trending"]) for row in t.popularity.to_pylist()}
    assert pop.keys() == {"i1", "i2", "i3"} and t.manifest["ref_ts"] == 3000
    for item, (n, trend) in {"i1": (2, 2 ** -2 + 2 ** -1.5), "i2": (2, 2 ** -1 + 1), "i3": (2, 2 ** -1 + 1)}.items():
        assert pop[item][0] == n and math.isclose(pop[item][1], trend, rel_tol=1e-12)
    # Window 2 over u1 = i1 i1 i2 i3 and u2 = i2 i3: (i1,i2) x2, (i1,i3) x1, (i2,i3) x1 + x1; i1-i1 not a pair.
    counts = {(row["item_a"], row["item_b"]): row["count"] for row in t.covisit_counts.to_pylist()}
    assert counts == {("i1", "i2"): 2, ("i2", "i1"): 2, ("i1", "i3"): 1, ("i3", "i1"): 1,
                      ("i2", "i3"): 2, ("i3", "i2"): 2}
    topk = {row["item_id"]: (row["neighbors"], row["scores"]) for row in t.covisit_topk.to_pylist()}
    assert topk == {"i1": (["i2", "i3"], [2, 1]), "i2": (["i1", "i3"], [2, 2]), "i3": (["i2", "i1"], [2, 1])}
    items = {row["item_id"]: (row["title"], row["deleted"]) for row in t.items.to_pylist()}
    assert items == {"i1": ("one v2", False), "i2": ("two", True), "i3": ("three", False)}
    m = t.manifest
    assert m["watermarks"] == {"events": {"0": 4, "1": 1}, "items": {"0": 3, "1": 1}}
    assert m["counts"]["events"] == 6 and m["counts"]["users"] == 2 and m["counts"]["deleted_items"] == 1
    # Every path in the manifest exists; unchanged files are referenced, not copied.
    assert all((s.features_dir / f).is_file() for name, es in m["tables"].items() for e in es
               for f in entry_files(name, e))


@pytest.mark.integration
def test_crash_before_publish_keeps_previous_version(tmp_path, ray_local, monkeypatch):
    per_part, item_rows = random_log(seed=11, n_events=120)
    ev_chunks = chunks(per_part, 2)
    crashed, clean = make_settings(tmp_path / "crashed"), make_settings(tmp_path / "clean")
    for s in (crashed, clean):
        write(s, EVENTS, ev_chunks[0])
        write(s, ITEMS, [r for rs in item_rows.values() for r in rs])
        run_features(s)
        write(s, EVENTS, ev_chunks[1])
    run_features(clean)

    live = crashed.features_dir / "manifest.json"
    manifest_before = live.read_bytes()
    tables_before = load_feature_tables(crashed)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash before the manifest swap")

    monkeypatch.setattr(store, "publish_manifest", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_features(crashed)
    monkeypatch.undo()
    # The crashed run wrote bucket files, but the old manifest is still live and complete.
    assert any((crashed.features_dir / "v000002" / "sequences").glob("*.parquet"))
    assert live.read_bytes() == manifest_before
    assert_same_tables(load_feature_tables(crashed), tables_before)

    r = run_features(crashed)
    assert r.version == 3 and not r.noop and r.new_events == len(ev_chunks[1])
    assert_same_tables(load_feature_tables(crashed), load_feature_tables(clean))
    assert not (crashed.features_dir / "v000002").exists()  # the unpublished leftover was collected


def test_a_second_run_waits_for_the_lock(tmp_path, monkeypatch):
    s = make_settings(tmp_path)
    s.features_dir.mkdir(parents=True)
    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.3)
    with open(s.features_dir / ".lock", "a+") as held:  # another run, as far as flock can tell
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(features.FeaturesBusyError):
            run_features(s)
    assert run_features(s).noop  # the log is empty: nothing to do, and the lock was free again


# --- Redis push --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(request, tmp_path_factory):
    """The session's embedded stack Redis when conftest provides one, else a private redis-server."""
    try:
        yield request.getfixturevalue("embedded_stack").redis_url
        return
    except pytest.FixtureLookupError:
        pass
    from tests.fixtures.redis_server import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.mark.integration
def test_push_to_redis(tmp_path, ray_local, redis_url, monkeypatch):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"test-features-{tmp_path.name}:"
    s = make_settings(tmp_path, popular_push_n=2, redis_prefix=prefix, trending_half_life_s=1.0)
    rows, off = [], 0
    for item, n, ts in (("a", 3, 1000), ("b", 2, 5000), ("c", 1, 9000), ("d", 5, 9000)):
        for k in range(n):
            rows.append(ev(f"{item}{k}", f"u{k}", item, ts, 0, off))
            off += 1
    write(s, EVENTS, rows)
    write(s, ITEMS, [it(i, i, 1, 0, n, deleted=(i == "d")) for n, i in enumerate("abcd")])
    r = run_features(s, redis_client=client)

    # d is the most popular and trending, but deleted: never in the fallback.
    assert client.zrevrange(f"{prefix}feat:popular", 0, -1, withscores=True) == [("a", 3.0), ("b", 2.0)]
    trending = client.zrevrange(f"{prefix}feat:trending", 0, -1, withscores=True)
    assert [m for m, _ in trending] == ["c", "b"]
    assert math.isclose(trending[0][1], 1.0) and math.isclose(trending[1][1], 2 * 2 ** -4)
    meta = client.hgetall(f"{prefix}feat:meta")
    assert meta["version"] == str(r.version) and meta["ref_ts"] == "9000"
    assert client.ttl(f"{prefix}feat:popular") == -1  # the temp key's expiry did not follow the RENAME
    assert not client.keys(f"{prefix}feat:*:tmp:*") and not client.exists(f"{prefix}feat:lock")

    # A no-op run re-pushes only when Redis lost the data (e.g. restarted empty).
    client.delete(f"{prefix}feat:popular", f"{prefix}feat:meta")
    assert run_features(s, redis_client=client).noop
    assert client.zrevrange(f"{prefix}feat:popular", 0, -1) == ["a", "b"]

    # An explicit push of the same tables gives the same keys.
    push_popularity_to_redis(load_feature_tables(s), client, s)
    assert client.zrevrange(f"{prefix}feat:trending", 0, -1) == ["c", "b"]

    # A run on another host holds the redis lock: this one waits, then gives up.
    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.3)
    client.set(f"{prefix}feat:lock", "another-host", px=60_000)
    with pytest.raises(features.FeaturesBusyError):
        run_features(s, redis_client=client)
    client.delete(*client.keys(f"{prefix}*"))

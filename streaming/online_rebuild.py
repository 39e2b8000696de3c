"""`streamrec rebuild-online`: the Redis online store rebuilt from the Parquet offline log.

For when Redis is lost for good (no AOF to restart from). Every `streamrec ingest` must be
stopped first: the rebuild is the only writer while it runs. It writes, under
`Settings.redis_prefix`, what ingest and the feature job write (`streaming.online_store`):

* **events** -- each partition's log files in offset order go through the same Lua script as
  ingest (`OnlineStore.apply_events`), in batches of `EVENT_BATCH`: recent items per user,
  popularity, the watermark. Both results are independent of how the events were batched (a
  user's set holds the `recent_items_max` items with the latest ts, counters are sums).
* **the user TTL policy** (`STREAMREC_USER_TTL_S` > 0) -- ingest renews a user's key at the
  user's events, so a key exists only while its user was active within the TTL, and a user
  who comes back after a longer pause starts an empty key. The rebuild reproduces that from
  the log's `ingest_ts` (when ingest read each event; `recent_windows`): a user whose last
  event was read more than a TTL ago gets no key (their events still count in popularity), a
  user's events before their last pause longer than the TTL are left out of the key, and each
  key expires one TTL after its user's last event was read (PEXPIREAT; ingest's own expiry is
  up to a 30th of the TTL sooner, `online_store.TTL_RENEW_SLACK`). Expiry times use the
  ingest hosts' clocks, compared with Redis's `TIME`.
* **the catalog** -- the item log through `OnlineStore.apply_items` (item hashes, the live set,
  the change stream, the watermark). The change stream gets new entry ids, all newer than any
  position a serving replica held in the lost Redis, so every replica finds its position gone
  and re-reads the live set (`services.catalog_follower`); entries state the same final
  catalog, but not one for one (ingest writes one entry per item and poll batch).
* **watermarks** -- set at the end, per partition, to the last offset its log files hold,
  raised to the consumer group's committed offset - 1 when those are given (`committed_offsets`;
  the CLI reads them when Kafka answers): ingest commits only once every good
  record below the commit is in the log, so what lies between is records that went to the DLQ,
  which ingest's watermark covers too. A restarted ingest then skips what the log holds and
  re-applies what Redis had but the log had not yet flushed (never committed, so Kafka delivers it
  again). From the log alone, a partition that ended in DLQ records gets a lower watermark than
  ingest had: ingest re-reads those records once (the DLQ gets them twice; it is at-least-once).
* **the feature push** -- popular / trending of the live feature version
  (`streaming.features.redis_push`), under the feature run lock like a feature run's push.

Not rebuilt: serving replicas' heartbeats (`serve:replicas`, rewritten every few seconds by
running replicas), a feature run's lock, and the broker identity ingest records beside the
watermarks (the log does not say which broker it came from; ingest records it again).

A target that already holds keys under the prefix is refused (`RebuildRefused`, naming the
count and the prefix), except the replicas' heartbeats; `force=True` deletes every key under
the prefix first. Cost: with a TTL, a first pass reads `user_id` and `ingest_ts` of every event
(memory: about 20 bytes per event, plus ~200 bytes per user); the second pass reads the files
once more and applies them. Measured on two busy CPU cores: 1M events of 20k users in 17-24 s,
about half of it Redis running the events script (as much as ingest spends on the same events).
"""

from __future__ import annotations

import json
import time
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import redis
from kafka import TopicPartition
from kafka.errors import KafkaError

from streaming import kafka_io
from streaming.events import ITEM_JSON_COLUMNS, ITEM_LOG_SCHEMA, ONLINE_EVENT_FIELDS, Item
from streaming.features.redis_push import push_popularity_to_redis
from streaming.features.store import run_lock
from streaming.features.tables import ITEMS, POPULARITY, load_tables, read_manifest
from streaming.offline_log import LogFile, OfflineLog
from streaming.online_store import OnlineStore
from streaming.settings import Settings, redact_url

EVENT_BATCH = 5000  # events per call of the events script (ingest's polls are of this order)
ITEM_BATCH = 1000  # catalog records per transaction
PIPELINE_CHUNK = 10_000  # commands per pipeline round trip (expiries, watermarks, deletes, counters)
SCAN_COUNT = 1000  # SCAN hint when counting or deleting the prefix's keys
KEYS_NAMED = 5  # keys quoted in the refusal message
# Keys running processes rewrite into any Redis they reach, holding no online state: serving
# replicas' heartbeat hash (services.serve_app). They do not make a target "not empty".
SELF_HEALING_SUFFIXES = ("serve:replicas",)
MS_PER_S = 1000
COMMITTED_TIMEOUT_MS = 10_000  # per partition, when reading the consumer group's committed offsets

# What the events script reads of an event (`ONLINE_EVENT_FIELDS`): a row of the log carries
# them under the same names, so this light record stands in for a validated `Event`.
OnlineEvent = namedtuple("OnlineEvent", ONLINE_EVENT_FIELDS)
EVENT_COLUMNS_READ = ("offset", *ONLINE_EVENT_FIELDS, "ingest_ts")


class RebuildError(RuntimeError):
    """The rebuild cannot start: no log, no Redis, nothing to rebuild from."""


class RebuildRefused(RebuildError):
    """The target Redis already holds keys under the prefix (and `force` was not given)."""

    def __init__(self, prefix: str, count: int, sample: list[str]):
        self.prefix, self.count, self.sample = prefix, count, sample
        named = ", ".join(sample) + (", ..." if count > len(sample) else "")
        super().__init__(
            f"the target Redis already holds {count} key(s) under the prefix {prefix!r} ({named}); "
            f"rebuild-online writes into an empty store only. Stop every `streamrec ingest` first; "
            f"`streamrec rebuild-online --force` deletes those {count} key(s) and rebuilds"
        )


@dataclass
class RebuildResult:
    """What one rebuild wrote."""

    events: int = 0
    items: int = 0
    event_files: int = 0
    item_files: int = 0
    users: int = 0  # users given a recent-items key
    expired_users: int = 0  # users whose key had expired under the TTL policy
    deleted_keys: int = 0  # keys removed first (force)
    watermarks: dict[str, dict[int, int]] = field(default_factory=dict)
    feature_version: int | None = None  # the pushed feature version (None: none published)
    seconds: float = 0.0


@dataclass(frozen=True)
class RecentWindows:
    """Per user, under the TTL policy: the earliest `ingest_ts` (ms) of the events that feed the
    user's key, and when the key expires (epoch ms). Users whose key had expired are absent."""

    recent_from_ms: dict[str, int]
    expire_at_ms: dict[str, int]
    expired_users: int


def watermarks_from_files(files: Iterable[LogFile]) -> dict[str, dict[int, int]]:
    """{topic: {partition: last offset held}} of some log files (their names carry the range)."""
    out: dict[str, dict[int, int]] = {}
    for f in files:
        parts = out.setdefault(f.topic, {})
        parts[f.partition] = max(parts.get(f.partition, -1), f.end)
    return out


def merge_committed(marks: dict[str, dict[int, int]], committed: dict[tuple[str, int], int] | None
                    ) -> dict[str, dict[int, int]]:
    """The watermarks: the log's last offsets, raised to committed offset - 1 where the group
    committed further (every offset below a commit is done: logged, or in the DLQ)."""
    out = {topic: dict(parts) for topic, parts in marks.items()}
    for (topic, partition), offset in (committed or {}).items():
        if offset > 0:
            parts = out.setdefault(topic, {})
            parts[partition] = max(parts.get(partition, -1), offset - 1)
    return out


def committed_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """{(topic, partition): offset} the ingest consumer group committed on the events, items and
    impressions topics, read without joining the group. Raises `kafka_io.KafkaUnavailable`."""
    consumer = kafka_io.make_consumer(settings)
    try:
        out = {}
        for topic in (settings.events_topic, settings.items_topic, settings.impressions_topic):
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                offset = consumer.committed(TopicPartition(topic, partition), timeout_ms=COMMITTED_TIMEOUT_MS)
                if offset is not None:
                    out[(topic, partition)] = int(offset)
        return out
    except KafkaError as exc:
        raise kafka_io.KafkaUnavailable(f"cannot read the committed offsets of the consumer group "
                                        f"{settings.consumer_group!r} at {settings.kafka_bootstrap_servers}: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


def recent_windows(user_ids: pa.Array | pa.ChunkedArray, ingest_ts: np.ndarray, ttl_s: int,
                   now_ms: int) -> RecentWindows:
    """The TTL policy on the whole event log (see the module docstring), vectorized.

    `user_ids[k]` read at `ingest_ts[k]` (ms), in any order. A user's key restarts empty after a
    pause of at least `ttl_s` between two of their events, and is gone when the last one is at
    least `ttl_s` old at `now_ms`."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s={ttl_s!r}: the policy applies only with a TTL (> 0)")
    ttl_ms = int(ttl_s) * MS_PER_S
    encoded = pa.chunked_array([user_ids]) if isinstance(user_ids, pa.Array) else user_ids
    encoded = encoded.combine_chunks().dictionary_encode() if len(encoded) else pa.array([], pa.string()).dictionary_encode()
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    ts = np.asarray(ingest_ts, dtype=np.int64)
    if len(codes) != len(ts):
        raise ValueError(f"{len(codes)} user ids but {len(ts)} ingest times")
    if not len(codes):
        return RecentWindows({}, {}, 0)
    order = np.lexsort((ts, codes))
    c, t = codes[order], ts[order]
    # A window starts at a user's first event and after each pause of at least a TTL.
    starts = np.ones(len(c), dtype=bool)
    starts[1:] = (c[1:] != c[:-1]) | (t[1:] - t[:-1] >= ttl_ms)
    recent_from = np.full(len(names), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(recent_from, c[starts], t[starts])  # sorted by time: the last window wins
    last = np.full(len(names), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, c, t)
    expire_at = last + ttl_ms
    alive = expire_at > now_ms
    keep = np.flatnonzero(alive)
    return RecentWindows(
        recent_from_ms={names[k]: int(recent_from[k]) for k in keep},
        expire_at_ms={names[k]: int(expire_at[k]) for k in keep},
        expired_users=int(len(names) - len(keep)),
    )


def split_events(rows: dict[str, list], windows: RecentWindows | None) -> tuple[list[tuple[int, OnlineEvent]], Counter]:
    """One log file's rows (columns `EVENT_COLUMNS_READ` as lists) as the events script's records,
    and the interactions left out of users' keys by the TTL policy (item -> count): those still
    count in popularity."""
    records: list[tuple[int, OnlineEvent]] = []
    outside: Counter = Counter()
    columns = [rows[c] for c in EVENT_COLUMNS_READ]
    if windows is None:
        for offset, user, item, ts, _ in zip(*columns):
            records.append((offset, OnlineEvent(user, item, ts)))
        return records, outside
    start = windows.recent_from_ms
    for offset, user, item, ts, read_at in zip(*columns):
        since = start.get(user)
        if since is not None and read_at >= since:
            records.append((offset, OnlineEvent(user, item, ts)))
        else:
            outside[item] += 1
    return records, outside


def item_from_row(row: dict[str, Any]) -> Item:
    """A catalog log row as the `Item` ingest applied (dict fields are JSON text in the log)."""
    values = {k: row[k] for k in Item.model_fields if row.get(k) is not None}
    for name in ITEM_JSON_COLUMNS:
        if name in values:
            values[name] = json.loads(values[name])
    return Item.model_validate(values)


# --- the target ---------------------------------------------------------------------------------
def prefix_keys(client: redis.Redis, prefix: str) -> list[str]:
    """Every key under `prefix`, except the self-healing ones (`SELF_HEALING_SUFFIXES`)."""
    skip = {prefix + s for s in SELF_HEALING_SUFFIXES}
    keys = (k.decode() if isinstance(k, bytes) else k
            for k in client.scan_iter(match=_glob_escape(prefix) + "*", count=SCAN_COUNT))
    return [k for k in keys if k not in skip]


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix` (the self-healing ones too); returns how many."""
    keys = list(client.scan_iter(match=_glob_escape(prefix) + "*", count=SCAN_COUNT))
    for i in range(0, len(keys), PIPELINE_CHUNK):
        client.unlink(*keys[i:i + PIPELINE_CHUNK])
    return len(keys)


def check_target(client: redis.Redis, settings: Settings, force: bool) -> int:
    """Refuse a target holding keys under the prefix unless `force` (then delete them all).
    Returns the keys deleted. A Redis that does not answer is a `RebuildError` naming its URL."""
    prefix = settings.redis_prefix
    try:
        client.ping()
        keys = prefix_keys(client, prefix)
        if keys and not force:
            raise RebuildRefused(prefix, len(keys), sorted(keys)[:KEYS_NAMED])
        return delete_prefix(client, prefix) if force else 0
    except redis.ConnectionError as exc:
        raise RebuildError(f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}; start it (or set "
                           f"STREAMREC_REDIS_URL to the new one) and rerun `streamrec rebuild-online`") from None


def check_log(settings: Settings) -> tuple[OfflineLog, list[LogFile], list[LogFile]]:
    """The log and its event and item files; a missing or empty log is a `RebuildError`."""
    log = OfflineLog(settings.log_dir)
    info = log.fs.get_file_info(log.root)
    if info.type != pafs.FileType.Directory:
        raise RebuildError(f"no offline log at {settings.log_dir}: set STREAMREC_DATA_DIR (the log is "
                           f"<data dir>/log) to the data directory ingest wrote, then rerun `streamrec rebuild-online`")
    ev_files = log.list_files(settings.events_topic)
    it_files = log.list_files(settings.items_topic)
    if not ev_files and not it_files:
        raise RebuildError(f"the offline log {settings.log_dir} holds no files of the topics "
                           f"{settings.events_topic!r} / {settings.items_topic!r}: check STREAMREC_EVENTS_TOPIC / "
                           f"STREAMREC_ITEMS_TOPIC and STREAMREC_DATA_DIR")
    return log, ev_files, it_files


# --- the rebuild --------------------------------------------------------------------------------
def rebuild_online(settings: Settings, client: redis.Redis, *, force: bool = False,
                   committed: dict[tuple[str, int], int] | None = None,
                   progress: Callable[[str, int], None] | None = None) -> RebuildResult:
    """Rebuild the online store under `settings.redis_prefix` in `client` from the offline log
    (see the module docstring). `committed` (`committed_offsets`): the ingest group's committed
    offsets, which raise the watermarks over trailing DLQ records. `progress(stage, n)` is called
    once with "total" (files to read) and with "files" (n more read). Raises `RebuildRefused` for
    a non-empty target without `force`, `RebuildError` for a missing log or an unreachable Redis."""
    started = time.monotonic()
    log, ev_files, it_files = check_log(settings)
    result = RebuildResult(event_files=len(ev_files), item_files=len(it_files))
    # impressions have no online state, only their watermarks (streaming.ingest_topics): from their log files too
    log_marks = watermarks_from_files([*ev_files, *it_files, *log.list_files(settings.impressions_topic)])
    result.deleted_keys = check_target(client, settings, force)
    report = progress or (lambda stage, n: None)
    passes = 2 if settings.user_ttl_s > 0 else 1  # the TTL policy reads the event files twice
    report("total", passes * len(ev_files) + len(it_files))
    store = OnlineStore(client, settings.redis_prefix, settings.recent_items_max, settings.user_ttl_s)

    for f in it_files:
        table = pq.read_table(f.path, filesystem=log.fs, schema=ITEM_LOG_SCHEMA)
        rows = table.to_pylist()
        for i in range(0, len(rows), ITEM_BATCH):
            chunk = [(r["offset"], item_from_row(r)) for r in rows[i:i + ITEM_BATCH]]
            store.apply_items(f.topic, f.partition, chunk)
        result.items += len(rows)
        report("files", 1)

    windows = None
    if settings.user_ttl_s > 0 and ev_files:
        windows = _read_windows(log, ev_files, settings.user_ttl_s, _redis_now_ms(client), report)
        result.users, result.expired_users = len(windows.recent_from_ms), windows.expired_users
    outside: Counter = Counter()
    users: set[str] = set()
    for f in ev_files:
        table = pq.read_table(f.path, filesystem=log.fs, columns=list(EVENT_COLUMNS_READ))
        records, left_out = split_events(table.to_pydict(), windows)
        outside.update(left_out)
        for i in range(0, len(records), EVENT_BATCH):
            store.apply_events(f.topic, f.partition, records[i:i + EVENT_BATCH])
        if windows is None:
            users.update(e.user_id for _, e in records)
        result.events += table.num_rows
        report("files", 1)
    if windows is None:
        result.users = len(users)

    _count_outside(client, store.popularity_key, outside)
    if windows is not None:
        _expire_users(client, store, windows)
    result.watermarks = merge_committed(log_marks, committed)
    _set_watermarks(client, store, result.watermarks)
    result.feature_version = push_features(settings, client)
    result.seconds = time.monotonic() - started
    return result


def _redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * MS_PER_S + int(micros) // 1000


def _read_windows(log: OfflineLog, files: list[LogFile], ttl_s: int, now_ms: int,
                  report: Callable[[str, int], None]) -> RecentWindows:
    users, read_at = [], []
    for f in files:
        t = pq.read_table(f.path, filesystem=log.fs, columns=["user_id", "ingest_ts"])
        users.extend(t["user_id"].chunks)
        read_at.append(t["ingest_ts"].to_numpy())
        report("files", 1)
    ids = pa.chunked_array(users, type=pa.string())
    return recent_windows(ids, np.concatenate(read_at) if read_at else np.array([], np.int64), ttl_s, now_ms)


def _count_outside(client: redis.Redis, key: str, counts: Counter) -> None:
    """Interactions of users whose key had expired: popularity only (as ingest counted them)."""
    items = list(counts.items())
    for i in range(0, len(items), PIPELINE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for item, n in items[i:i + PIPELINE_CHUNK]:
            pipe.zincrby(key, n, item)
        pipe.execute()


def _expire_users(client: redis.Redis, store: OnlineStore, windows: RecentWindows) -> None:
    entries = list(windows.expire_at_ms.items())
    for i in range(0, len(entries), PIPELINE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for user, at_ms in entries[i:i + PIPELINE_CHUNK]:
            pipe.pexpireat(store.recent_key(user), at_ms)
        pipe.execute()


def _set_watermarks(client: redis.Redis, store: OnlineStore, marks: dict[str, dict[int, int]]) -> None:
    pipe = client.pipeline(transaction=True)
    for topic, parts in marks.items():
        for partition, offset in parts.items():
            pipe.set(store.watermark_key(topic, partition), offset)
    pipe.execute()


def push_features(settings: Settings, client: redis.Redis) -> int | None:
    """Push popular / trending of the live feature version, as a feature run does (under its lock,
    so an older version never overwrites a newer one); the version pushed, None when none exists."""
    if read_manifest(settings) is None:
        return None
    features_dir = Path(settings.features_dir).absolute()
    with run_lock(features_dir, client, settings):
        manifest = read_manifest(settings)
        push_popularity_to_redis(load_tables(settings, manifest, (ITEMS, POPULARITY)), client, settings)
        return int(manifest["version"])


__all__ = [
    "EVENT_BATCH", "ITEM_BATCH", "OnlineEvent", "RebuildError", "RebuildRefused", "RebuildResult", "RecentWindows",
    "check_log", "check_target", "committed_offsets", "delete_prefix", "item_from_row", "merge_committed", "prefix_keys", "push_features", "rebuild_online", "recent_windows",
    "split_events", "watermarks_from_files",
]

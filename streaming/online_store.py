"""The online store (Redis): what serving reads per request.

Keys (all under `Settings.redis_prefix`, `sr:` by default):

| key | type | holds |
| --- | --- | --- |
| `u:<pseudonym>:recent` | sorted set item -> last ts (ms) | the user's recent distinct items, newest first, capped; TTL (the user id is a pseudonym: streaming.pseudonym) |
| `i:<item>` | hash | title, text, attributes (JSON), ts, deleted (0/1) |
| `items:live` | set | ids of items that exist and are not deleted |
| `items:log` | stream | one entry (`item_id`, `deleted`) per catalog change, capped at `CATALOG_LOG_MAX` |
| `pop:all` | sorted set item -> count | all-time interaction counters (online popularity) |
| `wm:<topic>:<partition>` | string | last Kafka offset processed from that partition (applied, or a bad record sent to the DLQ) |
| `broker` | hash | the Kafka cluster id and topic ids the watermarks belong to (`streaming.broker_identity`) |
| `feat:popular`, `feat:trending`, `feat:meta` | | pushed by the feature job (streaming.features) |

Exactly-once effect: a batch from one partition is applied atomically together with the
advance of `wm:<topic>:<partition>`, and records at or below that watermark are skipped, so a
replayed offset range (consumer crash before its commit, a rebalance, a zombie consumer
finishing a batch late) changes nothing. The watermark also covers a batch's trailing bad records
(`upto`): it says "every offset up to here is done", so ingest can tell a Redis that lost its last
second (watermark + 1 below the committed offset: `streaming.ingest` re-reads from there) from one
whose partition merely ended in DLQ records. Events go through one Lua script per batch (atomic
in Redis, one round trip, the per-record work done server-side); catalog records, which are
few, through a WATCH/MULTI transaction. The script touches keys it derives from the batch,
so it needs a standalone Redis (or Redis Cluster with every key in one hash slot).

Memory: Redis runs with `noeviction` (evicting a watermark would double count a replay), so a
key nobody deletes stays forever. Per-user keys therefore carry a TTL (`STREAMREC_USER_TTL_S`),
renewed by the same script for every user a batch touches -- once per user and batch, not per
event -- so an active user's key never expires and an inactive one's goes. The renewal reads the
key's TTL and rewrites it only once it has run down by `TTL_RENEW_SLACK` of the setting (a write
costs more than a read and adds a command to the AOF): a key expires between (1 - slack) x TTL
and TTL after its user's last event. The price is one Redis call per user and batch: on
bench/ingest.py's event stream, `apply_events` took 8% longer than without a TTL (Redis CPU +11%);
a plain EXPIRE per user and batch cost 13-19%.
"""

from __future__ import annotations

import json
import operator
from typing import Any, Iterable, Sequence

import redis

from streaming.events import ONLINE_EVENT_FIELDS, Event, Item
from streaming.settings import DEFAULT_USER_TTL_S

# A user's key TTL is rewritten once less than (1 - this) of it is left, not at every batch: see the
# module docstring. 1/30: with 30 days, at most one rewrite per active user and day.
TTL_RENEW_SLACK = 1 / 30

# Entries kept in the catalog change log (approximate trim). A follower that falls further
# behind than this (it polls every second) re-reads `items:live` instead.
CATALOG_LOG_MAX = 100_000

# What each record of the events script's batch holds: its offset, then the event's fields in
# the contract's order (`streaming.events.ONLINE_EVENT_FIELDS`). The script reads the fields by
# the index constants generated from this tuple, never by a hand-written position.
LUA_RECORD_FIELDS = ("offset", *ONLINE_EVENT_FIELDS)
LUA_FIELD_INDEX = {name: i for i, name in enumerate(LUA_RECORD_FIELDS, 1)}  # Lua arrays are 1-based


def lua_field_constant(name: str) -> str:
    """The Lua constant holding the index of record field `name` ("ts" -> "TS")."""
    return name.upper()


# KEYS[1] watermark; ARGV[1] key prefix; ARGV[2] recent-items cap;
# ARGV[3] JSON [[offset, <ONLINE_EVENT_FIELDS...>], ...] in offset order;
# ARGV[4] per-user key TTL in seconds (0: none); ARGV[5] rewrite the TTL when fewer seconds are left;
# ARGV[6] the last offset of the partition batch (bad records included; -1: the last record's): the
# watermark advances to it.
APPLY_EVENTS_LUA = (
    "local " + ", ".join(lua_field_constant(n) for n in LUA_RECORD_FIELDS)
    + " = " + ", ".join(str(LUA_FIELD_INDEX[n]) for n in LUA_RECORD_FIELDS) + "\n"
) + """
local call, fmt = redis.call, string.format  -- one global lookup per batch, not per event
local wm = tonumber(call('GET', KEYS[1]) or '-1')
local prefix, cap, ttl, renew_below = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
local upto = tonumber(ARGV[6] or '-1')
local popularity = prefix .. 'pop:all'
local records = cjson.decode(ARGV[3])
local applied, last = 0, nil
local users, counts = {}, {}  -- users: recent-set key -> whether it gained a member
for _, r in ipairs(records) do
  if r[OFFSET] > wm then
    local recent = prefix .. 'u:' .. r[USER_ID] .. ':recent'
    -- cjson decodes numbers as doubles: the score goes out as integer text (ts < 2^53, exact)
    local added = call('ZADD', recent, 'GT', fmt('%d', r[TS]), r[ITEM_ID]) > 0
    users[recent] = users[recent] or added
    counts[r[ITEM_ID]] = (counts[r[ITEM_ID]] or 0) + 1
    applied = applied + 1
    last = r[OFFSET]
  end
end
for item, n in pairs(counts) do  -- one call per distinct item, not per event
  call('ZINCRBY', popularity, n, item)
end
for key, grew in pairs(users) do  -- once per user of the batch, not per event
  if grew then  -- only a new member can push the set over its cap
    call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
  end
  if ttl > 0 then  -- the user's events renew the TTL (-1, none yet, renews too)
    if call('TTL', key) < renew_below then
      call('EXPIRE', key, ttl)
    end
  else
    call('PERSIST', key)  -- 0 means never: drop a TTL set under an earlier setting
  end
end
if upto > wm and (last == nil or upto > last) then
  last = upto  -- the batch ended in records that went to the DLQ: they are done too
end
if last then
  call('SET', KEYS[1], fmt('%d', last))
end
return applied
"""

_online_fields = operator.attrgetter(*ONLINE_EVENT_FIELDS)
_online_items = operator.itemgetter(*ONLINE_EVENT_FIELDS)


def lua_events_payload(records: Sequence[tuple[int, Event | dict[str, Any]]]) -> str:
    """ARGV[3] of the events script: JSON [[offset, <ONLINE_EVENT_FIELDS...>], ...]. An event is an
    `Event` or the field dict of `streaming.ingest_topics.parse_event_fields` (ingest's; one batch holds one
    kind). Tuples, not lists, per record: json writes both as arrays, a tuple is cheaper to build."""
    if not records:
        return "[]"
    get = _online_items if records[0][1].__class__ is dict else _online_fields
    return json.dumps([(o, *get(e)) for o, e in records], separators=(",", ":"))


def watermark_key(prefix: str, topic: str, partition: int | str) -> str:
    """The last offset processed from one partition (see the module docstring)."""
    return f"{prefix}wm:{topic}:{partition}"


def popular_key(prefix: str) -> str:
    """The feature job's popularity snapshot (streaming.features writes it, serving reads it)."""
    return f"{prefix}feat:popular"


def trending_key(prefix: str) -> str:
    return f"{prefix}feat:trending"


class OnlineStore:
    def __init__(self, client: redis.Redis, prefix: str = "sr:", recent_items_max: int = 50,
                 user_ttl_s: int = DEFAULT_USER_TTL_S):
        if user_ttl_s < 0:
            raise ValueError(f"user_ttl_s={user_ttl_s!r}: must be >= 0 (0: per-user keys never expire)")
        self.r = client
        self.p = prefix
        self.recent_items_max = recent_items_max
        self.user_ttl_s = int(user_ttl_s)
        self.ttl_renew_below_s = self.user_ttl_s - int(self.user_ttl_s * TTL_RENEW_SLACK)
        self._apply_events_script = client.register_script(APPLY_EVENTS_LUA)

    # --- key names ------------------------------------------------------------------------
    def recent_key(self, user_id: str) -> str:
        return f"{self.p}u:{user_id}:recent"

    def item_key(self, item_id: str) -> str:
        return f"{self.p}i:{item_id}"

    def watermark_key(self, topic: str, partition: int) -> str:
        return watermark_key(self.p, topic, partition)

    @property
    def popularity_key(self) -> str:
        return f"{self.p}pop:all"

    @property
    def live_items_key(self) -> str:
        return f"{self.p}items:live"

    @property
    def catalog_log_key(self) -> str:
        return f"{self.p}items:log"

    # --- writes ---------------------------------------------------------------------------
    def apply_events(self, topic: str, partition: int, records: Sequence[tuple[int, Event | dict[str, Any]]],
                     upto: int | None = None) -> int:
        """Apply one partition's events (offset order); return how many were new. `upto`: the last
        offset of the batch they came from, bad records included (the watermark advances to it).
        An event is an `Event` or, from ingest, the field dict of `streaming.ingest_topics.parse_event_fields`.

        Per event: the item enters the user's recent set with its ts (ZADD GT, so a late event
        never makes an item look older) and the item's popularity counter goes up by one. Per
        user of the batch: the recent set's TTL is renewed to `user_ttl_s` (0: no TTL) once it
        has run down by `TTL_RENEW_SLACK`.
        (Per-user counters by type live in the offline features, not here: each extra Redis
        call per event costs about a fifth of the ingest rate.)"""
        if not records and upto is None:
            return 0
        payload = lua_events_payload(records)
        return int(
            self._apply_events_script(
                keys=[self.watermark_key(topic, partition)],
                args=[self.p, self.recent_items_max, payload, self.user_ttl_s, self.ttl_renew_below_s,
                      -1 if upto is None else upto],
            )
        )

    def apply_items(self, topic: str, partition: int, records: Sequence[tuple[int, Item]],
                    upto: int | None = None) -> int:
        """Apply one partition's catalog records (offset order, last write wins); `upto` as in
        `apply_events`."""

        def queue(pipe: redis.client.Pipeline, new: list[tuple[int, Item]]) -> None:
            latest: dict[str, Item] = {}
            for _, item in new:
                latest[item.item_id] = item
            for item_id, item in latest.items():
                pipe.hset(
                    self.item_key(item_id),
                    mapping={
                        "title": item.title,
                        "text": item.text or "",
                        "attributes": json.dumps(item.attributes or {}, separators=(",", ":")),
                        "ts": item.ts,
                        "deleted": int(item.deleted),
                    },
                )
                if item.deleted:
                    pipe.srem(self.live_items_key, item_id)
                else:
                    pipe.sadd(self.live_items_key, item_id)
                # in the same transaction: serving replicas follow this log instead of
                # re-reading the whole live set every second
                pipe.xadd(self.catalog_log_key, {"item_id": item_id, "deleted": int(item.deleted)},
                          maxlen=CATALOG_LOG_MAX, approximate=True)

        return self._apply(topic, partition, records, queue, upto)

    def _apply(self, topic, partition, records, queue, upto: int | None) -> int:
        if not records and upto is None:
            return 0
        wm_key = self.watermark_key(topic, partition)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(wm_key)
                    raw = pipe.get(wm_key)
                    watermark = int(raw) if raw is not None else -1
                    new = [(o, rec) for o, rec in records if o > watermark]
                    target = max(new[-1][0] if new else -1, -1 if upto is None else upto)
                    if target <= watermark:
                        pipe.unwatch()
                        return 0
                    pipe.multi()
                    if new:
                        queue(pipe, new)
                    pipe.set(wm_key, target)
                    pipe.execute()
                    return len(new)
                except redis.WatchError:
                    continue  # another consumer advanced this partition meanwhile: re-filter

    def forget_users(self, pseudonyms: list[str]) -> int:
        """Delete the online state of these users (streaming.forget); returns the keys deleted."""
        if not pseudonyms:
            return 0
        return int(self.r.delete(*(self.recent_key(p) for p in pseudonyms)))

    # --- reads ----------------------------------------------------------------------------
    def watermark(self, topic: str, partition: int) -> int:
        raw = self.r.get(self.watermark_key(topic, partition))
        return int(raw) if raw is not None else -1

    def applied_offsets(self, topic: str) -> int:
        """How many offsets of `topic` have been applied, over all its partitions (sum of watermark + 1)."""
        keys = list(self.r.scan_iter(match=self.watermark_key(topic, "*"), count=1000))  # type: ignore[arg-type]
        return sum(int(v) + 1 for v in self.r.mget(keys) if v is not None) if keys else 0

    def recent_items(self, user_id: str, n: int | None = None) -> list[str]:
        stop = (n or self.recent_items_max) - 1
        return [m.decode() for m in self.r.zrevrange(self.recent_key(user_id), 0, stop)]

    def item(self, item_id: str) -> dict | None:
        return self._item_record(item_id, self.r.hgetall(self.item_key(item_id)))

    def items(self, item_ids: Sequence[str]) -> list[dict | None]:
        """`item` of each id in one pipelined round trip (a replica adding 10^4 new items)."""
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hgetall(self.item_key(item_id))
        return [self._item_record(i, raw) for i, raw in zip(item_ids, pipe.execute())]

    @staticmethod
    def _item_record(item_id: str, raw: dict) -> dict | None:
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return {
            "item_id": item_id,
            "title": d["title"],
            "text": d["text"] or None,
            "attributes": json.loads(d["attributes"]),
            "ts": int(d["ts"]),
            "deleted": d["deleted"] == "1",
        }

    def catalog_changes(self, after: str, count: int = 10_000) -> tuple[str, list[tuple[str, bool]]] | None:
        """Catalog changes logged after stream id `after` ("0-0": from the start), oldest first, as
        (last id read, [(item_id, deleted), ...]); None when entries after `after` were trimmed
        away (the caller must re-read the live set)."""
        got = self.r.xread({self.catalog_log_key: after}, count=count)
        entries = got[0][1] if got else []
        if not entries:
            return after, []
        if after != "0-0":
            # The entry at `after` (read last time) is trimmed only once ~CATALOG_LOG_MAX newer
            # ones exist: some of those unread ones may be gone too.
            first = self.r.xrange(self.catalog_log_key, count=1)
            if first and _stream_id(first[0][0]) > _stream_id(after.encode()):
                return None
        changes = [(f[b"item_id"].decode(), f[b"deleted"] == b"1") for _, f in entries]
        return entries[-1][0].decode(), changes

    def catalog_position(self) -> str:
        """The id of the newest catalog change ("0-0" when there is none): read it *before* a
        full read of the live set, then follow `catalog_changes` from it."""
        last = self.r.xrevrange(self.catalog_log_key, count=1)
        return last[0][0].decode() if last else "0-0"

    def live_items(self) -> set[str]:
        """Ids of every item that exists and is not deleted (`items:live`): what a follower that
        fell behind the change log re-reads, after `catalog_position`."""
        return {m.decode() for m in self.r.smembers(self.live_items_key)}

    def deleted_items(self, item_ids: Iterable[str]) -> set[str]:
        """Those of `item_ids` the store marks deleted (an id it never saw is not deleted: an item
        known only from training stays), in one round trip."""
        ordered = sorted(set(item_ids))
        if not ordered:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for item_id in ordered:
            pipe.hget(self.item_key(item_id), "deleted")
        return {i for i, flag in zip(ordered, pipe.execute()) if flag is not None and flag.decode() == "1"}

    def popularity(self, item_ids: Iterable[str] | None = None) -> dict[str, int]:
        if item_ids is None:
            return {m.decode(): int(s) for m, s in self.r.zrange(self.popularity_key, 0, -1, withscores=True)}
        ids = list(item_ids)
        scores = self.r.zmscore(self.popularity_key, ids) if ids else []
        return {i: int(s or 0) for i, s in zip(ids, scores)}


def _stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.decode().partition("-")
    return int(ms), int(seq or 0)

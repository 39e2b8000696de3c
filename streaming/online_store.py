"""The online store (Redis): what serving reads per request.

Keys (all under `Settings.redis_prefix`, `sr:` by default):

| key | type | holds |
| --- | --- | --- |
| `u:<user>:recent` | sorted set item -> last ts (ms) | the user's recent distinct items, newest first, capped |
| `u:<user>:stats` | hash type -> count | the user's interactions by type |
| `i:<item>` | hash | title, text, attributes (JSON), ts, deleted (0/1) |
| `items:live` | set | ids of items that exist and are not deleted |
| `pop:all` | sorted set item -> count | all-time interaction counters (online popularity) |
| `wm:<topic>:<partition>` | string | last Kafka offset applied from that partition |
| `feat:popular`, `feat:trending`, `feat:meta` | | pushed by the feature job (streaming.features) |

Exactly-once effect: a batch from one partition is applied in one MULTI/EXEC transaction
that also advances `wm:<topic>:<partition>`, under WATCH of that watermark. Records at or
below the watermark are skipped, so a replayed offset range (consumer crash before its
commit, a rebalance, a zombie consumer finishing a batch late) changes nothing.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import redis

from streaming.events import Event, Item


class OnlineStore:
    def __init__(self, client: redis.Redis, prefix: str = "sr:", recent_items_max: int = 50):
        self.r = client
        self.p = prefix
        self.recent_items_max = recent_items_max

    # --- key names ------------------------------------------------------------------------
    def recent_key(self, user_id: str) -> str:
        return f"{self.p}u:{user_id}:recent"

    def stats_key(self, user_id: str) -> str:
        return f"{self.p}u:{user_id}:stats"

    def item_key(self, item_id: str) -> str:
        return f"{self.p}i:{item_id}"

    def watermark_key(self, topic: str, partition: int) -> str:
        return f"{self.p}wm:{topic}:{partition}"

    @property
    def popularity_key(self) -> str:
        return f"{self.p}pop:all"

    @property
    def live_items_key(self) -> str:
        return f"{self.p}items:live"

    # --- writes ---------------------------------------------------------------------------
    def apply_events(self, topic: str, partition: int, records: Sequence[tuple[int, Event]]) -> int:
        """Apply one partition's events (offset order); return how many were new."""

        def queue(pipe: redis.client.Pipeline, new: list[tuple[int, Event]]) -> None:
            recent: dict[str, dict[str, int]] = defaultdict(dict)
            stats: dict[str, Counter] = defaultdict(Counter)
            popularity: Counter = Counter()
            for _, e in new:
                seen = recent[e.user_id]
                seen[e.item_id] = max(e.ts, seen.get(e.item_id, e.ts))
                stats[e.user_id][e.type] += 1
                popularity[e.item_id] += 1
            for user, items in recent.items():
                key = self.recent_key(user)
                pipe.zadd(key, items, gt=True)  # GT: a late event never makes an item look older
                pipe.zremrangebyrank(key, 0, -(self.recent_items_max + 1))
            for user, counts in stats.items():
                for kind, n in counts.items():
                    pipe.hincrby(self.stats_key(user), kind, n)
            for item, n in popularity.items():
                pipe.zincrby(self.popularity_key, n, item)

        return self._apply(topic, partition, records, queue)

    def apply_items(self, topic: str, partition: int, records: Sequence[tuple[int, Item]]) -> int:
        """Apply one partition's catalog records (offset order, last write wins)."""

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

        return self._apply(topic, partition, records, queue)

    def _apply(self, topic, partition, records, queue) -> int:
        if not records:
            return 0
        wm_key = self.watermark_key(topic, partition)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(wm_key)
                    raw = pipe.get(wm_key)
                    watermark = int(raw) if raw is not None else -1
                    new = [(o, rec) for o, rec in records if o > watermark]
                    if not new:
                        pipe.unwatch()
                        return 0
                    pipe.multi()
                    queue(pipe, new)
                    pipe.set(wm_key, new[-1][0])
                    pipe.execute()
                    return len(new)
                except redis.WatchError:
                    continue  # another consumer advanced this partition meanwhile: re-filter

    # --- reads ----------------------------------------------------------------------------
    def watermark(self, topic: str, partition: int) -> int:
        raw = self.r.get(self.watermark_key(topic, partition))
        return int(raw) if raw is not None else -1

    def recent_items(self, user_id: str, n: int | None = None) -> list[str]:
        stop = (n or self.recent_items_max) - 1
        return [m.decode() for m in self.r.zrevrange(self.recent_key(user_id), 0, stop)]

    def user_stats(self, user_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.stats_key(user_id)).items()}

    def item(self, item_id: str) -> dict | None:
        raw = self.r.hgetall(self.item_key(item_id))
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

    def popularity(self, item_ids: Iterable[str] | None = None) -> dict[str, int]:
        if item_ids is None:
            return {m.decode(): int(s) for m, s in self.r.zrange(self.popularity_key, 0, -1, withscores=True)}
        ids = list(item_ids)
        scores = self.r.zmscore(self.popularity_key, ids) if ids else []
        return {i: int(s or 0) for i, s in zip(ids, scores)}

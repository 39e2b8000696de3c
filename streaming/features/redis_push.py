"""Serving's fallback in Redis: the popular and trending items of the live feature version.

After a run -- or a no-op, when ``<prefix>feat:meta`` does not show the live version, e.g.
after a Redis restart -- the top ``popular_push_n`` non-deleted items by count go to the sorted
set ``<prefix>feat:popular`` and by trending to ``<prefix>feat:trending``, with
``<prefix>feat:meta`` = {version, ref_ts, created_at}; all three swap together (temp keys,
RENAMEd in one MULTI), so serving never mixes two versions.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow.compute as pc

from streaming.features.tables import FeatureTables
from streaming.online_store import popular_key, trending_key
from streaming.settings import Settings

REDIS_TMP_TTL_S = 3600  # temp keys of a push that died before its RENAME expire after this long
REDIS_PUSH_CHUNK = 5000  # members per ZADD


def meta_key(prefix: str) -> str:
    """The hash saying which feature version the popularity keys hold."""
    return f"{prefix}feat:meta"


def pushed_version(redis_client: Any, settings: Settings) -> int | None:
    """The feature version last pushed to Redis, or None when none is there."""
    raw = redis_client.hget(meta_key(settings.redis_prefix), "version")
    return int(raw) if raw is not None else None


def push_popularity_to_redis(tables: FeatureTables, redis_client: Any, settings: Settings) -> None:
    """Top `popular_push_n` live items by count -> sorted set `<prefix>feat:popular`, by trending ->
    `<prefix>feat:trending` (score = the value; ties broken by item id), and `<prefix>feat:meta`
    (version, ref_ts, created_at). Deleted items are left out: this is what serving shows when it
    cannot filter. All three keys change together (temp keys, then RENAME inside one MULTI)."""
    prefix = settings.redis_prefix
    pop = tables.popularity
    deleted = tables.items.filter(pc.equal(tables.items["deleted"], True))["item_id"]
    if len(deleted):
        pop = pop.filter(pc.invert(pc.is_in(pop["item_id"], value_set=deleted.combine_chunks())))
    n = settings.popular_push_n
    plan = {}
    for key, col in ((popular_key(prefix), "count"), (trending_key(prefix), "trending")):
        top = pop.sort_by([(col, "descending"), ("item_id", "ascending")]).slice(0, n)
        plan[key] = list(zip(top["item_id"].to_pylist(), (float(v) for v in top[col].to_pylist())))

    tmp_keys = {}
    for key, members in plan.items():
        if not members:
            continue
        tmp = f"{key}:tmp:{uuid.uuid4().hex}"
        tmp_keys[key] = tmp
        pipe = redis_client.pipeline(transaction=False)
        for i in range(0, len(members), REDIS_PUSH_CHUNK):
            pipe.zadd(tmp, dict(members[i:i + REDIS_PUSH_CHUNK]))
        pipe.expire(tmp, REDIS_TMP_TTL_S)
        pipe.execute()
    tx = redis_client.pipeline(transaction=True)
    for key in plan:
        if key in tmp_keys:
            tx.rename(tmp_keys[key], key)
            tx.persist(key)  # RENAME carries the temp key's TTL over
        else:
            tx.delete(key)
    meta = meta_key(prefix)
    tx.delete(meta)
    tx.hset(meta, mapping={"version": tables.version, "ref_ts": "" if tables.ref_ts is None else tables.ref_ts,
                           "created_at": tables.manifest.get("created_at", "")})
    tx.execute()

"""Redis memory per user and per item, measured on the embedded Redis with the online store's own writes.

    python bench/redis_memory.py --users 100000 --items 100000 --json bench/results/redis-memory.json

Users: each gets `--events-per-user` click events through `OnlineStore.apply_events` (the ingest
Lua script: the recent-items sorted set capped at `recent_items_max`, its TTL, popularity
counters), pseudonymized ids as ingest stores them (32 hex characters). Items: catalog records
through `OnlineStore.apply_items` (hash, live set, change-log entry) with a title, a two-sentence
text and two attributes. `used_memory` (INFO memory) is read before and after each phase; the
difference over the count is the per-unit figure docs/scaling.md sizes Redis with.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

BATCH = 5_000  # records per apply call (ingest applies one partition batch per call, about this size)
T0_MS = 1_700_000_000_000


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000, help="users written")
    ap.add_argument("--items", type=int, default=100_000, help="catalog items written")
    ap.add_argument("--events-per-user", type=int, default=50, help="events per user (the recent set keeps "
                    "recent_items_max of them, default 50)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    for name in ("users", "items", "events_per_user"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import numpy as np
    from tqdm import tqdm

    from services.stack import EmbeddedStack
    from streaming.events import Item
    from streaming.online_store import OnlineStore
    from streaming.redis_io import make_redis
    from streaming.settings import load_settings

    rng = np.random.default_rng(0)
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **vars(args)}
    out.pop("json")
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, EmbeddedStack(Path(tmp), kafka=False) as info:
        settings = load_settings(redis_url=info.redis_url, data_dir=Path(tmp))
        client = make_redis(settings)
        store = OnlineStore(client, settings.redis_prefix, settings.recent_items_max, settings.user_ttl_s)
        base = used_memory(client)
        offset, t0 = 0, time.perf_counter()
        users = [f"{u:032x}" for u in rng.integers(0, 2 ** 63, size=args.users)]
        records = []
        with tqdm(total=args.users * args.events_per_user, desc="events", unit="ev") as bar:
            for u in users:
                for j, item in enumerate(rng.integers(0, max(args.items, 1), size=args.events_per_user)):
                    records.append((offset, {"event_id": f"e{offset}", "user_id": u, "item_id": f"m{item}",
                                             "type": "click", "ts": T0_MS + j * 1000}))
                    offset += 1
                if len(records) >= BATCH:
                    store.apply_events(settings.events_topic, 0, records)
                    bar.update(len(records))
                    records = []
            if records:
                store.apply_events(settings.events_topic, 0, records)
                bar.update(len(records))
        after_users = used_memory(client)
        users_s = time.perf_counter() - t0
        offset, records = 0, []
        for i in tqdm(range(args.items), desc="items", unit="item"):
            records.append((offset, Item(item_id=f"m{i}", title=f"Film number {i}",
                                         text=f"Film number {i}. A story of people and places, told in {i % 97} scenes.",
                                         attributes={"genres": ["Drama", "Comedy"], "year": 1990 + i % 30},
                                         ts=T0_MS)))
            offset += 1
            if len(records) >= BATCH:
                store.apply_items(settings.items_topic, 0, records)
                records = []
        if records:
            store.apply_items(settings.items_topic, 0, records)
        after_items = used_memory(client)
        # the popularity counters are per item but written by events: counted with the users above
        out.update({
            "redis_used_memory_base_bytes": base,
            "bytes_per_user": (after_users - base) / args.users,
            "bytes_per_item": (after_items - after_users) / args.items,
            "users_write_s": users_s,
            "recent_items_max": settings.recent_items_max,
        })
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

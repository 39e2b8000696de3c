"""Where ingest's CPU per event goes, stage by stage, in one process (no broker): the figures behind
`bench/ingest.py`'s rate ratio.

    python bench/ingest_stages.py --events 200000 --users 1000000 --json bench/results/ingest-stages.json

Each stage runs over the same N synthetic events (`streaming.datasets.synthetic`, as `bench/ingest.py`
produces them), timed with this thread's CPU clock, in the order ingest runs them
(`streaming.ingest.Ingestor._events`, then the writer thread and the log flush):

1. `parse`: `parse_event_fields` on the encoded record (JSON decode + the fast validator);
2. `pseudonymize`: HMAC of the raw user id with a cold memo, as ingest pays it when users outnumber
   `CACHE_MAX_ENTRIES` (and warm, for the memo's best case);
3. `log_row`: the Parquet log row of the event (`event_fields_log_row`);
4. `redis_payload`: the JSON argument of the events Lua script (`lua_events_payload`), per batch of 500;
5. `redis_script`: the Lua script itself against an embedded Redis (client + server CPU: the server
   is another process, so its share is measured from `INFO commandstats`' usec);
6. `log_table`: rows -> an Arrow table and the Parquet file (`streaming.offline_log`), per 50,000 rows.

A bare kafka-python consumer costs ~4.9 us of CPU per event on this machine (`bench/ingest.py`,
`baseline_cpu_us_per_event`): a rate ratio of 0.7 leaves ingest ~2.1 us per event beyond it, which
the sum below shows is less than its stages take.
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

REDIS_BATCH_EVENTS = 500  # a poll's partition batch
LOG_FLUSH_ROWS = 50_000


def cpu_us_per_event(fn, n: int) -> float:
    t0 = time.thread_time()
    fn()
    return 1e6 * (time.thread_time() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from services.stack import EmbeddedStack
    from streaming.datasets import SyntheticConfig, synthetic_dataset
    from streaming.events import EVENT_LOG_SCHEMA, encode
    from streaming.ingest_topics import event_fields_log_row, parse_event_fields, rows_to_table
    from streaming.offline_log import OfflineLog
    from streaming.online_store import OnlineStore, lua_events_payload
    from streaming.pseudonym import Pseudonymizer
    from streaming.redis_io import make_redis
    from streaming.settings import load_settings

    n = args.events
    data = synthetic_dataset(SyntheticConfig(n_users=args.users, n_items=args.items, n_events=n, seed=7))
    payloads = [encode(e) for e in data.event_dicts()][:n]
    n = len(payloads)
    settings = load_settings()
    types, max_bytes = frozenset(settings.event_types), settings.max_payload_bytes
    out: dict = {"events": n, "users": args.users, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                               "load_avg": list(os.getloadavg())}}
    stages: dict[str, float] = {}

    fields: list[dict] = []
    stages["parse"] = cpu_us_per_event(lambda: fields.extend(parse_event_fields(p, types, max_bytes)
                                                             for p in payloads), n)
    raw_ids = [f["user_id"] for f in fields]
    cold = Pseudonymizer((b"k" * 32,))
    cold_ids: list[str] = []

    def pseudonymize_cold() -> None:
        for u in raw_ids:
            cold._memo.clear()  # every call a miss: the memo holds 200,000 of 10^6 users at best
            cold_ids.append(cold(u))

    stages["pseudonymize_cold"] = cpu_us_per_event(pseudonymize_cold, n)
    warm = Pseudonymizer((b"k" * 32,))
    for u in raw_ids:
        warm(u)
    stages["pseudonymize_warm"] = cpu_us_per_event(lambda: [warm(u) for u in raw_ids], n)
    for f, p in zip(fields, cold_ids):
        f["user_id"] = p
    rows: list[tuple] = []
    now_ms = int(time.time() * 1000)
    stages["log_row"] = cpu_us_per_event(lambda: rows.extend(event_fields_log_row(f, 0, i, now_ms)
                                                             for i, f in enumerate(fields)), n)
    batches = [[(i, f) for i, f in enumerate(fields[s:s + REDIS_BATCH_EVENTS], start=s)]
               for s in range(0, n, REDIS_BATCH_EVENTS)]
    stages["redis_payload"] = cpu_us_per_event(lambda: [lua_events_payload(b) for b in batches], n)

    with tempfile.TemporaryDirectory(prefix="ingest-stages-") as tmp, EmbeddedStack(Path(tmp) / "stack",
                                                                                   kafka=False) as info:
        client = make_redis(load_settings(redis_url=info.redis_url))
        store = OnlineStore(client, settings.redis_prefix, settings.recent_items_max)
        client.config_resetstat()
        stages["redis_script_client"] = cpu_us_per_event(
            lambda: [store.apply_events("events", 0, b, b[-1][0]) for b in batches], n)
        stats = client.info("commandstats")
        server_usec = sum(v["usec"] for k, v in stats.items() if k.startswith("cmdstat_evalsha")
                          or k.startswith("cmdstat_eval") or k.startswith("cmdstat_fcall"))
        stages["redis_script_server"] = server_usec / n
        log = OfflineLog(Path(tmp) / "log")

        def write_log() -> None:
            for s in range(0, n, LOG_FLUSH_ROWS):
                log.write("events", 0, rows_to_table(rows[s:s + LOG_FLUSH_ROWS], EVENT_LOG_SCHEMA))

        stages["log_table"] = cpu_us_per_event(write_log, n)
    out["stages_cpu_us_per_event"] = {k: round(v, 3) for k, v in stages.items()}
    total = sum(v for k, v in stages.items() if k != "pseudonymize_warm")
    out["ingest_stages_cpu_us_per_event"] = round(total, 3)
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

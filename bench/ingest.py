"""Ingestion benchmark on the embedded broker, baseline measured in the same run.

    python bench/ingest.py --events 200000 --json bench/results/ingest.json

(a) baseline: a bare kafka-python group consumer reading N events (no decoding, no writes);
(b) `streamrec ingest` (the `Ingestor` the CLI runs) on the same N events: validation, Redis,
    Parquet log, DLQ flush and offset commits included;
(c) freshness: events produced at a steady rate (default 1,000/s) while a `streamrec ingest`
    process runs; per event, seconds from the producer's send to the moment its offset is
    covered by the Redis watermark of its partition (i.e. visible to serving), p50/p95.

Rates are measured from the first record received, so the embedded broker's group-join
delay (a fraction of max.poll.interval.ms) is not counted against either side.
Writes JSON with `baseline_events_per_s`, `ingest_events_per_s`, `ratio`, `freshness_p50_s`,
`freshness_p95_s` (plus details). Targets at N=200,000: ratio >= 0.5, freshness_p95_s <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.stack import EmbeddedStack  # noqa: E402
from streaming.datasets import SyntheticConfig, synthetic_dataset  # noqa: E402
from streaming.events import encode  # noqa: E402
from streaming.ingest import Ingestor  # noqa: E402
from streaming.kafka_io import ensure_topics, make_consumer, make_producer  # noqa: E402
from streaming.redis_io import make_redis  # noqa: E402
from streaming.online_store import OnlineStore  # noqa: E402
from streaming.producer import Pacer  # noqa: E402
from streaming.settings import Settings, load_settings, settings_env  # noqa: E402

WATERMARK_POLL_S = 0.005
FRESHNESS_WARMUP_S = 2.0
JOIN_TIMEOUT_S = 60.0


def _encoded_events(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    ds = synthetic_dataset(SyntheticConfig(n_users=20_000, n_items=5_000, n_events=n, seed=seed))
    return [(str(e["user_id"]).encode(), encode(e)) for e in ds.event_dicts()]


def _produce(settings: Settings, records, rate: float | None = None, on_sent=None) -> float:
    producer = make_producer(settings)
    pacer = Pacer(rate)
    t0 = time.monotonic()
    for key, value in records:
        pacer.wait()
        sent = time.monotonic()
        fut = producer.send(settings.events_topic, key=key, value=value)
        if on_sent is not None:
            fut.add_callback(lambda md, sent=sent: on_sent(md.partition, md.offset, sent))
    producer.flush()
    producer.close()
    return time.monotonic() - t0


def baseline_consume(settings: Settings, n: int) -> float:
    """Bare kafka-python: poll and count N records with the same consumer settings."""
    consumer = make_consumer(settings, group_id=settings.consumer_group + "-raw")
    consumer.subscribe([settings.events_topic])
    seen, first = 0, None
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while seen < n:
        polled = consumer.poll(timeout_ms=settings.poll_timeout_ms, max_records=settings.max_poll_records)
        for records in polled.values():
            if first is None:
                first = time.monotonic()
            seen += len(records)
        if first is None and time.monotonic() > deadline:
            raise RuntimeError("baseline consumer got no records")
    elapsed = time.monotonic() - first
    consumer.close(autocommit=False)
    return n / elapsed


def ingest_rate(settings: Settings, n: int) -> tuple[float, dict]:
    """The real Ingestor: from its first record to the commit of the last one."""
    ingestor = Ingestor(settings.model_copy(update={"consumer_group": settings.consumer_group + "-ingest"}))
    first: list[float] = []
    original = ingestor.process

    def timed(polled):
        if not first and polled:
            first.append(time.monotonic())
        original(polled)

    ingestor.process = timed
    stats = ingestor.run(max_records=n)  # ends with a forced write + commit of everything
    elapsed = time.monotonic() - first[0]
    return n / elapsed, {"log_files": stats.log_files, "commits": stats.commits, "events": stats.events}


def freshness(settings: Settings, rate: float, seconds: float) -> dict:
    """Produce at `rate`/s while a `streamrec ingest` process runs; time each event until visible."""
    fresh = settings.model_copy(update={"events_topic": settings.events_topic + "-fresh", "consumer_group": settings.consumer_group + "-fresh"})
    ensure_topics(fresh)
    env = {**os.environ, **settings_env(fresh), "PYTHONUNBUFFERED": "1"}
    log_path = Path(fresh.data_dir) / "freshness-ingest.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "ingest", "--no-progress", "--features-every", "0"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    store = OnlineStore(make_redis(fresh), fresh.redis_prefix)
    sent: dict[int, list[tuple[int, float]]] = {p: [] for p in range(fresh.topic_partitions)}
    lock = threading.Lock()

    def on_sent(partition, offset, t):
        with lock:
            sent[partition].append((offset, t))

    try:
        # Wait until the consumer owns its partitions: a probe event per partition becomes visible.
        probe = _encoded_events(fresh.topic_partitions * 50, seed=99)
        _produce(fresh, probe)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while sum(store.watermark(fresh.events_topic, p) + 1 for p in range(fresh.topic_partitions)) < len(probe):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("ingest process did not start consuming:\n" + log_path.read_text()[-2000:])
            time.sleep(0.05)
        base = {p: store.watermark(fresh.events_topic, p) for p in range(fresh.topic_partitions)}
        visible: dict[tuple[int, int], float] = {}
        done = threading.Event()

        def watch():
            cursor = dict(base)
            while not done.is_set():
                now = time.monotonic()
                for p in cursor:
                    wm = store.watermark(fresh.events_topic, p)
                    for off in range(cursor[p] + 1, wm + 1):
                        visible[(p, off)] = now
                    cursor[p] = max(cursor[p], wm)
                time.sleep(WATERMARK_POLL_S)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        records = _encoded_events(int(rate * seconds), seed=5)
        _produce(fresh, records, rate=rate, on_sent=on_sent)
        deadline = time.monotonic() + 30
        total = len(records)
        while len(visible) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        watcher.join()
    finally:
        proc.terminate()
        proc.wait(30)
    lat = []
    warm_until = min(t for s in sent.values() for _, t in s) + FRESHNESS_WARMUP_S
    for p, items in sent.items():
        for off, t in items:
            if t >= warm_until and (p, off) in visible:
                lat.append(visible[(p, off)] - t)
    missing = sum(len(v) for v in sent.values()) - sum(1 for p, items in sent.items() for off, _ in items if (p, off) in visible)
    arr = np.array(lat)
    return {
        "freshness_p50_s": float(np.percentile(arr, 50)),
        "freshness_p95_s": float(np.percentile(arr, 95)),
        "freshness_max_s": float(arr.max()),
        "freshness_events": int(arr.size),
        "freshness_not_visible": int(missing),
        "freshness_rate_per_s": rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="N: events for the rate comparison")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s for the freshness test")
    ap.add_argument("--fresh-seconds", type=float, default=20.0, help="duration of the freshness test")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="streamrec-bench-") as tmp, EmbeddedStack(Path(tmp) / "stack") as stack:
        settings = load_settings(
            kafka_bootstrap_servers=stack.kafka_bootstrap,
            redis_url=stack.redis_url,
            data_dir=Path(tmp) / "data",
            events_topic="bench-events",
            items_topic="bench-items",
            dlq_topic="bench-events.dlq",
            consumer_group="bench",
            features_interval_s=0,
        )
        ensure_topics(settings)
        print(f"generating and producing {args.events:,} events ...", flush=True)
        records = _encoded_events(args.events, seed=1)
        produce_s = _produce(settings, records)
        print(f"  produced in {produce_s:.1f} s", flush=True)

        base = baseline_consume(settings, args.events)
        print(f"(a) baseline kafka-python consume: {base:,.0f} events/s", flush=True)
        rate, details = ingest_rate(settings, args.events)
        print(f"(b) streamrec ingest (Redis + Parquet + commits): {rate:,.0f} events/s  ratio {rate / base:.2f}", flush=True)
        fresh = freshness(settings, args.rate, args.fresh_seconds)
        print(
            f"(c) freshness at {args.rate:,.0f} events/s: p50 {fresh['freshness_p50_s']:.3f} s, "
            f"p95 {fresh['freshness_p95_s']:.3f} s (max {fresh['freshness_max_s']:.3f} s, "
            f"{fresh['freshness_not_visible']} not visible)",
            flush=True,
        )

    result = {
        "events": args.events,
        "baseline_events_per_s": base,
        "ingest_events_per_s": rate,
        "ratio": rate / base,
        **fresh,
        "ingest_details": details,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

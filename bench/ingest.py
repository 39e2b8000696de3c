"""Ingestion benchmark on the embedded broker, baseline measured in the same run.

    python bench/ingest.py --events 200000 --json bench/results/ingest.json
    python bench/ingest.py --events 10000000 --users 1000000 --json bench/results/ingest-10m.json

(a) baseline: a bare kafka-python group consumer reading N events (no decoding, no writes), with
    ingest's consumer settings (`streaming.kafka_io.make_consumer`);
(b) `streamrec ingest` (the `Ingestor` the CLI runs) on the same N events: validation, Redis,
    Parquet log, DLQ flush and offset commits included;
(c) freshness: events produced at a steady rate (default 1,000/s) while a `streamrec ingest`
    process runs; per event, seconds from the producer's send to the moment its offset is
    covered by the Redis watermark of its partition (i.e. visible to serving), p50/p95;
(d) unless `--skip-features`: the feature job at this scale (`bench/features_scale.py`,
    `measure_feature_job`), on a synthetic log of its own with the same N, users and items.

The N events are synthetic (`--users`, `--items`; `streaming.datasets.synthetic`), generated and
produced in chunks (the dataset yields `PRODUCE_CHUNK_EVENTS` at a time and the confluent-kafka
producer sends them as they come), so 10^7 events never sit in memory at once.

(a) and (b) each run in a fresh child process, so the consumer's memory is its own and not the
generator's: `consumer_peak_rss_mb` is the ingest process's peak resident set
(VmHWM of /proc/self/status: imports, clients and buffers included), beside
`consumer_rss_first_record_mb` (its RSS when the first record arrived) -- a consumer whose memory is
bounded has a peak that does not grow with N. Rates are measured from the first record received, so
the embedded broker's group-join delay (a fraction of max.poll.interval.ms) is not counted against
either side; `*_cpu_us_per_event` is each process's CPU time (all its threads) per event over the
same span, which a busy machine distorts less than the rates. `--rounds R` repeats (a)+(b) R times
(fresh consumer groups, Redis keys and log) and reports the round with the median ratio, all of them
under `rounds`: on a shared machine the load drifts between two runs more than ingest's own spread.

Writes JSON with `baseline_events_per_s`, `ingest_events_per_s`, `ratio`, `consumer_peak_rss_mb`,
`freshness_p50_s`, `freshness_p95_s` (plus details), and with the feature job: `features_full_s`,
`features_incremental_s_per_100k` (total events -> seconds) and the rest of `measure_feature_job`'s
keys. Targets: ratio >= 0.7 (issue 18; it was 0.44-0.50 at N=200,000), freshness_p95_s <= 1.0, and a
peak RSS that stays flat from 2*10^5 to 10^7 events.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
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
from streaming.kafka_io import ensure_topics, make_confluent_producer, make_consumer, make_producer  # noqa: E402
from streaming.redis_io import make_redis  # noqa: E402
from streaming.online_store import OnlineStore  # noqa: E402
from streaming.producer import Pacer  # noqa: E402
from streaming.settings import Settings, load_settings, settings_env  # noqa: E402

WATERMARK_POLL_S = 0.005
FRESHNESS_WARMUP_S = 2.0
JOIN_TIMEOUT_S = 60.0
DEFAULT_USERS = 20_000
DEFAULT_ITEMS = 5_000
# Events generated, encoded and handed to the producer at a time: what the bench holds of the stream.
PRODUCE_CHUNK_EVENTS = 50_000
# The bulk producer's librdkafka settings: acks from every in-sync replica like `make_producer`, larger
# batches, and room for a chunk in its queue (a full queue is waited out: `_produce_bulk`).
BULK_PRODUCER_CONFIG = {
    "acks": "all",
    "linger.ms": 50,
    "batch.size": 1024 * 1024,
    "queue.buffering.max.messages": 2 * PRODUCE_CHUNK_EVENTS,
    "queue.buffering.max.kbytes": 512 * 1024,
    "partitioner": "murmur2_random",  # the partition kafka-python (and Java) picks for a key
}
PRODUCER_QUEUE_FULL_WAIT_S = 0.05
PROGRESS_EVERY_EVENTS = 1_000_000
# A child process gets this long beyond what its N events should take at a very low rate.
CHILD_SLACK_S = 600.0
CHILD_MIN_RATE_PER_S = 2_000
# The consumer processes are spawned (a fresh interpreter: nothing inherited from the generator).
MP_CONTEXT = "spawn"


def _dataset(n: int, users: int, items: int, seed: int):
    return synthetic_dataset(SyntheticConfig(n_users=users, n_items=items, n_events=n, seed=seed))


def _encoded_events(n: int, seed: int, users: int = DEFAULT_USERS, items: int = DEFAULT_ITEMS) -> list[tuple[bytes, bytes]]:
    """A small stream as a list (the freshness test's); the N events of (a)/(b) go through `_produce_bulk`."""
    return [(str(e["user_id"]).encode(), encode(e)) for e in _dataset(n, users, items, seed).event_dicts()]


def _produce(settings: Settings, records, rate: float | None = None, on_sent=None) -> float:
    """kafka-python, paced, with a callback per acknowledged send (the freshness test)."""
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


def _produce_bulk(settings: Settings, n: int, users: int, items: int, seed: int) -> float:
    """Generate and produce N synthetic events chunk by chunk with confluent-kafka (the fastest
    producer the project has); returns the seconds it took, generation included."""
    producer = make_confluent_producer(settings, **BULK_PRODUCER_CONFIG)
    failures: list[str] = []

    def delivered(err, _msg) -> None:
        if err is not None and len(failures) < 10:
            failures.append(str(err))

    topic, produce, poll = settings.events_topic, producer.produce, producer.poll
    t0 = time.monotonic()
    sent = 0
    for event in _dataset(n, users, items, seed).event_dicts(PRODUCE_CHUNK_EVENTS):
        key, value = str(event["user_id"]).encode(), encode(event)
        while True:
            try:
                produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let librdkafka send some
                poll(PRODUCER_QUEUE_FULL_WAIT_S)
        sent += 1
        if sent % PRODUCE_CHUNK_EVENTS == 0:
            poll(0)  # delivery callbacks
            if sent % PROGRESS_EVERY_EVENTS == 0:
                print(f"  produced {sent:,} ({time.monotonic() - t0:.0f} s)", flush=True)
    left = producer.flush(JOIN_TIMEOUT_S * 5)
    if left or failures:
        raise RuntimeError(f"producing {n} events failed: {left} not delivered; errors: {failures}")
    return time.monotonic() - t0


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 (a figure, not a reason to fail)
        return float("nan")


def _peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM of /proc/self/status (Linux). Not ru_maxrss there: Linux
    carries it across exec, so a spawned child would report at least the parent's RSS at the fork."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def baseline_consume(settings: Settings, n: int) -> dict:
    """Bare kafka-python: poll and count N records with the same consumer settings (a child process)."""
    consumer = make_consumer(settings, group_id=settings.consumer_group + "-raw")
    consumer.subscribe([settings.events_topic])
    seen, first, cpu0, rss0 = 0, None, 0.0, 0.0
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while seen < n:
        polled = consumer.poll(timeout_ms=settings.poll_timeout_ms, max_records=settings.max_poll_records)
        for records in polled.values():
            if first is None and records:
                first, cpu0, rss0 = time.monotonic(), time.process_time(), _rss_mb()
            seen += len(records)
        if first is None and time.monotonic() > deadline:
            raise RuntimeError("baseline consumer got no records")
    elapsed, cpu = time.monotonic() - first, time.process_time() - cpu0
    consumer.close(autocommit=False)
    return {"events_per_s": n / elapsed, "cpu_us_per_event": cpu / n * 1e6, "peak_rss_mb": _peak_rss_mb(),
            "rss_first_record_mb": rss0}


def ingest_rate(settings: Settings, n: int) -> dict:
    """The real Ingestor (a child process): from its first record to the commit of the last one."""
    ingestor = Ingestor(settings.model_copy(update={"consumer_group": settings.consumer_group + "-ingest"}))
    first: list[float] = []
    original = ingestor.process

    def timed(polled):
        if not first and polled:
            first.extend((time.monotonic(), time.process_time(), _rss_mb()))
        original(polled)

    ingestor.process = timed
    stats = ingestor.run(max_records=n)  # ends with a forced write + commit of everything
    elapsed, cpu = time.monotonic() - first[0], time.process_time() - first[1]
    return {"events_per_s": n / elapsed, "cpu_us_per_event": cpu / n * 1e6, "peak_rss_mb": _peak_rss_mb(),
            "rss_first_record_mb": first[2],
            "details": {"log_files": stats.log_files, "commits": stats.commits, "events": stats.events,
                        "bad": stats.bad, "skipped_replays": stats.skipped_replays,
                        # where the time went (sums of ingest's own latency histograms, seconds)
                        "redis_apply_s": _histogram_sum(ingestor.metrics.redis_apply),
                        "log_write_s": _histogram_sum(ingestor.metrics.log_write),
                        "commit_s": _histogram_sum(ingestor.metrics.commit_seconds)}}


def _histogram_sum(histogram) -> float:
    """The `_sum` sample of a prometheus histogram (or of one labelled child)."""
    return sum(s.value for metric in histogram.collect() for s in metric.samples if s.name.endswith("_sum"))


def _child(target: str, settings: Settings, n: int, out) -> None:
    try:
        out.put(("ok", {"baseline": baseline_consume, "ingest": ingest_rate}[target](settings, n)))
    except BaseException as exc:  # noqa: BLE001 (reported by the parent)
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def in_child(target: str, settings: Settings, n: int) -> dict:
    """Run `baseline_consume` or `ingest_rate` in a fresh (spawned) process; its figures back."""
    ctx = multiprocessing.get_context(MP_CONTEXT)
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, settings, n, out), name=f"bench-{target}")
    proc.start()
    try:
        status, value = out.get(timeout=CHILD_SLACK_S + n / CHILD_MIN_RATE_PER_S)
    finally:
        proc.join(JOIN_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"the {target} process failed: {value}")
    return value


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
    ap.add_argument("--users", type=int, default=DEFAULT_USERS, help="synthetic users (ids u0..)")
    ap.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="synthetic items (ids i0..)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s for the freshness test")
    ap.add_argument("--fresh-seconds", type=float, default=20.0, help="duration of the freshness test")
    ap.add_argument("--rounds", type=int, default=1, help="repeat (a)+(b) this many times and report the "
                    "round with the median ratio (a shared machine's load drifts between runs)")
    ap.add_argument("--skip-freshness", action="store_true", help="leave out (c)")
    ap.add_argument("--skip-features", action="store_true", help="leave out (d), the feature job at this scale")
    args = ap.parse_args()
    for name in ("events", "users", "items", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: must be >= 1")

    load_before = os.getloadavg()
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
            ingest_metrics_port=0,
        )
        ensure_topics(settings)
        print(f"generating and producing {args.events:,} events ({args.users:,} users, {args.items:,} items) ...",
              flush=True)
        produce_s = _produce_bulk(settings, args.events, args.users, args.items, seed=1)
        print(f"  produced in {produce_s:.1f} s", flush=True)

        rounds = []
        for r in range(args.rounds):  # (a) then (b), again on fresh groups / Redis keys / log: the machine's drift evens out
            own = settings if r == 0 else settings.model_copy(update={
                "consumer_group": f"{settings.consumer_group}-r{r}", "redis_prefix": f"{settings.redis_prefix}r{r}:",
                "data_dir": Path(tmp) / f"data-r{r}"})
            base = in_child("baseline", own, args.events)
            print(f"(a) baseline kafka-python consume: {base['events_per_s']:,.0f} events/s "
                  f"({base['cpu_us_per_event']:.2f} us CPU/event)", flush=True)
            ing = in_child("ingest", own, args.events)
            ratio = ing["events_per_s"] / base["events_per_s"]
            print(f"(b) streamrec ingest (Redis + Parquet + commits): {ing['events_per_s']:,.0f} events/s  ratio "
                  f"{ratio:.2f} ({ing['cpu_us_per_event']:.2f} us CPU/event); consumer peak RSS "
                  f"{ing['peak_rss_mb']:,.0f} MiB ({ing['rss_first_record_mb']:,.0f} MiB at its first record)",
                  flush=True)
            rounds.append({"ratio": ratio, "baseline": base, "ingest": ing})
        # The round with the median ratio is the one reported (the others are in `rounds`).
        median = sorted(rounds, key=lambda x: x["ratio"])[(len(rounds) - 1) // 2]
        base, ing, ratio = median["baseline"], median["ingest"], median["ratio"]
        if len(rounds) > 1:
            print(f"median of {len(rounds)} rounds: ratio {ratio:.2f} (all: "
                  f"{', '.join(format(x['ratio'], '.2f') for x in rounds)})", flush=True)
        fresh = {}
        if not args.skip_freshness:
            fresh = freshness(settings, args.rate, args.fresh_seconds)
            print(
                f"(c) freshness at {args.rate:,.0f} events/s: p50 {fresh['freshness_p50_s']:.3f} s, "
                f"p95 {fresh['freshness_p95_s']:.3f} s (max {fresh['freshness_max_s']:.3f} s, "
                f"{fresh['freshness_not_visible']} not visible)",
                flush=True,
            )
        features = {}
        if not args.skip_features:
            from bench.features_scale import measure_feature_job  # another bench's module: only when asked for

            features = measure_feature_job(settings, events=args.events, users=args.users, items=args.items)
            print(f"(d) feature job: full {features.get('features_full_s', float('nan')):.1f} s, incremental "
                  f"s per 100k events {features.get('features_incremental_s_per_100k')}", flush=True)

    result = {
        "events": args.events,
        "users": args.users,
        "items": args.items,
        "produce_s": produce_s,
        "baseline_events_per_s": base["events_per_s"],
        "ingest_events_per_s": ing["events_per_s"],
        "ratio": ratio,
        "baseline_cpu_us_per_event": base["cpu_us_per_event"],
        "ingest_cpu_us_per_event": ing["cpu_us_per_event"],
        "cpu_ratio": base["cpu_us_per_event"] / ing["cpu_us_per_event"],
        "consumer_peak_rss_mb": max(x["ingest"]["peak_rss_mb"] for x in rounds),
        "consumer_rss_first_record_mb": ing["rss_first_record_mb"],
        "baseline_peak_rss_mb": base["peak_rss_mb"],
        **fresh,
        **features,
        "ingest_details": ing["details"],
        "rounds": [{"ratio": x["ratio"], "baseline_events_per_s": x["baseline"]["events_per_s"],
                    "ingest_events_per_s": x["ingest"]["events_per_s"],
                    "consumer_peak_rss_mb": x["ingest"]["peak_rss_mb"]} for x in rounds],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m_before": load_before[0], "load_avg_1m_after": os.getloadavg()[0]},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

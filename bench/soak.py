"""Soak (issue 15): the whole loop -- `streamrec up` -- at half its measured maximum request rate, with
events and continuous training flowing, for a long steady state; does anything grow, fail or slow down?

    python bench/soak.py --json bench/results/soak.json      # 10 minutes of steady state (the issue's run)
    python bench/soak.py --duration-s 60                     # a short run (tests/test_soak.py: 15 s)

1. start: `streamrec up --preset quick` in a temporary data dir (the embedded broker and Redis, a local
   Ray head, ingest with its periodic feature job, the continuous trainer, the Serve API), a generated
   catalog and `--warmup-events` events published; wait until the API serves the first adapter.
2. max rate: bench/serve.py's closed-loop ramp (`max_rps`) on GET /v1/recommendations, `--probe-s` per step.
3. steady state, `--duration-s`: requests at half that rate, open loop (request i is sent at i / rate s
   whatever happened to the ones before it; latency counts from that moment), dealt round-robin to
   `--clients` client workers, over a mix of routes (ROUTE_MIX: known and unknown users, an anonymous
   session, a text query, similar items); events at `--event-rate`/s through the project's producer and
   pacer; every process of the stack sampled for RSS every `--sample-s` s (psutil: `up`'s process tree --
   ingest with its feature schedule, the trainer, the Ray head's processes, Serve's controller, proxy and
   replicas, Ray workers -- and the embedded Redis and broker from the stack's state file).
4. drain and stop: wait until ingest applied every event sent (lost = sent - applied; DLQ from ingest's
   /metrics), SIGINT `up`, and kill anything of its tree still alive.

Prints a table (RSS per process at the start and the end of the steady state and its growth, p99 per
`--window-s` window, requests by route, errors, events) and one `FINDING:` line per process whose RSS
grew more than 10% (bench/soak_report.py), per restart of a part, per 5xx class, lost or dead-lettered
event. `--json PATH` writes every figure. Exit 1 when the stack did not come up or died during the run
(findings alone do not fail it: they are to fix or explain). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.serve import max_rps  # noqa: E402
from bench.soak_report import (  # noqa: E402
    ProcessSeries,
    RequestRecord,
    arrival_offsets,
    error_counts,
    findings,
    latency_summary,
    latency_windows,
    render,
    role_of,
    rss_rows,
    split_among,
)

SCENE = "default"
# the generated stream: users u0.., items i0..; events beyond the warm-up feed the steady state
N_USERS, N_ITEMS, N_TOPICS, SEED = 150, 100, 4, 11
WARMUP_EVENTS = 3000  # default --warmup-events: published before the first adapter, which trains on all of them
EVENTS_MARGIN = 1.2  # generate this much more than rate x duration, so the feeder never runs dry
# (route, share of requests): mostly known users, some unknown ones (trending fallback), the other routes
ROUTE_MIX = (("rec_known", 0.50), ("rec_unknown", 0.20), ("session", 0.10), ("query", 0.05), ("similar", 0.15))
QUERY_TEXT = "something light and funny"
K = 10
STACK_TIMEOUT_S = 120.0  # `up` writes the embedded stack's state file
FIRST_ADAPTER_TIMEOUT_S = 900.0  # the first quick adapter: ~1-3 min on two idle cores, far more when busy
REQUEST_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0  # ingest applies what was sent before we count losses
STOP_TIMEOUT_S = 180.0  # `up` stops its parts after SIGINT
WAIT_POLL_S = 0.5
TICK_S = 0.5  # the main loop: progress bar and RSS sampling
CMDLINE_CHARS = 160  # of each process's command line kept in the JSON


def progress(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_until(what: str, check, timeout_s: float, alive) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive()
        got = check()
        if got:
            return got
        time.sleep(WAIT_POLL_S)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- the stack -------------------------------------------------------------------------------
class UpProcess:
    """`streamrec up` as a child process in its own session, as a user runs it."""

    def __init__(self, data_dir: Path, port: int, args: argparse.Namespace) -> None:
        from services.processes import free_port

        self.data_dir, self.port = data_dir, port
        self.ingest_metrics_port = free_port()
        self.out_path = data_dir.parent / "up.out"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("STREAMREC_", "RAY_ADDRESS", "KAFKA_BOOTSTRAP", "REDIS_URL"))}
        env.update({
            "STREAMREC_DATA_DIR": str(data_dir),
            "STREAMREC_FEATURES_INTERVAL_S": str(args.features_every_s),
            # the embedded broker's first group assignment waits max.poll.interval.ms (see the README)
            "STREAMREC_MAX_POLL_INTERVAL_MS": "3000", "STREAMREC_SESSION_TIMEOUT_MS": "3000",
            "STREAMREC_LOG_FLUSH_INTERVAL_S": "1",
            "STREAMREC_INGEST_METRICS_PORT": str(self.ingest_metrics_port),
            # every candidate passes the gate, so the API also swaps adapters under load during the soak
            "STREAMREC_GATE_TOLERANCE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        argv = [sys.executable, "-m", "services.cli", "up", "--preset", "quick", "--train-every", args.train_every,
                "--min-events", str(args.warmup_events), "--port", str(port), "--replicas", str(args.replicas)]
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.seen: dict[int, object] = {}  # every process of its tree ever sampled (psutil.Process)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"`streamrec up` exited with {self.proc.returncode}:\n{self.output()[-4000:]}")

    def processes(self, stack) -> list[tuple[object, str]]:
        """Every process of the stack now, with its role: `up`'s tree, the embedded Redis and broker."""
        import psutil

        found: dict[int, tuple[object, str]] = {}
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    found[p.pid] = (p, role_of(p.cmdline(), p.name()))
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        for pid, role in ((stack.redis_pid, "redis"), (stack.kafka_pid, "broker (tansu)")):
            if pid:
                try:
                    found[pid] = (psutil.Process(pid), role)
                except psutil.Error:
                    pass
        for pid, (p, _) in found.items():
            self.seen.setdefault(pid, p)
        return list(found.values())

    def stop(self) -> int | str:
        """SIGINT, as Ctrl-C; then make sure nothing of the run is left on the machine."""
        import psutil

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code: int | str = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = "timeout"
        self.out.close()
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    progress(f"left running after `up` stopped, killed: {p.pid} {' '.join(p.cmdline())[:100]}")
                    p.kill()
            except psutil.Error:
                pass
        return code


def sample_rss(up: UpProcess, stack, t: float, series: dict[int, ProcessSeries]) -> None:
    import psutil

    for p, role in up.processes(stack):
        try:
            rss = p.memory_info().rss
            if p.pid not in series:
                series[p.pid] = ProcessSeries(p.pid, role, cmdline=" ".join(p.cmdline())[:CMDLINE_CHARS])
        except psutil.Error:
            continue
        series[p.pid].add(t, rss, role)


# --- traffic -----------------------------------------------------------------------------------
class Requests:
    """Request i of the steady state: its route drawn from ROUTE_MIX (seeded), its users and items from
    the data the stack was fed (known users have events in Redis; unknown ones never had any)."""

    def __init__(self, known_users: list[str], items: list[str], seed: int = SEED) -> None:
        self.known, self.items = known_users, items
        routes, shares = zip(*ROUTE_MIX)
        self.routes, self.cum = routes, np.cumsum(shares) / sum(shares)
        self.draws = np.random.default_rng(seed)

    def plan(self, n: int) -> list[str]:
        return [self.routes[int(np.searchsorted(self.cum, u, side="right"))] for u in self.draws.random(n)]

    def request(self, i: int, route: str) -> tuple[str, str, dict | None, dict | None]:
        """(method, path, query params, JSON body)."""
        user, item = self.known[i % len(self.known)], self.items[i % len(self.items)]
        if route == "rec_known":
            return "GET", "/v1/recommendations", {"user_id": user, "k": K}, None
        if route == "rec_unknown":
            return "GET", "/v1/recommendations", {"user_id": f"soak-unknown-{i}", "k": K}, None
        if route == "session":
            recent = [self.items[(i + j) % len(self.items)] for j in range(3)]
            return "POST", "/v1/recommendations", None, {"recent_items": recent, "k": K}
        if route == "query":
            return "POST", "/v1/recommendations", None, {"user_id": user, "query": QUERY_TEXT, "k": K}
        return "GET", f"/v1/items/{item}/similar", {"k": K}, None


async def client(base: str, due: np.ndarray, index: np.ndarray, routes: list[str], reqs: Requests, start: float,
                 out: list[RequestRecord], stop: threading.Event) -> None:
    """One client worker: sends its share of the schedule at its times (open loop), records every answer."""
    import aiohttp

    async def one(i: int, due_s: float) -> None:
        method, path, params, body = reqs.request(i, routes[i])
        lag = time.monotonic() - start - due_s
        try:
            async with session.request(method, base + path, params=params, json=body) as resp:
                await resp.read()
                outcome: int | str = resp.status
        except asyncio.TimeoutError:
            outcome = "timeout"
        except aiohttp.ClientError as exc:
            outcome = type(exc).__name__
        out.append(RequestRecord(float(due_s), time.monotonic() - start - due_s, outcome, routes[i], lag))

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        for i, due_s in zip(index, due):
            if stop.is_set():
                break
            delay = start + due_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(int(i), float(due_s))))
        await asyncio.gather(*tasks)


class Feeder(threading.Thread):
    """Events at a steady rate through the project's producer and pacer; counts what the broker acked."""

    def __init__(self, settings, events, rate: float) -> None:
        super().__init__(name="soak-events", daemon=True)
        self.settings, self.events, self.rate = settings, events, rate
        self.stop = threading.Event()
        self.sent = self.acked = self.failed = 0
        self.lock = threading.Lock()

    def _ack(self, _md) -> None:
        with self.lock:
            self.acked += 1

    def _fail(self, _exc) -> None:
        with self.lock:
            self.failed += 1

    def run(self) -> None:
        from streaming.producer import EventProducer, Pacer

        pacer = Pacer(self.rate)
        with EventProducer(self.settings) as producer:
            for ev in self.events:
                if self.stop.is_set():
                    break
                pacer.wait()
                producer.send_event(ev).add_callback(self._ack).add_errback(self._fail)
                self.sent += 1
            producer.flush(60)


def ingest_metrics(port: int) -> dict:
    """DLQ records, feature-job runs by outcome and records consumed, from ingest's /metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    out = {"dlq": 0, "feature_runs": {}, "records": 0}
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "streamrec_ingest_dlq_records_total":
                out["dlq"] += int(s.value)
            elif s.name == "streamrec_features_runs_total":
                out["feature_runs"][s.labels["outcome"]] = int(s.value)
            elif s.name == "streamrec_ingest_records_total":
                out["records"] += int(s.value)
    return out


# --- the run -----------------------------------------------------------------------------------
def run(args: argparse.Namespace, workdir: Path) -> dict:
    import requests
    from tqdm import tqdm

    from services.processes import free_port
    from services.stack import stack_status
    from streaming.datasets import SyntheticConfig, synthetic_dataset
    from streaming.online_store import OnlineStore
    from streaming.producer import EventProducer
    from streaming.redis_io import make_redis
    from streaming.settings import load_settings
    from training.registry import Registry

    n_events = args.warmup_events + int(EVENTS_MARGIN * args.event_rate * args.duration_s) + 1
    ds = synthetic_dataset(SyntheticConfig(n_users=N_USERS, n_items=N_ITEMS, n_events=n_events, n_topics=N_TOPICS,
                                           seed=SEED, p_follow=0.6))
    events = list(ds.event_dicts())
    warmup, steady_events = events[:args.warmup_events], events[args.warmup_events:]
    data_dir = workdir / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    result: dict = {"duration_s": args.duration_s, "clients": args.clients, "sample_s": args.sample_s,
                    "window_s": args.window_s, "replicas": args.replicas, "train_every": args.train_every,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()}}
    progress(f"starting `streamrec up` (data in {data_dir}, API on port {port})")
    up = UpProcess(data_dir, port, args)
    try:
        stack = wait_until("the embedded stack of `up`", lambda: stack_status(data_dir), STACK_TIMEOUT_S, up.alive)
        settings = load_settings(kafka_bootstrap_servers=stack.kafka_bootstrap, redis_url=stack.redis_url,
                                 data_dir=data_dir)
        t_up = time.monotonic()
        with EventProducer(settings) as producer:
            for item in ds.item_dicts():
                producer.send_item(item)
            for ev in warmup:
                producer.send_event(ev)
            producer.flush(60)
        progress(f"published {N_ITEMS} items and {len(warmup)} events; waiting for the first adapter to be served")

        def serving() -> bool:
            try:
                return bool(requests.get(f"{base}/readyz", timeout=2).json().get("ready"))
            except (requests.RequestException, ValueError):
                return False

        wait_until("the API to serve the first adapter", serving, FIRST_ADAPTER_TIMEOUT_S, up.alive)
        result["startup_s"] = round(time.monotonic() - t_up, 1)
        progress(f"the API answers ({result['startup_s']} s after the stack); measuring its maximum rate")

        known = sorted({ev["user_id"] for ev in warmup})
        items = sorted({ev["item_id"] for ev in warmup})
        best = max_rps(f"{base}/v1/recommendations", args.probe_s,
                       lambda i: {"user_id": known[i % len(known)], "k": K}, "max rate")
        target = best["rps"] / 2
        result.update(max_rps=round(best["rps"], 2), max_rate_probe=best, target_rps=round(target, 2))
        registry = Registry(settings.registry_uri)
        versions_before = {v.version for v in registry.versions(SCENE)}

        # --- steady state ----------------------------------------------------------------------
        due = arrival_offsets(target, args.duration_s)
        reqs = Requests(known, items)
        routes = reqs.plan(len(due))
        shares = split_among(due, args.clients)
        index = split_among(np.arange(len(due)), args.clients)
        records: list[RequestRecord] = []
        stop = threading.Event()
        series: dict[int, ProcessSeries] = {}
        feeder = Feeder(settings, steady_events, args.event_rate)
        progress(f"steady state: {args.duration_s:g} s at {target:.1f} req/s ({args.clients} clients), "
                 f"{args.event_rate:g} events/s")
        start = time.monotonic()
        sample_rss(up, stack, 0.0, series)
        threads = [threading.Thread(target=asyncio.run, name=f"soak-client-{w}", daemon=True,
                                    args=(client(base, shares[w], index[w], routes, reqs, start, records, stop),))
                   for w in range(args.clients)]
        for th in threads:
            th.start()
        feeder.start()
        next_sample = args.sample_s
        with tqdm(total=int(args.duration_s), unit="s", desc="soak", file=sys.stderr, leave=False) as bar:
            try:
                while (now := time.monotonic() - start) < args.duration_s:
                    up.alive()
                    if now >= next_sample:
                        sample_rss(up, stack, now, series)
                        next_sample += args.sample_s
                    bar.update(int(now) - bar.n)
                    bad = sum(1 for r in records[-1000:] if not (isinstance(r.outcome, int) and r.outcome < 400))
                    bar.set_postfix_str(f"{len(records)} requests, {bad} errors in the last 1000, "
                                        f"{feeder.sent} events", refresh=False)
                    time.sleep(min(TICK_S, max(0.0, args.duration_s - now)))
                sample_rss(up, stack, args.duration_s, series)
            except BaseException:  # the clients stop sending too; on a normal end they finish their schedule
                stop.set()
                raise
            finally:
                feeder.stop.set()
        for th in threads:
            th.join(REQUEST_TIMEOUT_S + 5)
        feeder.join(90)
        progress(f"steady state done: {len(records)} requests, {feeder.sent} events sent; draining ingest")

        # --- what it cost --------------------------------------------------------------------------
        expected = len(warmup) + feeder.acked
        client_redis = make_redis(settings)
        store = OnlineStore(client_redis, settings.redis_prefix)
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while (applied := store.applied_offsets(settings.events_topic)) < expected and time.monotonic() < deadline:
                up.alive()
                time.sleep(WAIT_POLL_S)
        finally:
            client_redis.close()
        metrics = ingest_metrics(up.ingest_metrics_port)
        published = sorted({v.version for v in registry.versions(SCENE)} - versions_before)
        result.update(
            latency=latency_summary(records, args.duration_s),
            windows=latency_windows(records, args.window_s, args.duration_s),
            errors=error_counts(records),
            client_lag_p99_ms=round(1e3 * float(np.percentile([r.lag_s for r in records], 99)), 2) if records else None,
            rss=rss_rows(series.values(), args.duration_s, args.sample_s),
            events={"rate": args.event_rate, "sent": feeder.sent, "acked": feeder.acked, "send_failed": feeder.failed,
                    "warmup": len(warmup), "applied": applied - len(warmup), "lost": max(0, expected - applied),
                    "dlq": metrics["dlq"], "feature_runs": metrics["feature_runs"]},
            adapters_published=published,
        )
        result["findings"] = findings(result)
    except BaseException:
        progress("the run failed; the end of `up`'s output:\n" + up.output()[-3000:])
        raise
    finally:
        progress("stopping `up`")
        result["up_exit"] = up.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0, help="seconds of steady state (default 600: the "
                        "issue's 10 minutes; 60 for a quick look)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--clients", type=int, default=4, help="client workers sharing the request schedule (default %(default)s)")
    parser.add_argument("--event-rate", type=float, default=20.0, help="events/s produced during the steady state (default %(default)s)")
    parser.add_argument("--train-every", default="1000events",
                        help="the continuous trainer's schedule (`up --train-every`: 1000events, 2m, ...; default %(default)s)")
    parser.add_argument("--replicas", type=int, default=1, help="API replicas (`up --replicas`; default %(default)s)")
    parser.add_argument("--features-every-s", type=float, default=10.0,
                        help="the feature job's period in ingest (STREAMREC_FEATURES_INTERVAL_S; default %(default)s)")
    parser.add_argument("--warmup-events", type=int, default=WARMUP_EVENTS,
                        help="events published before the steady state; the first adapter trains on them (default "
                        "%(default)s; fewer start faster)")
    parser.add_argument("--probe-s", type=float, default=4.0, help="seconds per concurrency step of the max-rate probe (default %(default)s)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples (default %(default)s)")
    parser.add_argument("--window-s", type=float, default=60.0, help="width of the p99-over-time windows, seconds (default %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the data dir and `up`'s logs here (default: a temp dir, "
                        "removed at the end)")
    args = parser.parse_args(argv)
    for name in ("duration_s", "event_rate", "probe_s", "sample_s", "window_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.clients < 1 or args.replicas < 1 or args.warmup_events < 100:
        parser.error(f"--clients ({args.clients}) and --replicas ({args.replicas}) must be at least 1, "
                     f"--warmup-events ({args.warmup_events}) at least 100")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamrec-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, workdir)
    except Exception as exc:
        print(f"soak failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

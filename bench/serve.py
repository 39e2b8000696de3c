"""Serving benchmark: the recommendation API against a no-op Ray Serve deployment, one run.

    python bench/serve.py --json bench/results/serve.json [--duration-s 10] [--swap-items 100000] [--no-ranker] [--pairs 2]
                          [--impressions-compare]
    python bench/serve.py --items 1000000 --new-items 10000 --json bench/results/serve-1m.json

On the embedded Redis and a local registry, with the real model (MiniLM + LoRA, untrained:
serving cost does not depend on training) and, unless `--no-ranker`, the second stage every
request pays for (training/two_stage.py: co-visitation prior, a LightGBM ranker of
tests/fixtures/synthetic_adapter.py's size, trending snapshot; `--no-ranker`: the first stage alone):

1. max throughput and p50/p99 of `GET /v1/recommendations` and of a no-op deployment behind the
   same proxy, each with a closed-loop load generator at rising concurrency (the best rate wins);
2. p99 of the recommendations at half that throughput (open loop, Poisson arrivals);
3. hot swap: under steady load, a version with a `--swap-items` synthetic catalog (random
   embeddings, written as `streamrec train` writes them) is published; seconds from the publish
   to the first response from the new version, and the requests that failed meanwhile.

4. with `--impressions-compare`: the same API with impressions on (STREAMREC_IMPRESSIONS_ENABLED: one
   record per answer to the embedded broker, services/impressions.py), deployed beside the one with
   impressions off (the default run's) under `/imp`: max throughput, p99 at max and p99 at the same
   half load (half the off run's max rate), side by side with their ratios, and the replica's
   written / dropped impression counts.

5. with `--items N`: the served catalog is N synthetic items (unit vectors around topic centres,
   64-d: `training.ann_index.synthetic_vectors`), published as `streamrec train` publishes (the
   index built and stored at publish when N > EXACT_MAX_ITEMS); steps 1-3 run on it and the swap
   is to another N-item version. Keys `items`, `index_type`, `index_build_s`, `index_nprobe`,
   `index_recall100` (measured at publish on sampled queries), `bytes_per_item` (index + raw
   vector), `publish_s`, `swap_s` (publish -> first answer from the new version) and
   `swap_failed_requests`. Targets: recall >= 0.95, p99 at half load <= 50 ms, swap <= 30 s with
   0 failed, bytes_per_item <= 1.5 x the raw vector. Every run also reports the replica's RSS
   (`replica_rss_mb_serving`, `replica_rss_mb_after_swap`: its process_resident_memory_bytes;
   `replica_rss_mb_after_unload` once the replica dropped the replaced version, `adapters_loaded_after_swap`).
6. with `--new-items M`: M new catalog items written to the online store at once (as ingest
   writes them) under load; `new_items_servable_s`: seconds until the replica's index holds all of
   them (its `streamrec_index_items`). Target at M = 10,000: <= 5 s.

Keys: noop_max_rps, rec_max_rps, rps_ratio, rec_p50_ms, rec_p99_ms_at_half_load, swap_s_100k,
swap_failed_requests (`rps_ratio`: the median over the first (no-op, recommendations) pair and `--pairs` more
measured back to back, each in `pairs`; `rps_ratio_first_pair`, `cpu_ratio_pairs_median`; `noop_p99_ms_at_half_load`: the plain no-op's p99 at half its
rate, open loop -- the framework's own tail on this machine, beside `rec_p99_ms_at_half_load`); for context noop_fastapi_max_rps and rps_ratio_vs_fastapi_noop (the same no-op
as a FastAPI ingress: what the framework under the API costs by itself) and noop_asgi_max_rps /
rps_ratio_vs_asgi_noop (the same FastAPI no-op run in a plain deployment's process: what the API's
non-hot routes run on). `noop_cpu_ms_per_request`, `rec_cpu_ms_per_request` and `cpu_ratio` (noop / rec):
CPU of this run's own processes (load generator, Ray, proxy, replicas, Redis: `own_cpu_s`) per request
at concurrency >= 8 -- the rate ratio a machine with nothing else running would show, and steady when
other jobs share the cores (the rates are not). `rec_model_cpu_ms_per_request`: the recommendation's own
work (`LoadedAdapter.recommend` in batches of 8, in this process, before Ray starts), and
`*_idle_cpu_cores`: the processes' CPU with no load (measured `IDLE_CPU_S` before each load), and
`*_cpu_ms_per_request_net` / `cpu_ratio_net`: CPU per request less that idle CPU spread over the requests (a
per-second cost -- the API's followers, Serve's controller -- weighs more per request at a lower rate);
`cpu_ratio_without_model` = noop net / (rec net - model): what the serving path around the model costs against the
no-op (the framework's share; the model's CPU is the recommendation itself). Targets: rps_ratio >= 0.6, rec_p99_ms_at_half_load <= 50,
swap_s_100k <= 10, swap_failed_requests = 0. With `--impressions-compare`, `impressions`: {off, on (each
max_rps, p50_ms, p99_ms_at_max, p99_ms_at_half_load), rps_ratio_on_off, p99_half_load_ratio_on_off,
written, dropped}; target rps_ratio_on_off >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

CATALOG_ITEMS = 2_000
USERS = 1_000
HISTORY = 20
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)  # rising until a step falls 10% below the best (`max_rps`)
READY_TIMEOUT_S = 180.0
SCALE_DIM = 64  # vector size of --items catalogs: ModelConfig.dim's default
NEW_ITEMS_TIMEOUT_S = 120.0
UNLOAD_TIMEOUT_S = 60.0  # the longest the bench waits for the replica to drop the swapped-out version
PAIRS = 2  # extra back-to-back (no-op, recommendations) measures after the first (--pairs)
IDLE_CPU_S = 3.0  # seconds of no load before each max_rps, to measure the processes' idle CPU
MODEL_BATCH = 8  # requests per user-tower call in `model_cpu_ms_per_request`: the replica's batch at ~8 in flight
MODEL_WARMUP_BATCHES = 5
IMPRESSIONS_PREFIX = "/imp"  # route prefix of the API with impressions on (--impressions-compare)


async def closed_loop(url: str, concurrency: int, duration_s: float, params_of) -> tuple[float, np.ndarray, int]:
    import aiohttp

    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration_s
    async with aiohttp.ClientSession() as session:
        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    async with session.get(url, params=params_of(i)) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                lat.append(time.perf_counter() - t0)
                i += concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return len(lat) / wall, np.array(lat), errors


async def open_loop(url: str, rate: float, duration_s: float, params_of) -> tuple[np.ndarray, int]:
    import aiohttp

    rng = np.random.default_rng(0)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.get(url, params=params_of(i)) as resp:
                    await resp.read()
                    errors += resp.status != 200
            except aiohttp.ClientError:
                errors += 1
            lat.append(time.perf_counter() - t0)

        tasks, i = [], 0
        start = time.perf_counter()
        nxt = start
        while nxt - start < duration_s:
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(i)))
            i += 1
            nxt += rng.exponential(1.0 / rate)
        await asyncio.gather(*tasks)
    return np.array(lat), errors


def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process and every process it started: the load generator,
    Ray's processes (the proxy, the replicas, raylet, GCS) and the embedded Redis -- not the machine's
    other jobs. Per request it is the rate a machine of these cores would reach with nothing else on
    it, far steadier on a shared machine than the rate itself."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def max_rps(url: str, duration_s: float, params_of, label: str, concurrency=CONCURRENCY) -> dict:
    """The best rate of a closed-loop load at rising `concurrency`, `duration_s` per step (also used by
    bench/soak.py): stops once a step falls 10% below the best (past the knee). `cpu_ms_per_request`:
    `own_cpu_s` over that step per request; `cpu_ms_per_request_min`: the lowest of the steps at
    concurrency >= 8 (where batching and queueing settle)."""
    best = {"rps": 0.0}
    cpu_min = net_min = None
    # What the processes burn with no request at all (Serve's controller and metrics pushes, the API's
    # followers, Redis): a per-second cost that a lower request rate spreads over fewer requests.
    cpu0 = own_cpu_s()
    time.sleep(IDLE_CPU_S)
    idle_cores = (own_cpu_s() - cpu0) / IDLE_CPU_S
    for c in concurrency:
        cpu0 = own_cpu_s()
        rps, lat, errors = asyncio.run(closed_loop(url, c, duration_s, params_of))
        cpu_ms = 1e3 * (own_cpu_s() - cpu0) / max(1, len(lat))
        print(f"  {label}: concurrency {c:>2}: {rps:7.1f} req/s  p50 {1e3 * np.percentile(lat, 50):6.1f} ms  "
              f"p99 {1e3 * np.percentile(lat, 99):6.1f} ms  errors {errors}  CPU {cpu_ms:.2f} ms/request", flush=True)
        if c >= 8:
            cpu_min = cpu_ms if cpu_min is None else min(cpu_min, cpu_ms)
            net = cpu_ms - 1e3 * idle_cores / max(rps, 1e-9)
            net_min = net if net_min is None else min(net_min, net)
        if rps > best["rps"]:
            best = {"rps": rps, "concurrency": c, "p50_ms": 1e3 * np.percentile(lat, 50),
                    "p99_ms": 1e3 * np.percentile(lat, 99), "errors": errors, "cpu_ms_per_request": cpu_ms}
        elif rps < 0.9 * best["rps"]:
            break  # past the knee
    best["cpu_ms_per_request_min"] = cpu_min if cpu_min is not None else best.get("cpu_ms_per_request")
    best["idle_cpu_cores"] = idle_cores
    best["cpu_ms_per_request_net_min"] = net_min if net_min is not None else best["cpu_ms_per_request_min"]
    print(f"  {label}: idle {idle_cores:.3f} cores; CPU per request at >= 8 in flight {best['cpu_ms_per_request_min']:.2f} "
          f"ms, {best['cpu_ms_per_request_net_min']:.2f} ms net of idle", flush=True)
    return best


def impression_counts(api: str) -> tuple[float, dict[str, float]]:
    """streamrec_impressions_written_total and _dropped_total{reason} from a replica's GET /metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    written, dropped = 0.0, {}
    for family in text_string_to_metric_families(requests.get(f"{api}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "streamrec_impressions_written_total":
                written += sample.value
            elif sample.name == "streamrec_impressions_dropped_total":
                reason = sample.labels.get("reason", "?")
                dropped[reason] = dropped.get(reason, 0.0) + sample.value
    return written, dropped


def compare_impressions(api: str, duration_s: float, params_of, off: dict, half: float, off_p99_half: float) -> dict:
    """The API with impressions on at `api`, measured as the one with them off was (`off`: its max_rps
    result; `half`: the half-load rate both are measured at): the two side by side, and the ratios."""
    print("impressions on (the same API, one impression per answer to the embedded broker)", flush=True)
    on = max_rps(f"{api}/v1/recommendations", duration_s, params_of, "recommendations, impressions on")
    lat, errors = asyncio.run(open_loop(f"{api}/v1/recommendations", half, duration_s * 2, params_of))
    on_p99_half = 1e3 * float(np.percentile(lat, 99))
    written, dropped = impression_counts(api)
    side = {
        "off": {"max_rps": off["rps"], "p50_ms": off["p50_ms"], "p99_ms_at_max": off["p99_ms"],
                "p99_ms_at_half_load": off_p99_half},
        "on": {"max_rps": on["rps"], "p50_ms": on["p50_ms"], "p99_ms_at_max": on["p99_ms"],
               "p99_ms_at_half_load": on_p99_half, "half_load_errors": errors},
        "half_load_rps": half,
        "rps_ratio_on_off": on["rps"] / off["rps"],
        "p99_half_load_ratio_on_off": on_p99_half / off_p99_half,
        "written": written, "dropped": dropped,
    }
    print(f"  {'impressions':<12} {'max req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99 ms @ half':>14}", flush=True)
    for name in ("off", "on"):
        row = side[name]
        print(f"  {name:<12} {row['max_rps']:>10.1f} {row['p50_ms']:>8.1f} {row['p99_ms_at_max']:>8.1f} "
              f"{row['p99_ms_at_half_load']:>14.1f}", flush=True)
    print(f"  on/off: throughput x{side['rps_ratio_on_off']:.3f}, p99 at {half:.1f} req/s "
          f"x{side['p99_half_load_ratio_on_off']:.3f}; impressions written {written:.0f}, dropped {dropped}",
          flush=True)
    return side


def model_cpu_ms_per_request(registry, version: str, histories: list[list[str]], batch: int = MODEL_BATCH) -> float:
    """CPU ms per request of the recommendation's own work -- `LoadedAdapter.recommend` (user tower,
    retrieval, candidate features, ranker) on `batch` requests at a time, in this process, one thread, as
    the replica runs it -- measured before Ray starts. `rec_cpu_ms_per_request` less this is what serving
    a request costs around the model (proxy, Serve, the hot route, Redis, the load generator):
    `cpu_ratio_without_model` compares that with the no-op."""
    import faiss
    import torch

    from services.loaded_adapter import LoadedAdapter

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    adapter = LoadedAdapter.load(registry, "default", version)
    groups = [histories[lo:lo + batch] for lo in range(0, len(histories) - batch + 1, batch)]

    def run(group: list[list[str]]) -> None:
        adapter.recommend(group, [[1_000 * (k + 1) for k in range(len(h))] for h in group], [None] * len(group), 10,
                          [set(h) for h in group])

    for group in groups[:MODEL_WARMUP_BATCHES]:
        run(group)
    t0 = time.process_time()
    for group in groups:
        run(group)
    return 1e3 * (time.process_time() - t0) / (len(groups) * batch)


def scale_figures(registry, version: str, items: int, publish_s: float) -> dict:
    """The stored index's description (training/ann_index.py's sidecar) of a published version."""
    from training.ann_index import INDEX_META_FILE, IndexMeta

    meta_path = Path(registry.open("default", version, verify=False)) / INDEX_META_FILE
    if meta_path.is_file():
        meta = IndexMeta(**json.loads(meta_path.read_text()))
    else:  # exact: nothing stored, the replica builds a flat index from the embeddings
        meta = IndexMeta("flat", items, SCALE_DIM)
    figures = {"items": items, "index_type": meta.index_type, "index_build_s": meta.build_s,
               "index_nlist": meta.nlist, "index_nprobe": meta.nprobe, "index_recall100": meta.recall100,
               "bytes_per_item": meta.bytes_per_item, "raw_bytes_per_item": 4 * meta.dim, "publish_s": publish_s}
    print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()),
          flush=True)
    return figures


def replica_sample(api: str, name: str, **labels: str) -> float:
    """One sample of a replica's GET /metrics (-1 when it has none yet)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(requests.get(f"{api}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return -1.0


def index_items(api: str) -> float:
    """streamrec_index_items{scene="default"} of the replica that answers."""
    return replica_sample(api, "streamrec_index_items", scene="default")


def replica_rss_mb(api: str) -> float:
    return replica_sample(api, "process_resident_memory_bytes") / 2 ** 20


def add_new_items(settings, client, api: str, catalog: int, m: int) -> dict:
    """Write `m` new items to the online store at once, as ingest does (one partition's records,
    the catalog change log included), and time until the replica's index holds all of them."""
    from streaming.events import Item
    from streaming.online_store import OnlineStore

    store = OnlineStore(client, settings.redis_prefix)
    before = index_items(api)
    ts = int(time.time() * 1000)
    records = [(k, Item(item_id=f"new{k}", title=f"New film {k}", text=f"New film {k}. Genres: Drama.", ts=ts))
               for k in range(m)]
    print(f"adding {m:,} new catalog items at once (index holds {before:.0f})", flush=True)
    t0 = time.perf_counter()
    store.apply_items(settings.items_topic, 0, records)
    written_s = time.perf_counter() - t0
    servable_s = None
    while time.perf_counter() - t0 < NEW_ITEMS_TIMEOUT_S:
        if index_items(api) >= before + m:
            servable_s = time.perf_counter() - t0
            break
        time.sleep(0.05)
    embed_s = replica_sample(api, "streamrec_catalog_upsert_seconds_total", stage="embed")
    index_s = replica_sample(api, "streamrec_catalog_upsert_seconds_total", stage="index")
    print(f"  written in {written_s:.2f} s; all {m:,} servable after {servable_s} s (the replica spent {embed_s:.2f} s "
          f"embedding their text, {index_s:.3f} s indexing them)", flush=True)
    return {"new_items": m, "new_items_written_s": written_s, "new_items_servable_s": servable_s,
            "new_items_embed_s": embed_s, "new_items_index_s": index_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--duration-s", type=float, default=8.0, help="seconds per load step")
    ap.add_argument("--swap-items", type=int, default=100_000, help="catalog size of the swapped-in version "
                    "(with --items: ignored, the swap is to another --items version)")
    ap.add_argument("--items", type=int, default=None, help="serve a synthetic catalog of this many items (64-d) "
                    "and swap to another of the same size (default: 2,000 real-text items, swap to --swap-items)")
    ap.add_argument("--new-items", type=int, default=0, help="after the swap, add this many new catalog items at "
                    "once and time until the replica serves them all")
    ap.add_argument("--replicas", type=int, default=1, help="replicas of the API deployment")
    ap.add_argument("--pairs", type=int, default=PAIRS, help="after the first measures, this many more (no-op, "
                    "recommendations) max-rate measures back to back; `rps_ratio` is the median over all pairs "
                    "(other jobs on a shared machine move the rates between minutes, less within a pair)")
    ap.add_argument("--no-ranker", action="store_true", help="adapters without the second stage (first stage only)")
    ap.add_argument("--impressions-compare", action="store_true",
                    help="also serve with impressions on (to the embedded broker) and print both side by side "
                         "(the default run serves with impressions off, no broker)")
    args = ap.parse_args()
    if args.items is not None and args.items < CATALOG_ITEMS:
        ap.error(f"--items must be at least {CATALOG_ITEMS} (the users' histories use those items), got {args.items}")
    if args.new_items < 0:
        ap.error(f"--new-items must be >= 0, got {args.new_items}")

    import ray
    import redis
    import requests
    from ray import serve

    from services.serve_app import build_app
    from services.processes import free_port
    from services.stack import EmbeddedStack
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter, synthetic_catalog
    from streaming.kafka_io import ensure_topics
    from streaming.pseudonym import Pseudonymizer
    from streaming.settings import load_settings, settings_env
    from training.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "load_avg_at_start": list(os.getloadavg())}, "ranker": not args.no_ranker}
    with EmbeddedStack(tmp / "stack", kafka=args.impressions_compare) as info:
        port = free_port()
        common = dict(redis_url=info.redis_url, data_dir=tmp, registry_root=str(tmp / "registry"), serve_port=port)
        if info.kafka_bootstrap:
            common["kafka_bootstrap_servers"] = info.kafka_bootstrap
        settings = load_settings(**common, impressions_enabled=False)
        settings_imp = load_settings(**common, impressions_enabled=True) if args.impressions_compare else None
        if settings_imp is not None:
            ensure_topics(settings_imp, [settings_imp.impressions_topic])
        registry = Registry(settings.registry_uri)
        r = redis.Redis.from_url(info.redis_url)
        ids, titles, texts = synthetic_catalog(CATALOG_ITEMS)
        rng = np.random.default_rng(0)
        pipe = r.pipeline(transaction=False)
        histories = []
        pseudonymize = Pseudonymizer.from_settings(settings)  # what ingest would have stored for user u<n>
        for u in range(USERS):
            items = rng.choice(CATALOG_ITEMS, size=HISTORY, replace=False)
            histories.append([ids[i] for i in items])
            pipe.zadd(f"{settings.redis_prefix}u:{pseudonymize(f'u{u}')}:recent", {ids[i]: 1_000 * (k + 1) for k, i in enumerate(items)})
        pipe.execute()
        if args.items is None:
            v1 = publish_synthetic_adapter(registry, tmp / "staging", n_items=CATALOG_ITEMS, seed=1,
                                           ranker=not args.no_ranker)
        else:
            print(f"publishing a {args.items:,}-item version", flush=True)
            t0 = time.perf_counter()
            v1 = publish_synthetic_adapter(registry, tmp / "staging", n_items=args.items, seed=1, dim=SCALE_DIM,
                                           random_embeddings=True, ranker=not args.no_ranker)
            out.update(scale_figures(registry, v1, args.items, time.perf_counter() - t0))
        if args.items is None:
            out["rec_model_cpu_ms_per_request"] = model_cpu_ms_per_request(registry, v1, histories)
            print(f"the recommendation's own work, in process: {out['rec_model_cpu_ms_per_request']:.2f} ms CPU per "
                  f"request (batches of {MODEL_BATCH})", flush=True)

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})  # as the API replica
        class Noop:
            async def __call__(self, request) -> dict:
                return {"ok": True}

        serve.run(Noop.bind(), name="noop", route_prefix="/noop")

        # The same no-op as a FastAPI ingress set up like the API's (telemetry off, async route):
        # the floor of the framework the API is built on, reported next to the plain one.
        from fastapi import FastAPI

        noop_api = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})

        @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})  # as the API replica
        @serve.ingress(noop_api)
        class FastApiNoop:
            @noop_api.get("/")
            async def root(self) -> dict:
                return {"ok": True}

        serve.run(FastApiNoop.bind(), name="noop-fastapi", route_prefix="/noop-fastapi")

        # The same FastAPI no-op run in a plain deployment's process, as the API now runs
        # (services/asgi_call.py): what the transport choice is worth by itself.
        from services.asgi_call import run_asgi

        inner_api = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})

        @inner_api.get("/")  # the app sees paths below the route prefix, as the API does
        async def inner_root() -> dict:
            return {"ok": True}

        @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})  # as the API replica
        class AsgiNoop:
            async def __call__(self, request):
                return await run_asgi(inner_api, request)

        serve.run(AsgiNoop.bind(), name="noop-asgi", route_prefix="/noop-asgi")
        base = f"http://127.0.0.1:{port}"
        print("max throughput", flush=True)
        noop = max_rps(f"{base}/noop", args.duration_s, lambda i: None, "noop")
        noop_fastapi = max_rps(f"{base}/noop-fastapi", args.duration_s, lambda i: None, "noop (FastAPI ingress)")
        noop_asgi = max_rps(f"{base}/noop-asgi", args.duration_s, lambda i: None, "noop (FastAPI in process)")
        # their CPUs go to the API's replicas (--replicas 2); the plain no-op stays for the pairs (an idle
        # replica costs nothing measurable) and goes before the swap
        for name in ("noop-fastapi", "noop-asgi") if args.pairs else ("noop", "noop-fastapi", "noop-asgi"):
            serve.delete(name)
        serve.run(build_app(settings_env(settings), replicas=args.replicas), name="streamrec",
                  route_prefix="/")
        apis = [base]
        if settings_imp is not None:
            serve.run(build_app(settings_env(settings_imp), replicas=args.replicas), name="streamrec-impressions",
                      route_prefix=IMPRESSIONS_PREFIX)
            apis.append(base + IMPRESSIONS_PREFIX)
        deadline = time.time() + READY_TIMEOUT_S
        for api in apis:
            while requests.get(f"{api}/healthz", timeout=5).json().get("scenes", {}).get("default") != v1:
                if time.time() > deadline:
                    raise SystemExit(f"the API at {api} never served the first adapter")
                time.sleep(0.2)

        def rec_params(i: int) -> dict:
            return {"user_id": f"u{i % USERS}", "k": 10}

        out["replica_rss_mb_serving"] = replica_rss_mb(base)  # one version loaded (one replica: --replicas 1)

        rec = max_rps(f"{base}/v1/recommendations", args.duration_s, rec_params, "recommendations")
        pairs = [(noop, rec)]
        for _ in range(args.pairs):
            pairs.append((max_rps(f"{base}/noop", args.duration_s, lambda i: None, "noop"),
                          max_rps(f"{base}/v1/recommendations", args.duration_s, rec_params, "recommendations")))
        if args.pairs:
            # the framework's own tail on this machine: the plain no-op at half its rate, open loop
            noop_lat, _ = asyncio.run(open_loop(f"{base}/noop", noop["rps"] / 2, args.duration_s * 2, lambda i: None))
            out["noop_p99_ms_at_half_load"] = 1e3 * float(np.percentile(noop_lat, 99))
            print(f"  no-op at half its rate ({noop['rps'] / 2:.1f} req/s): p99 {out['noop_p99_ms_at_half_load']:.1f} ms",
                  flush=True)
            serve.delete("noop")
        out["pairs"] = [{"noop_max_rps": n["rps"], "rec_max_rps": r["rps"], "rps_ratio": r["rps"] / n["rps"],
                         "cpu_ratio": n["cpu_ms_per_request_min"] / r["cpu_ms_per_request_min"]} for n, r in pairs]
        print("  pairs (no-op, recommendations): " + "; ".join(
            f"{p['noop_max_rps']:.0f} / {p['rec_max_rps']:.0f} req/s = {p['rps_ratio']:.2f} (CPU {p['cpu_ratio']:.2f})"
            for p in out["pairs"]), flush=True)
        half = rec["rps"] / 2
        lat, errors = asyncio.run(open_loop(f"{base}/v1/recommendations", half, args.duration_s * 2, rec_params))
        p99_half = 1e3 * float(np.percentile(lat, 99))
        print(f"  half load {half:.1f} req/s: p50 {1e3 * np.percentile(lat, 50):.1f} ms  p99 {p99_half:.1f} ms  "
              f"errors {errors}", flush=True)
        if settings_imp is not None:
            impressions = compare_impressions(base + IMPRESSIONS_PREFIX, args.duration_s, rec_params, rec, half,
                                              p99_half)
            serve.delete("streamrec-impressions")  # it would load the swapped-in version too, beside the measure

        swap_items = args.items if args.items is not None else args.swap_items
        print(f"hot swap to a {swap_items:,}-item version under load", flush=True)
        stop = threading.Event()
        log: list[tuple[float, int, str | None]] = []

        def load() -> None:
            session = requests.Session()
            i = 0
            while not stop.is_set():
                try:
                    resp = session.get(f"{base}/v1/recommendations", params=rec_params(i), timeout=30)
                    log.append((time.time(), resp.status_code, resp.json().get("version") if resp.ok else None))
                except requests.RequestException:
                    log.append((time.time(), 0, None))
                i += 1
                time.sleep(0.02)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        staged_at = time.time()
        v2 = publish_synthetic_adapter(registry, tmp / "staging", n_items=swap_items, seed=2,
                                       random_embeddings=True, ranker=not args.no_ranker,
                                       dim=SCALE_DIM if args.items is not None else 32)
        published_at = time.time()
        swap_s = None
        while time.time() - published_at < 120:
            hit = [ts for ts, code, v in log if v == v2]
            if hit:
                swap_s = hit[0] - published_at
                break
            time.sleep(0.05)
        time.sleep(1.0)
        new_items = None
        if args.new_items:
            new_items = add_new_items(settings, r, base, swap_items, args.new_items)
        stop.set()
        for t in threads:
            t.join()
        out["replica_rss_mb_after_swap"] = replica_rss_mb(base)
        # The replaced version leaves once the replica's sweep sees it unwanted (services/adapter_cache.py):
        # the RSS then is what one version of the new catalog holds (--replicas 1: one replica answers).
        unload_deadline = time.time() + UNLOAD_TIMEOUT_S
        while replica_sample(base, "streamrec_adapters_loaded") > 1 and time.time() < unload_deadline:
            time.sleep(0.5)
        out["adapters_loaded_after_swap"] = replica_sample(base, "streamrec_adapters_loaded")
        out["replica_rss_mb_after_unload"] = replica_rss_mb(base)
        print(f"  replica RSS: {out['replica_rss_mb_serving']:.0f} MB serving v1, {out['replica_rss_mb_after_swap']:.0f} "
              f"MB after the swap, {out['replica_rss_mb_after_unload']:.0f} MB once v1 was dropped "
              f"({out['adapters_loaded_after_swap']:.0f} version(s) held)", flush=True)
        failed = sum(1 for ts, code, _ in log if code != 200 and ts >= staged_at)
        print(f"  publish -> first response from {v2}: {swap_s} s; failed requests meanwhile: {failed} "
              f"(of {sum(1 for ts, _, _ in log if ts >= staged_at)})", flush=True)
        serve.shutdown()
        ray.shutdown()

    out.update({
        "noop_max_rps": noop["rps"], "rec_max_rps": rec["rps"],
        "rps_ratio": float(np.median([p["rps_ratio"] for p in out["pairs"]])),
        "cpu_ratio_pairs_median": float(np.median([p["cpu_ratio"] for p in out["pairs"]])),
        "rps_ratio_first_pair": rec["rps"] / noop["rps"],
        "noop_cpu_ms_per_request": noop["cpu_ms_per_request_min"], "rec_cpu_ms_per_request": rec["cpu_ms_per_request_min"],
        "cpu_ratio": noop["cpu_ms_per_request_min"] / rec["cpu_ms_per_request_min"],
        "noop_idle_cpu_cores": noop["idle_cpu_cores"], "rec_idle_cpu_cores": rec["idle_cpu_cores"],
        "noop_cpu_ms_per_request_net": noop["cpu_ms_per_request_net_min"],
        "rec_cpu_ms_per_request_net": rec["cpu_ms_per_request_net_min"],
        "cpu_ratio_net": noop["cpu_ms_per_request_net_min"] / rec["cpu_ms_per_request_net_min"],
        **({"cpu_ratio_without_model": noop["cpu_ms_per_request_net_min"]
            / (rec["cpu_ms_per_request_net_min"] - out["rec_model_cpu_ms_per_request"])}
           if "rec_model_cpu_ms_per_request" in out else {}),
        "noop_fastapi_max_rps": noop_fastapi["rps"], "rps_ratio_vs_fastapi_noop": rec["rps"] / noop_fastapi["rps"],
        "noop_asgi_max_rps": noop_asgi["rps"], "rps_ratio_vs_asgi_noop": rec["rps"] / noop_asgi["rps"],
        "replicas": args.replicas, "rec_p99_ms": rec["p99_ms"],
        "rec_p50_ms": rec["p50_ms"], "rec_p99_ms_at_max": rec["p99_ms"], "rec_p99_ms_at_half_load": p99_half,
        "half_load_rps": half, "half_load_errors": errors, "swap_s": swap_s, "swap_items": swap_items,
        "swap_failed_requests": failed, "noop": noop, "noop_fastapi": noop_fastapi, "noop_asgi": noop_asgi, "rec": rec,
    })
    if args.items is None:
        out["swap_s_100k"] = swap_s
    if new_items is not None:
        out.update(new_items)
    if args.impressions_compare:
        out["impressions"] = impressions
        out["targets"] = {"impressions_rps_ratio_on_off>=0.9": impressions["rps_ratio_on_off"] >= 0.9}
    out["machine"]["load_avg_at_end"] = list(os.getloadavg())
    out["targets"] = {
        **out.get("targets", {}),
        "rps_ratio>=0.6": out["rps_ratio"] >= 0.6,
        "rec_p99_ms_at_half_load<=50": p99_half <= 50,
        "swap_failed_requests==0": failed == 0,
    }
    if args.items is None:
        out["targets"]["swap_s_100k<=10"] = swap_s is not None and swap_s <= 10
    else:
        out["targets"].update({
            "index_recall100>=0.95": out["index_recall100"] >= 0.95,
            "swap_s<=30": swap_s is not None and swap_s <= 30,
            "bytes_per_item<=1.5x_raw": out["bytes_per_item"] <= 1.5 * out["raw_bytes_per_item"],
        })
    if new_items is not None and args.new_items == 10_000:
        out["targets"]["new_items_servable_s<=5"] = (new_items["new_items_servable_s"] is not None
                                                     and new_items["new_items_servable_s"] <= 5)
    print(json.dumps({k: v for k, v in out.items() if k not in ("noop", "noop_fastapi", "noop_asgi", "rec")}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where `streamrec status` looks: it gathers one `Snapshot` (services/status_model.py) from the
running parts, and never raises for a part that is down or unreadable -- that is what it reports.

Each source is read in a thread of its own, so parts that time out cost one `timeout_s`, not one
each. Nothing is started or written: the embedded stack is read from its state file
(`services.stack.stack_status`), never started.
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import requests

from services.status_model import ApiObs, Endpoint, FeaturesObs, RegistryObs, Samples, SceneObs, Scrape, Snapshot
from streaming.settings import Settings

HTTP_TIMEOUT_S = 2.0
"""Default longest wait for each part (a local part that is down refuses at once)."""
LOCALHOST = "127.0.0.1"
API_KEY_HEADER = "X-API-Key"  # services/serve_app.py reads it (case-insensitive)
FEATURES_METRICS = "features"  # <metrics_dir>/features.prom (streaming/job_metrics.py)
TRAIN_METRICS = "train-{scene}"  # <metrics_dir>/train-<scene>.prom
ERROR_CHARS = 200  # an error body quoted in a reason is cut to this many characters

T = TypeVar("T")


@dataclass(frozen=True)
class SourceOptions:
    ingest_urls: tuple[str, ...] = ()  # empty: the local ingest at STREAMREC_INGEST_METRICS_PORT
    api_url: str | None = None  # None: http://127.0.0.1:<STREAMREC_SERVE_PORT>
    timeout_s: float = HTTP_TIMEOUT_S


def default_ingest_urls(settings: Settings) -> tuple[str, ...]:
    """The local ingest's metrics URL, or none when its exporter is off (port 0)."""
    port = settings.ingest_metrics_port
    return (f"http://{LOCALHOST}:{port}/metrics",) if port else ()


def default_api_url(settings: Settings) -> str:
    return f"http://{LOCALHOST}:{settings.serve_port}"


def metrics_url(url: str) -> str:
    """`http://host:9310` means its /metrics; a URL with a path is taken as it is."""
    return url.rstrip("/") + "/metrics" if urlsplit(url).path in ("", "/") else url


def parse_samples(text: str, source: str) -> Samples:
    """Prometheus text -> Samples (the one parser: streaming/job_metrics.py's)."""
    from streaming.job_metrics import parse_job_metrics

    return Samples.of((name, labels, value) for name, rows in parse_job_metrics(text, source).items()
                      for labels, value in rows)


def describe(exc: BaseException) -> str:
    """An error in a line: connection refused / timed out said plainly, else its type and first line."""
    if isinstance(exc, requests.Timeout):
        return "no answer in time (timed out)"
    if isinstance(exc, requests.ConnectionError) and "refused" in str(exc).lower():
        return "connection refused (nothing listens there)"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:ERROR_CHARS]


def iso_to_unix(text: Any) -> float | None:
    """An ISO-8601 time (as the manifests write it) in Unix seconds; None when absent or unparsable."""
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


# --- the stack ---------------------------------------------------------------------------------
def probe_kafka(settings: Settings, timeout_s: float) -> Endpoint:
    bootstrap = settings.kafka_bootstrap_servers
    try:
        from streaming.kafka_io import make_admin  # the configured TLS / SASL too

        timeout_ms = int(timeout_s * 1000)
        admin = make_admin(settings, client_id="streamrec-status", request_timeout_ms=timeout_ms,
                           bootstrap_timeout_ms=timeout_ms)
        try:
            cluster = admin.describe_cluster().get("cluster_id")
        finally:
            admin.close()
    except Exception as exc:  # any failure to reach the broker is what this probe reports
        return Endpoint(bootstrap, "configured", False, describe(exc))
    return Endpoint(bootstrap, "configured", True, f"cluster {cluster}")


def probe_redis(settings: Settings, timeout_s: float) -> Endpoint:
    from streaming.redis_io import make_redis, shown_url

    url = shown_url(settings)  # what the report shows: the password masked
    try:
        client = make_redis(settings, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            info = client.info("server")
            memory = client.info("memory").get("used_memory_human")
        finally:
            client.close()
    except Exception as exc:  # down, refused, auth, timeout: all "does not answer", with the reason
        return Endpoint(url, "configured", False, describe(exc))
    return Endpoint(url, "configured", True, f"redis {info.get('redis_version')}, {memory} used")


def gather_stack(settings: Settings, timeout_s: float) -> tuple[str, Endpoint, Endpoint]:
    """(mode, broker, redis): configured addresses are probed; unset ones come from the embedded
    stack's state file, whose components `stack_status` probes (it starts nothing)."""
    info = None
    if settings.kafka_bootstrap_servers is None or settings.redis_url is None:
        from services.stack import stack_status

        info = stack_status(settings.data_dir)
    none_running = f"no embedded stack answers for data dir {Path(settings.data_dir).resolve()}"

    def embedded(address: str | None, pid: int | None, what: str) -> Endpoint:
        if address is None:
            return Endpoint(None, "embedded", False, none_running if info is None else f"the embedded {what} is "
                            "recorded but does not answer (dead or hung)")
        return Endpoint(address, "embedded", True, f"pid {pid}")

    if settings.kafka_bootstrap_servers is not None:
        broker = probe_kafka(settings, timeout_s)
    else:
        broker = embedded(info.kafka_bootstrap if info else None, info.kafka_pid if info else None, "broker")
    if settings.redis_url is not None:
        rds = probe_redis(settings, timeout_s)
    else:
        rds = embedded(info.redis_url if info else None, info.redis_pid if info else None, "Redis")
    mode = broker.origin if broker.origin == rds.origin else "mixed"
    return mode, broker, rds


# --- ingest, features, registry ---------------------------------------------------------------------
def scrape(url: str, timeout_s: float, session: requests.Session | None = None) -> Scrape:
    url = metrics_url(url)
    try:
        resp = (session or requests).get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        return Scrape(url, error=describe(exc))
    if resp.status_code != 200:
        return Scrape(url, error=f"HTTP {resp.status_code}: {resp.text[:ERROR_CHARS]}")
    try:
        return Scrape(url, metrics=parse_samples(resp.text, url))
    except ValueError as exc:
        return Scrape(url, error=str(exc))


def read_prom(settings: Settings, name: str) -> Samples | None:
    """A batch run's metrics file parsed; None when it does not exist (MetricsFileError, a
    ValueError, when it does not parse)."""
    from streaming.job_metrics import metrics_file, read_job_metrics

    found = read_job_metrics(metrics_file(settings, name))
    if found is None:
        return None
    return Samples.of((n, labels, v) for n, rows in found.samples.items() for labels, v in rows)


def gather_features(settings: Settings) -> FeaturesObs:
    from streaming.features.tables import read_manifest
    from streaming.job_metrics import metrics_file

    path = str(metrics_file(settings, FEATURES_METRICS))
    try:
        manifest = read_manifest(settings)
        prom = read_prom(settings, FEATURES_METRICS)
    except (OSError, ValueError) as exc:  # an unreadable manifest or metrics file
        return FeaturesObs(prom_path=path, error=describe(exc))
    version = int(manifest["version"]) if manifest and manifest.get("version") is not None else None
    return FeaturesObs(manifest_version=version, manifest_created_at=iso_to_unix((manifest or {}).get("created_at")),
                       prom=prom, prom_path=path)


def gather_registry(settings: Settings) -> RegistryObs:
    from training.registry import Registry

    root = settings.registry_uri
    try:
        registry = Registry(root)
        scenes = []
        for scene in registry.scenes():
            live = registry.current(scene)
            try:
                train = read_prom(settings, TRAIN_METRICS.format(scene=scene))
            except (OSError, ValueError):  # a broken outcome file must not hide the scene's live version
                train = None
            ndcg = (live.metrics.get("val_ndcg10") if live else None)
            scenes.append(SceneObs(scene, live.version if live else None,
                                   iso_to_unix(live.created_at) if live else None,
                                   float(ndcg) if isinstance(ndcg, (int, float)) else None, train))
    except Exception as exc:  # any backend error (local or object store) reads as "registry unreadable"
        return RegistryObs(root, error=describe(exc))
    return RegistryObs(root, tuple(scenes))


# --- the API ---------------------------------------------------------------------------------------
def gather_api(settings: Settings, base_url: str, timeout_s: float) -> ApiObs:
    base = base_url.rstrip("/")
    headers = {API_KEY_HEADER: settings.api_keys[0]} if settings.api_keys else {}
    with requests.Session() as session:
        try:
            resp = session.get(f"{base}/readyz", timeout=timeout_s)
            body = resp.json()
        except (requests.RequestException, ValueError) as exc:
            return ApiObs(base, error=describe(exc))
        problems = []
        if resp.status_code not in (200, 503) or not isinstance(body, dict):
            return ApiObs(base, error=f"GET /readyz: HTTP {resp.status_code}: {resp.text[:ERROR_CHARS]}")
        models = None
        try:
            r = session.get(f"{base}/v1/models", headers=headers, timeout=timeout_s)
            if r.status_code == 200:
                models = r.json()
            else:
                problems.append(f"GET /v1/models: HTTP {r.status_code}"
                                + (" (set STREAMREC_API_KEYS to one of the API's keys)" if r.status_code in (401, 403) else ""))
        except (requests.RequestException, ValueError) as exc:
            problems.append(f"GET /v1/models: {describe(exc)}")
        got = scrape(f"{base}/metrics", timeout_s, session)
        if got.error:
            problems.append(f"GET /metrics: {got.error}")
    return ApiObs(base, reachable=True, ready=body.get("ready") is True, scene_states=dict(body.get("scenes") or {}),
                  models=models if isinstance(models, dict) else None, metrics=got.metrics,
                  error="; ".join(problems) or None)


# --- all of it ---------------------------------------------------------------------------------------
def _safely(fn: Callable[[], T], on_error: Callable[[BaseException], T]) -> T:
    try:
        return fn()
    except Exception as exc:  # a bug in one source must not hide the others: it becomes that part's error
        return on_error(exc)


def gather(settings: Settings, opts: SourceOptions, clock: Callable[[], float] = time.time) -> Snapshot:
    """Read every part at once (one thread each); a part that is down is recorded, never raised."""
    urls = opts.ingest_urls or default_ingest_urls(settings)
    api_url = opts.api_url or default_api_url(settings)
    t = opts.timeout_s
    with ThreadPoolExecutor(max_workers=4 + len(urls), thread_name_prefix="status") as pool:
        stack = pool.submit(_safely, lambda: gather_stack(settings, t),
                            lambda e: ("?", Endpoint(None, "?", False, describe(e)),
                                                                 Endpoint(None, "?", False, describe(e))))
        scrapes = [pool.submit(_safely, lambda u=u: scrape(u, t), lambda e, u=u: Scrape(u, error=describe(e)))
                   for u in urls]
        features = pool.submit(_safely, lambda: gather_features(settings), lambda e: FeaturesObs(error=describe(e)))
        registry = pool.submit(_safely, lambda: gather_registry(settings),
                               lambda e: RegistryObs(settings.registry_uri, error=describe(e)))
        api = pool.submit(_safely, lambda: gather_api(settings, api_url, t), lambda e: ApiObs(api_url, error=describe(e)))
        mode, broker, rds = stack.result()
        return Snapshot(now=clock(), stack=mode, data_dir=str(Path(settings.data_dir).resolve()), broker=broker,
                        redis=rds, ingest=tuple(f.result() for f in scrapes), features=features.result(),
                        registry=registry.result(), api=api.result())


__all__ = ["API_KEY_HEADER", "HTTP_TIMEOUT_S", "SourceOptions", "default_api_url", "default_ingest_urls", "describe",
           "gather", "gather_api", "gather_features", "gather_registry", "gather_stack", "iso_to_unix", "metrics_url",
           "parse_samples", "probe_kafka", "probe_redis", "read_prom", "scrape"]

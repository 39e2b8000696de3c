"""The recommendation API: a Ray Serve application, one deployment with a FastAPI ingress.

    streamrec serve            # or: serve run services.serve_app:app_builder (settings from the environment)

`Api` is the whole request path in one replica: validate -> the user's recent items from Redis
(async client) -> user embedding (`@serve.batch` under load) -> FAISS -> co-visitation re-rank ->
top-k. Adapters are held per replica with `@serve.multiplexed`, keyed "scene@version" (a new
version is a new id: requests already holding the old one finish on it), loaded from their
precomputed item embeddings (checksums verified, no catalog re-encoding).

Why one deployment and not an ingress in front of a model deployment: the hop between two
deployments cost more CPU than the model itself (~8 ms of proxy/handle work against ~1 ms of
user tower + FAISS per request on 2 cores, bench/serve.py), and with a handful of scenes every
replica can hold all of them. Scaling is `num_replicas` of this one deployment.

Each replica runs four followers:

* registry (`RELOAD_POLL_S`): a new CURRENT version of a scene is loaded in the background, and
  only once it is ready does the scene's active id switch (one dict write); a version that fails
  to load (bad checksum, wrong shapes, missing file) is refused, logged and counted, and the old
  one keeps serving. `reconfigure(user_config)` takes `{"pins": {"scene": "v000003"}}` to pin or
  roll back a scene without restarting replicas.
* catalog (`CATALOG_POLL_S`): the online store's catalog change log (`items:log`): new items are
  embedded from their text with the active adapter, deleted ones leave the index.
* popularity (`POPULAR_REFRESH_S`): the snapshot served with `fallback: "popular"` when Redis is down.
* heartbeat (`HEARTBEAT_S`): this replica's active versions into Redis, for `GET /v1/models`.
"""

import asyncio
import json
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray import serve

from services.api_schema import (
    DEFAULT_K, MAX_ID_CHARS, MAX_K, SCENE_PATTERN, RecommendRequest, RecommendResponse, ScoredItem, SimilarResponse,
)
from streaming.online_store import popular_key, trending_key

logger = logging.getLogger(__name__)

RELOAD_POLL_S = 1.0  # how often a replica looks at the registry's CURRENT pointers
CATALOG_POLL_S = 1.0  # how often a replica reads the catalog change log
POPULAR_REFRESH_S = 5.0  # how often a replica refreshes its popularity snapshot (the Redis-down fallback)
HEARTBEAT_S = 1.0  # how often a replica writes its active versions for /v1/models
REPLICA_STALE_S = 10.0  # a replica silent this long is left out of /v1/models
REDIS_TIMEOUT_S = 0.25  # a slower Redis counts as down for this request
BATCH_MAX = 32
BATCH_WAIT_S = 0.002  # the user tower costs ~0.7 ms alone and ~0.15 ms/request in a batch of 16
MAX_MODELS_PER_REPLICA = 6  # scenes x (live + previous version); the least recently used is unloaded
GENRE_FETCH_FACTOR = 4  # candidates fetched per requested item when a genre filter may drop some
API_KEY_HEADER = "x-api-key"
TORCH_THREADS = 1
# Serve runs user code on an event loop of its own thread by default; on the replica's main loop a
# request skips two cross-thread hand-offs (bench/serve.py). Our request path never blocks that
# loop for long: Redis is async, a batch of the user tower costs ~1-2 ms, follower work is in threads.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

# FastAPI's native OpenTelemetry hooks are off: the service exports its own Prometheus metrics, and
# the hooks cost CPU on every request even with no exporter configured.
api = FastAPI(title="streamrec", version="1", description="Real-time recommendations (Ray Serve + FAISS).",
              telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})


def _settings():
    from streaming.settings import load_settings

    return load_settings()


def _redis_kwargs(settings) -> dict:
    if not settings.redis_url:
        raise RuntimeError("STREAMREC_REDIS_URL is not set: serving needs the online store")
    return {"url": settings.redis_url, "socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}


def _item_text(item: dict) -> str:
    """The same text recipe as training (training.corpus.item_text) for an item from Redis."""
    from training.corpus import item_text

    return item_text(item["title"], item.get("text"), item.get("attributes") or {}, item["item_id"])


def _json(payload: dict) -> Response:
    """The answer already in its response shape: serialized directly (the routes' response_model
    still documents it at /docs): validating our own output again is CPU spent on every request."""
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")


class _Metrics:
    def __init__(self, replica: str) -> None:
        r = self.registry = CollectorRegistry()
        self.latency = Histogram("streamrec_request_seconds", "request latency", ["route"], registry=r,
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.requests = Counter("streamrec_requests_total", "requests by route and status", ["route", "status"],
                                registry=r)
        self.version = Gauge("streamrec_active_adapter", "1 for the active version of each scene",
                             ["scene", "version"], registry=r)
        self.reloads = Counter("streamrec_adapter_reloads_total", "adapter versions swapped in", ["scene"], registry=r)
        self.reload_failures = Counter("streamrec_adapter_reload_failures_total", "versions refused", ["scene"],
                                       registry=r)
        self.fallbacks = Counter("streamrec_fallbacks_total", "answers not from the model", ["kind"], registry=r)
        self.index_size = Gauge("streamrec_index_items", "items in the active index", ["scene"], registry=r)
        self.index_recall = Gauge("streamrec_index_recall", "measured recall@10 of the active index vs exact search",
                                  ["scene"], registry=r)
        self.replica = Gauge("streamrec_replica_info", "the replica these metrics come from", ["replica"], registry=r)
        self.replica.labels(replica).set(1)


# Registered before @serve.ingress(api): the ingress takes the app as it is at decoration time.
@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path")) or str(e["loc"]) for e in exc.errors()]
    return JSONResponse(status_code=422, content={
        "error": f"invalid request: {', '.join(fields)}",
        "detail": [{"field": f, "msg": e["msg"], "type": e["type"]} for f, e in zip(fields, exc.errors())]})


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"error": exc.detail if isinstance(exc.detail, str)
                                                                else "invalid request", "detail": exc.detail})


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(api)
class Api:
    def __init__(self) -> None:
        import faiss
        import redis
        import redis.asyncio as aredis
        import torch

        from streaming.online_store import OnlineStore
        from training.registry import Registry

        # One thread per replica: requests are parallel across replicas and batches, and
        # intra-op threads on a small machine only fight each other (scale with num_replicas).
        torch.set_num_threads(TORCH_THREADS)
        faiss.omp_set_num_threads(TORCH_THREADS)
        self.settings = _settings()
        self.registry = Registry(self.settings.registry_uri)
        kw = _redis_kwargs(self.settings)
        # blocking client for follower work in threads; asyncio client on the request path
        self.store = OnlineStore(redis.Redis.from_url(**kw), self.settings.redis_prefix,
                                 self.settings.recent_items_max)
        self.aredis = aredis.Redis.from_url(**kw)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (unit use)
            self.replica = "local"
        self.metrics = _Metrics(self.replica)
        self.active: dict[str, str] = {}  # scene -> version serving now
        self.refused: dict[str, set[str]] = {}  # scene -> versions that failed to load
        self.pins: dict[str, str] = {}
        self.popular: list[tuple[str, float]] = []
        self.api_keys = set(self.settings.api_keys or ())
        self._catalog_lock = threading.Lock()  # catalog catch-up runs in threads: one at a time
        loop = asyncio.get_event_loop()
        self._followers = [loop.create_task(f()) for f in (self._follow_registry, self._follow_catalog,
                                                            self._follow_popularity, self._heartbeat)]

    def reconfigure(self, user_config: dict) -> None:
        pins = dict((user_config or {}).get("pins") or {})
        for scene, version in pins.items():
            if not isinstance(version, str) or not version:
                raise ValueError(f"user_config.pins[{scene!r}]={version!r}: expected a version name")
        self.pins = pins

    def check_health(self) -> None:
        for t in self._followers:
            if t.done():
                raise RuntimeError(f"a follower task stopped: {t.exception()!r}")

    # adapters -----------------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str):
        """Load "scene@version" (raises AdapterLoadError for a version that cannot serve)."""
        from services.loaded_adapter import LoadedAdapter

        scene, _, version = model_id.partition("@")
        adapter = await asyncio.to_thread(LoadedAdapter.load, self.registry, scene, version,
                                          base_model=self.settings.base_model)
        try:
            await asyncio.to_thread(self._catch_up, adapter)
        except Exception as exc:  # Redis down: serve the trained catalog, the follower catches up
            logger.warning("catalog sync of %s failed (%s); serving its trained catalog", model_id, exc)
        logger.info("loaded %s in %.2f s (%d items)", model_id, adapter.loaded_s, adapter.index.size)
        return adapter

    async def _adapter(self, scene: str):
        version = self.active.get(scene)
        if version is None:
            raise HTTPException(404, detail=f"scene {scene!r} has no adapter (known: {sorted(self.active)})")
        return await self.get_model(f"{scene}@{version}")

    async def swap(self, scene: str, version: str) -> bool:
        """Load `version` (in a thread: requests keep being served), then make it the scene's
        active version with one dict write."""
        model_id = f"{scene}@{version}"
        try:
            adapter = await self.get_model(model_id)
        except Exception as exc:
            self.refused.setdefault(scene, set()).add(version)
            self.metrics.reload_failures.labels(scene).inc()
            logger.error("refused %s: %s (still serving %s)", model_id, exc, self.active.get(scene))
            return False
        old = self.active.get(scene)
        self.active[scene] = version
        if old:
            self.metrics.version.labels(scene, old).set(0)
        self.metrics.version.labels(scene, version).set(1)
        self.metrics.reloads.labels(scene).inc()
        self.metrics.index_size.labels(scene).set(adapter.index.size)
        self.metrics.index_recall.labels(scene).set(adapter.index.recall)
        logger.info("scene %s: now serving %s (was %s; load %.2f s)", scene, version, old, adapter.loaded_s)
        return True

    # followers ----------------------------------------------------------------------------------
    async def _follow_registry(self) -> None:
        while True:
            try:
                await self._sync_versions()
            except Exception:
                logger.exception("registry poll failed; keeping the active versions")
            await asyncio.sleep(RELOAD_POLL_S)

    async def _sync_versions(self) -> None:
        scenes = await asyncio.to_thread(self.registry.scenes)
        for scene in scenes:
            want = self.pins.get(scene)
            if want is None:
                cur = await asyncio.to_thread(self.registry.current, scene)
                want = cur.version if cur else None
            if want is None or want == self.active.get(scene) or want in self.refused.get(scene, set()):
                continue
            await self.swap(scene, want)

    async def _follow_catalog(self) -> None:
        while True:
            await asyncio.sleep(CATALOG_POLL_S)
            for scene, version in list(self.active.items()):
                try:
                    adapter = await self.get_model(f"{scene}@{version}")
                    await asyncio.to_thread(self._catch_up, adapter)
                    self.metrics.index_size.labels(scene).set(adapter.index.size)
                except Exception as exc:  # Redis down: the index stays as it is until it is back
                    logger.debug("catalog catch-up of %s@%s failed: %s", scene, version, exc)

    def _catch_up(self, adapter) -> None:
        """Bring one adapter's index up to the online store's catalog.

        Never synced (just loaded, or the log was trimmed past its position): read the position
        first, then the live set, and diff (an item known only from training -- never published --
        stays). Otherwise apply the change log after its position."""
        with self._catalog_lock:
            store = self.store
            if adapter.catalog_pos is not None:
                got = store.catalog_changes(adapter.catalog_pos)
                if got is not None:
                    pos, changes = got
                    latest = dict(changes)  # last change of an item wins
                    self._apply_catalog(adapter, {i for i, d in latest.items() if not d},
                                        {i for i, d in latest.items() if d})
                    adapter.catalog_pos = pos
                    return
                logger.warning("%s fell behind the catalog log: re-reading the live set", adapter.model_id)
            pos = store.catalog_position()
            live = {m.decode() for m in store.r.smembers(store.live_items_key)}
            known = set(adapter.index.row)
            self._apply_catalog(adapter, live - known, self._deleted(known - live))
            adapter.catalog_pos = pos

    def _deleted(self, candidates: set[str]) -> set[str]:
        """Those of `candidates` that the store marks deleted (not merely never published)."""
        ordered = sorted(candidates)
        pipe = self.store.r.pipeline(transaction=False)
        for item_id in ordered:
            pipe.hget(self.store.item_key(item_id), "deleted")
        return {i for i, flag in zip(ordered, pipe.execute()) if flag is not None and flag.decode() == "1"}

    def _apply_catalog(self, adapter, added: set[str], gone: set[str]) -> None:
        """Embed `added` items from their text (already indexed ones are left as they are);
        drop `gone` ones from the index."""
        for item_id in sorted(added):
            if item_id in adapter.index.row:
                continue
            item = self.store.item(item_id)
            if item is None or item["deleted"]:
                continue
            adapter.upsert_item(item_id, _item_text(item), item["title"])
        for item_id in gone:
            adapter.remove_item(item_id)

    async def _follow_popularity(self) -> None:
        key = popular_key(self.settings.redis_prefix)
        while True:
            try:
                raw = await self.aredis.zrevrange(key, 0, MAX_K * 4, withscores=True)
                if raw:
                    self.popular = [(m.decode(), float(s)) for m, s in raw]
            except Exception:
                pass  # Redis down: keep the last snapshot
            await asyncio.sleep(POPULAR_REFRESH_S)

    @property
    def _replicas_key(self) -> str:
        return f"{self.settings.redis_prefix}serve:replicas"

    def _replica_state(self) -> dict:
        return {"scenes": dict(self.active), "pins": dict(self.pins), "ts": time.time()}

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.aredis.hset(self._replicas_key, self.replica, json.dumps(self._replica_state()))
            except Exception:
                pass  # Redis down: /v1/models shows only the replica that answers
            await asyncio.sleep(HEARTBEAT_S)

    # routes -------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "scenes": dict(self.active), "replica": self.replica}

    @api.get("/metrics")
    async def metrics_route(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """The active version of each scene (on the replica that answers) and on every live replica."""
        self._auth(request)
        replicas = {self.replica: self._replica_state()}
        now = time.time()
        try:
            raw = await self.aredis.hgetall(self._replicas_key)
            for rid, state in raw.items():
                state = json.loads(state)
                if now - state["ts"] <= REPLICA_STALE_S:
                    replicas.setdefault(rid.decode(), state)
                else:
                    await self.aredis.hdel(self._replicas_key, rid)
        except Exception:
            pass  # Redis down: this replica's view only
        return {"scenes": {s: {"version": v, "pinned": s in self.pins} for s, v in self.active.items()},
                "refused": {s: sorted(v) for s, v in self.refused.items() if v},
                "replica": self.replica,
                "replicas": {rid: {"scenes": st["scenes"], "pins": st.get("pins", {}), "age_s": round(now - st["ts"], 3)}
                             for rid, st in sorted(replicas.items())}}

    @api.get("/v1/recommendations", response_model=RecommendResponse)
    async def recommend_get(self, request: Request, user_id: str = Query(..., min_length=1, max_length=MAX_ID_CHARS),
                            k: int = Query(DEFAULT_K, ge=1, le=MAX_K),
                            scene: str = Query("default", pattern=SCENE_PATTERN),
                            exclude_seen: bool = True) -> Any:
        self._auth(request)
        body = RecommendRequest(user_id=user_id, k=k, scene=scene, exclude_seen=exclude_seen)
        return await self._recommend(body, "GET /v1/recommendations")

    @api.post("/v1/recommendations", response_model=RecommendResponse)
    async def recommend_post(self, request: Request, body: RecommendRequest) -> Any:
        self._auth(request)
        return await self._recommend(body, "POST /v1/recommendations")

    @api.get("/v1/items/{item_id}/similar", response_model=SimilarResponse)
    async def similar(self, request: Request, item_id: str, k: int = Query(DEFAULT_K, ge=1, le=MAX_K),
                      scene: str = Query("default", pattern=SCENE_PATTERN)) -> Any:
        self._auth(request)
        t0 = time.perf_counter()
        adapter = await self._adapter(scene)
        found = adapter.similar(item_id, k)
        if found is None:
            raise HTTPException(404, detail=f"item_id {item_id!r} is not in the catalog of {adapter.model_id}")
        self._observe("GET /v1/items/{item_id}/similar", 200, t0)
        return {"item_id": item_id, "items": self._scored(adapter, *found), "scene": scene,
                "version": adapter.version}

    # internals ----------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        key = request.headers.get(API_KEY_HEADER)
        if key is None:
            raise HTTPException(401, detail=f"missing API key (header {API_KEY_HEADER})")
        if key not in self.api_keys:
            raise HTTPException(403, detail="API key not accepted")

    def _observe(self, route: str, status: int, t0: float) -> None:
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(route, str(status)).inc()

    @staticmethod
    def _scored(adapter, ids: list[str], scores: list[float]) -> list[dict]:
        return [{"item_id": a, "score": b, "title": adapter.titles.get(a)} for a, b in zip(ids, scores)]

    async def _recommend(self, body: RecommendRequest, route: str) -> Response:
        t0 = time.perf_counter()
        if body.user_id is None and body.recent_items is None and body.query is None:
            raise HTTPException(422, detail=[{"loc": ["body", "user_id"], "msg": "give user_id, recent_items or query"}])
        adapter = await self._adapter(body.scene)
        history: list[str] = list(body.recent_items or [])
        history_ts: list[int] = [0] * len(history)
        try:
            if body.user_id is not None and body.recent_items is None:
                raw = await self.aredis.zrange(self.store.recent_key(body.user_id), 0, -1, withscores=True)
                history = [m.decode() for m, _ in raw]
                history_ts = [int(s) for _, s in raw]
        except Exception as exc:
            logger.warning("Redis unavailable (%s): popularity fallback", type(exc).__name__)
            return self._fallback(route, t0, "popular", self._popular_answer(body, set(), "popular"))
        if not history and not body.query:
            return self._fallback(route, t0, "trending", await self._trending_answer(body))
        exclude = set(body.filters.exclude_items) if body.filters else set()
        if body.exclude_seen:
            exclude |= set(history)
        genres = body.filters.genres if body.filters else []
        fetch = body.k * (GENRE_FETCH_FACTOR if genres else 1)
        try:
            ids, scores = await self._score((adapter, history, history_ts, body.query, fetch, exclude))
        except Exception as exc:
            logger.error("model call failed (%s): popularity fallback", exc)
            return self._fallback(route, t0, "popular", self._popular_answer(body, exclude, "popular"))
        items = self._scored(adapter, ids, scores)
        if genres:
            items = await self._with_genres(items, genres)
        self._observe(route, 200, t0)
        return _json({"items": items[:body.k], "scene": body.scene, "version": adapter.version, "fallback": None})

    @serve.batch(max_batch_size=BATCH_MAX, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _score(self, requests: list[tuple]) -> list[tuple[list[str], list[float]]]:
        """One user-tower call per adapter for the whole batch: (adapter, history, ts, query, k, exclude)."""
        out: list[Any] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for j, r in enumerate(requests):
            groups.setdefault(id(r[0]), []).append(j)
        for members in groups.values():
            adapter = requests[members[0]][0]
            rs = [requests[j] for j in members]
            k = max(r[4] for r in rs)
            # In the event loop, not a thread: a batch costs ~1-2 ms, and on a small machine the
            # thread hand-off and GIL ping-pong cost more throughput than they gave back (bench/serve.py).
            ids, scores = adapter.recommend([r[1] for r in rs], [r[2] for r in rs], [r[3] for r in rs], k,
                                            [r[5] for r in rs])
            for j, r, i, s in zip(members, rs, ids, scores):
                out[j] = (i[:r[4]], s[:r[4]])
        return out

    def _fallback(self, route: str, t0: float, kind: str, answer: dict) -> Response:
        self.metrics.fallbacks.labels(kind).inc()
        self._observe(route, 200, t0)
        return _json(answer)

    async def _with_genres(self, items: list[dict], genres: list[str]) -> list[dict]:
        """Keep items whose text mentions one of `genres` (Redis down: the filter is not applied)."""
        try:
            pipe = self.aredis.pipeline(transaction=False)
            for it in items:
                pipe.hmget(self.store.item_key(it["item_id"]), "title", "text", "attributes")
            rows = await pipe.execute()
        except Exception:
            return items
        wanted = [g.lower() for g in genres]
        kept = []
        for it, row in zip(items, rows):
            text = " ".join(v.decode() for v in row if v is not None).lower()
            if any(g in text for g in wanted):
                kept.append(it)
        return kept

    def _popular_answer(self, body: RecommendRequest, exclude: set[str], kind: str) -> dict:
        items = [ScoredItem(item_id=i, score=s).model_dump() for i, s in self.popular if i not in exclude][:body.k]
        return {"items": items, "scene": body.scene, "version": None, "fallback": kind}

    async def _trending_answer(self, body: RecommendRequest) -> dict:
        key = trending_key(self.settings.redis_prefix)
        try:
            raw = await self.aredis.zrevrange(key, 0, body.k - 1, withscores=True)
            items = [ScoredItem(item_id=m.decode(), score=float(s)).model_dump() for m, s in raw]
        except Exception:
            return self._popular_answer(body, set(), "popular")
        if not items:
            return self._popular_answer(body, set(), "trending")
        return {"items": items, "scene": body.scene, "version": None, "fallback": "trending"}


def build_app(env: dict[str, str] | None = None, pins: dict[str, str] | None = None, replicas: int = 1):
    """The application: `serve.run(build_app(settings_env(settings)))`.

    `env`: the STREAMREC_* variables the replicas load their settings from (Ray workers do not
    see a variable set in the driver after `ray.init`); `pins`: scene -> version (user_config)."""
    # OMP_NUM_THREADS: FAISS' OpenMP pool in the request threads would otherwise size itself to the
    # machine and spin between calls (omp_set_num_threads in __init__ covers only that thread)
    opts = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(TORCH_THREADS), **REPLICA_ENV, **dict(env or {})}}}
    return Api.options(num_replicas=replicas, user_config={"pins": dict(pins or {})},
                       ray_actor_options={"num_cpus": 0.5, **opts}).bind()


def app_builder(args: dict[str, str]):
    """`serve run services.serve_app:app_builder`, or a RayService's import path: the replicas read
    their settings from their own environment (the pod's, or that of `serve run`), so none are
    copied into the runtime env -- where API keys would show in the dashboard, and a head-local
    RAY_ADDRESS would be wrong on a worker. Validated here first, so bad settings fail the deploy."""
    _settings()
    return build_app(None)


__all__ = ["Api", "api", "app_builder", "build_app"]

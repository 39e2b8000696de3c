"""The recommendation API: a Ray Serve application with a FastAPI ingress.

    streamrec serve            # or: serve run services.serve_app:app_builder (settings from the environment)

Two deployments:

* `AdapterHost` -- holds adapters, one per (scene, version), multiplexed with
  `@serve.multiplexed` (model id "scene@version": a new version is a new id, so the old one keeps
  answering the requests already routed to it). Loads in `get_model` (checksums, precomputed item
  embeddings, FAISS index; no catalog re-encoding), batches user-tower calls with `@serve.batch`,
  and follows the catalog in Redis: new items are embedded from their text, deleted ones leave
  the index (`CATALOG_POLL_S`).
* `Api` -- the FastAPI ingress: validates requests, reads the user's recent items from Redis,
  asks `AdapterHost` for the active version of the scene, falls back to popularity when Redis or
  the model cannot answer (never a 5xx for that), API keys, Prometheus metrics. It follows the
  registry (`RELOAD_POLL_S`): a new version is warmed on `AdapterHost` first and only then becomes
  the scene's active id; a version that fails to load is refused, logged and counted, and the old
  one keeps serving. `reconfigure(user_config)` takes `{"pins": {"scene": "v000003"}}` to pin or
  roll back a scene without restarting replicas.
"""

import asyncio
import logging
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

logger = logging.getLogger(__name__)

RELOAD_POLL_S = 1.0  # how often the ingress looks at the registry's CURRENT pointers
CATALOG_POLL_S = 1.0  # how often an AdapterHost replica diffs its index against Redis' live items
POPULAR_REFRESH_S = 5.0  # how often the ingress refreshes its popularity snapshot (the Redis-down fallback)
REDIS_TIMEOUT_S = 0.25  # a slower Redis counts as down for this request
BATCH_MAX = 32
BATCH_WAIT_S = 0.005
MAX_MODELS_PER_REPLICA = 8  # scenes x (live + previous version)
API_KEY_HEADER = "x-api-key"
TORCH_THREADS = 1

api = FastAPI(title="streamrec", version="1", description="Real-time recommendations (Ray Serve + FAISS).")


def _settings():
    from streaming.settings import load_settings

    return load_settings()


def _redis(settings):
    import redis

    if not settings.redis_url:
        raise RuntimeError("STREAMREC_REDIS_URL is not set: serving needs the online store")
    return redis.Redis.from_url(settings.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                socket_connect_timeout=REDIS_TIMEOUT_S)


# --- the adapter host ---------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, health_check_period_s=5)
class AdapterHost:
    def __init__(self) -> None:
        from streaming.online_store import OnlineStore
        from training.registry import Registry

        import faiss
        import torch

        # One thread per replica: requests are parallel across replicas and batches, and
        # intra-op threads on a small machine only fight each other (scale with num_replicas).
        torch.set_num_threads(TORCH_THREADS)
        faiss.omp_set_num_threads(TORCH_THREADS)
        self.settings = _settings()
        self.registry = Registry(self.settings.registry_uri)
        self.store = OnlineStore(_redis(self.settings), self.settings.redis_prefix, self.settings.recent_items_max)
        self.loaded: dict[str, Any] = {}  # model id -> LoadedAdapter (mirrors the multiplex cache)
        self._live: set[str] | None = None
        self._catalog_task = asyncio.get_event_loop().create_task(self._follow_catalog())

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str):
        from services.loaded_adapter import LoadedAdapter

        scene, _, version = model_id.partition("@")
        adapter = await asyncio.to_thread(LoadedAdapter.load, self.registry, scene, version,
                                          base_model=self.settings.base_model)
        try:
            await asyncio.to_thread(self._sync_catalog, adapter)
        except Exception as exc:  # Redis down: serve the trained catalog, the follower catches up
            logger.warning("catalog sync of %s failed (%s); serving its trained catalog", model_id, exc)
        self.loaded = {k: v for k, v in self.loaded.items() if k != model_id}
        self.loaded[model_id] = adapter
        if len(self.loaded) > MAX_MODELS_PER_REPLICA:
            self.loaded.pop(next(iter(self.loaded)))
        logger.info("loaded %s in %.2f s (%d items)", model_id, adapter.loaded_s, adapter.index.size)
        return adapter

    async def warmup(self) -> dict:
        """Load the request's model id (raises what the load raised); the ingress calls this first."""
        adapter = await self.get_model(serve.get_multiplexed_model_id())
        return {"model_id": adapter.model_id, "items": adapter.index.size, "load_s": adapter.loaded_s}

    async def recommend(self, history: list[str], history_ts: list[int], query: str | None, k: int,
                        exclude: list[str]) -> dict:
        return await self._recommend_batched((history, history_ts, query, k, set(exclude)))

    @serve.batch(max_batch_size=BATCH_MAX, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _recommend_batched(self, requests: list[tuple]) -> list[dict]:
        adapter = await self.get_model(serve.get_multiplexed_model_id())
        k = max(r[3] for r in requests)
        ids, scores = await asyncio.to_thread(
            adapter.recommend, [r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests], k,
            [r[4] for r in requests])
        out = []
        for r, i, s in zip(requests, ids, scores):
            kk = r[3]
            out.append({"items": [{"item_id": a, "score": b, "title": adapter.titles.get(a)}
                                  for a, b in zip(i[:kk], s[:kk])], "version": adapter.version})
        return out

    async def similar(self, item_id: str, k: int) -> dict | None:
        adapter = await self.get_model(serve.get_multiplexed_model_id())
        found = adapter.similar(item_id, k)
        if found is None:
            return None
        return {"items": [{"item_id": a, "score": b, "title": adapter.titles.get(a)} for a, b in zip(*found)],
                "version": adapter.version}

    # catalog --------------------------------------------------------------------------------
    async def _follow_catalog(self) -> None:
        """Every CATALOG_POLL_S: diff Redis' live-item set against the last one and apply the
        change to every loaded adapter. Redis down: the indexes stay as they are."""
        while True:
            await asyncio.sleep(CATALOG_POLL_S)
            try:
                live = await asyncio.to_thread(self._live_items)
            except Exception:
                continue  # Redis down: try again next tick
            prev, self._live = self._live, live
            if prev is None:
                continue
            added, gone = live - prev, prev - live
            if not (added or gone):
                continue
            for adapter in list(self.loaded.values()):
                try:
                    await asyncio.to_thread(self._apply_catalog, adapter, added, gone)
                except Exception:
                    logger.exception("catalog update of %s failed; retried on the next change", adapter.model_id)

    def _live_items(self) -> set[str]:
        return {m.decode() for m in self.store.r.smembers(self.store.live_items_key)}

    def _sync_catalog(self, adapter) -> None:
        """A freshly loaded adapter: index = its catalog + Redis' live items - deleted items."""
        live = self._live_items()
        known = set(adapter.index.row)
        gone = known - live
        self._apply_catalog(adapter, live - known, gone)

    def _apply_catalog(self, adapter, added: set[str], gone: set[str]) -> None:
        """Embed `added` items from their text; drop those of `gone` that Redis marks deleted
        (an item Redis never heard of -- known only from training -- stays)."""
        for item_id in sorted(added):
            if item_id in adapter.index.row:
                continue
            item = self.store.item(item_id)
            if item is None or item["deleted"]:
                continue
            adapter.upsert_item(item_id, _item_text(item), item["title"])
        if gone:
            ordered = sorted(gone)
            pipe = self.store.r.pipeline(transaction=False)
            for item_id in ordered:
                pipe.hget(self.store.item_key(item_id), "deleted")
            for item_id, flag in zip(ordered, pipe.execute()):
                if flag is not None and flag.decode() == "1":
                    adapter.remove_item(item_id)

    def check_health(self) -> None:
        if self._catalog_task.done():
            raise RuntimeError(f"catalog follower stopped: {self._catalog_task.exception()!r}")


def _item_text(item: dict) -> str:
    """The same text recipe as training (training.corpus.item_text) for an item from Redis."""
    from training.corpus import item_text

    return item_text(item["title"], item.get("text"), item.get("attributes") or {}, item["item_id"])


# --- the ingress ----------------------------------------------------------------------------------


class _Metrics:
    def __init__(self) -> None:
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
        self.index_size = Gauge("streamrec_index_items", "items in the warmed index", ["scene"], registry=r)


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


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Api:
    def __init__(self, host) -> None:
        from streaming.online_store import OnlineStore
        from training.registry import Registry

        self.host = host
        self.settings = _settings()
        self.registry = Registry(self.settings.registry_uri)
        self.store = OnlineStore(_redis(self.settings), self.settings.redis_prefix, self.settings.recent_items_max)
        self.metrics = _Metrics()
        self.active: dict[str, str] = {}  # scene -> version serving now
        self.refused: dict[str, set[str]] = {}  # scene -> versions that failed to load
        self.pins: dict[str, str] = {}
        self.popular: list[tuple[str, float]] = []
        self.api_keys = set(getattr(self.settings, "api_keys", ()) or ())
        self._followers = [asyncio.get_event_loop().create_task(self._follow_registry()),
                           asyncio.get_event_loop().create_task(self._follow_popularity())]

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

    # followers ------------------------------------------------------------------------------
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

    async def swap(self, scene: str, version: str) -> bool:
        """Warm `version` on the host, then make it the scene's active version (atomic: one dict write)."""
        model_id = f"{scene}@{version}"
        try:
            info = await self.host.warmup.options(multiplexed_model_id=model_id).remote()
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
        self.metrics.index_size.labels(scene).set(info["items"])
        logger.info("scene %s: now serving %s (was %s; load %.2f s)", scene, version, old, info["load_s"])
        return True

    async def _follow_popularity(self) -> None:
        key = f"{self.settings.redis_prefix}feat:popular"
        while True:
            try:
                raw = await asyncio.to_thread(self.store.r.zrevrange, key, 0, MAX_K * 4, withscores=True)
                if raw:
                    self.popular = [(m.decode(), float(s)) for m, s in raw]
            except Exception:
                pass  # Redis down: keep the last snapshot
            await asyncio.sleep(POPULAR_REFRESH_S)

    # routes ---------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "scenes": dict(self.active)}

    @api.get("/metrics")
    def metrics_route(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    def models(self, request: Request) -> dict:
        self._auth(request)
        return {"scenes": {s: {"version": v, "pinned": s in self.pins} for s, v in self.active.items()},
                "refused": {s: sorted(v) for s, v in self.refused.items() if v}}

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
        version = self._version(scene)
        got = await self.host.similar.options(multiplexed_model_id=f"{scene}@{version}").remote(item_id, k)
        if got is None:
            raise HTTPException(404, detail=f"item_id {item_id!r} is not in the catalog of {scene}/{version}")
        self._observe("GET /v1/items/{item_id}/similar", 200, t0)
        return {"item_id": item_id, "items": got["items"], "scene": scene, "version": got["version"]}

    # internals ------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        key = request.headers.get(API_KEY_HEADER)
        if key is None:
            raise HTTPException(401, detail=f"missing API key (header {API_KEY_HEADER})")
        if key not in self.api_keys:
            raise HTTPException(403, detail="API key not accepted")

    def _version(self, scene: str) -> str:
        version = self.active.get(scene)
        if version is None:
            raise HTTPException(404, detail=f"scene {scene!r} has no adapter (known: {sorted(self.active)})")
        return version

    def _observe(self, route: str, status: int, t0: float) -> None:
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(route, str(status)).inc()

    async def _recommend(self, body: RecommendRequest, route: str) -> dict:
        t0 = time.perf_counter()
        if body.user_id is None and body.recent_items is None and body.query is None:
            raise HTTPException(422, detail=[{"loc": ["body", "user_id"], "msg": "give user_id, recent_items or query"}])
        version = self._version(body.scene)
        history: list[str] = list(body.recent_items or [])
        history_ts: list[int] = [0] * len(history)
        try:
            if body.user_id is not None and body.recent_items is None:
                raw = await asyncio.to_thread(self.store.r.zrange, self.store.recent_key(body.user_id), 0, -1,
                                              withscores=True)
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
        want = body.k
        try:
            got = await self.host.recommend.options(multiplexed_model_id=f"{body.scene}@{version}").remote(
                history, history_ts, body.query, want * (4 if body.filters and body.filters.genres else 1),
                sorted(exclude))
        except Exception as exc:
            logger.error("model call failed (%s): popularity fallback", exc)
            return self._fallback(route, t0, "popular", self._popular_answer(body, exclude, "popular"))
        items = got["items"]
        if body.filters and body.filters.genres:
            items = [it for it in items if self._matches(it["item_id"], body.filters.genres)]
        self._observe(route, 200, t0)
        return {"items": items[:want], "scene": body.scene, "version": got["version"], "fallback": None}

    def _fallback(self, route: str, t0: float, kind: str, answer: dict) -> dict:
        self.metrics.fallbacks.labels(kind).inc()
        self._observe(route, 200, t0)
        return answer

    def _matches(self, item_id: str, genres: list[str]) -> bool:
        try:
            item = self.store.item(item_id)
        except Exception:
            return True
        text = " ".join([item.get("title") or "", item.get("text") or "",
                         str(item.get("attributes") or "")]).lower() if item else ""
        return any(g.lower() in text for g in genres)

    def _popular_answer(self, body: RecommendRequest, exclude: set[str], kind: str) -> dict:
        items = [ScoredItem(item_id=i, score=s).model_dump() for i, s in self.popular if i not in exclude][:body.k]
        return {"items": items, "scene": body.scene, "version": None, "fallback": kind}

    async def _trending_answer(self, body: RecommendRequest) -> dict:
        key = f"{self.settings.redis_prefix}feat:trending"
        try:
            raw = await asyncio.to_thread(self.store.r.zrevrange, key, 0, body.k - 1, withscores=True)
            items = [ScoredItem(item_id=m.decode(), score=float(s)).model_dump() for m, s in raw]
        except Exception:
            return self._popular_answer(body, set(), "popular")
        if not items:
            return self._popular_answer(body, set(), "trending")
        return {"items": items, "scene": body.scene, "version": None, "fallback": "trending"}


def build_app(env: dict[str, str] | None = None, pins: dict[str, str] | None = None, host_replicas: int = 1):
    """The application: `serve.run(build_app(settings_env(settings)))`.

    `env`: the STREAMREC_* variables the replicas load their settings from (Ray workers do not
    see a variable set in the driver after `ray.init`); `pins`: scene -> version (user_config)."""
    opts = {"runtime_env": {"env_vars": dict(env)}} if env else {}
    host = AdapterHost.options(num_replicas=host_replicas,
                               ray_actor_options={"num_cpus": 0.5, **opts}).bind()
    return Api.options(user_config={"pins": dict(pins or {})}, ray_actor_options={"num_cpus": 0.25, **opts}).bind(host)


def app_builder(args: dict[str, str]):
    """`serve run services.serve_app:app_builder` (settings from the environment of `serve run`)."""
    from streaming.settings import settings_env

    return build_app(settings_env(_settings()))

__all__ = ["AdapterHost", "Api", "api", "app_builder", "build_app"]

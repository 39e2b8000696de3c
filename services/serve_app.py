"""The recommendation API: a Ray Serve application, one deployment that runs a FastAPI app.

`Api.__call__` runs the FastAPI app `api` in the replica's process (`services/asgi_call.py`), not
behind `@serve.ingress` (~10% of the no-op ceiling, bench/serve.py `noop_fastapi` vs `noop_asgi`;
what halves it is Starlette's handling inside a replica, see asgi_call.py); routes, validation,
errors and `/docs` are the app's.

`Api` is the whole request path in one replica: validate -> the user's recent items from Redis
(async client) -> user embeddings (`@serve.batch` under load) -> the two stages, per request through
`training.two_stage.rank_request` as in evaluation (retrieval, LightGBM ranker, query blend with the
request's `query_weight`, new-item calibration; services/loaded_adapter.py) -> top-k. Adapters are held per replica in `services/adapter_cache.py`, keyed "scene@version" (a new
version is a new id: requests already holding the old one finish on it; one no follower wants any more
is dropped by the sweep, `ADAPTER_SWEEP_S`), loaded from their
precomputed item embeddings (checksums verified, no catalog re-encoding).

Why one deployment and not an ingress in front of a model deployment: the hop between two
deployments cost more CPU than the model itself (~8 ms of proxy/handle work against ~1 ms of
user tower + FAISS per request on 2 cores, bench/serve.py), and with a handful of scenes every
replica can hold all of them. Scaling is `num_replicas` of this one deployment.

In front of the routes: `services/request_limits.py` (413/414/431 for a request too large; CORS when
configured) and, in each /v1 route, `services/api_guard.py` (API keys compared in constant time; a
per-key rate limit in Redis, 429 + Retry-After, failing open when Redis is down; its check rides on
the request's one Redis round trip).

Every answer is a model of `services/api_schema.py`, built once and serialized once by pydantic
(the routes' `response_model` documents it at /docs; FastAPI does not validate it a second time,
because a route returns the serialized `Response`). Every error is its `ErrorBody`.

Each replica runs five followers: the registry (`services/registry_follower.py`: which version
each scene serves), the experiments (`services/experiment_follower.py`: which variant answers whom),
the catalog (`services/catalog_follower.py`: new and deleted items into the active indexes), the
popularity snapshot (`POPULAR_REFRESH_S`, served with `fallback: "popular"` when Redis is down),
a heartbeat (`services/replica_heartbeat.py`: this replica's view for `GET /v1/models`), and a sweep
drops the adapters none of them wants (`ADAPTER_SWEEP_S`). Every
recommendation answer carries a `request_id` and its `variant`, and is written as an impression
(`services/impressions.py`: asynchronous, bounded, dropped and counted rather than ever delaying
a request).
An error a follower or a request survives is logged (rate-limited) and counted
(`services/metrics.py`).

Probes. Liveness: `GET /healthz` answers 200 while every follower runs, 503 naming the one that
stopped; `check_health` raises then too, so Serve replaces the replica. Readiness: `GET /readyz`
answers 200 once every scene of the registry's live set is loaded or on fallback
(`services/registry_follower.py` defines the states), 503 with Retry-After before. Serve sends a
replica requests once its constructor and first `reconfigure` (which brings the pins) return, so
that first `reconfigure` starts the registry follower and waits (at most `WARMUP_WAIT_S`) for the
live set to load: a restarted or autoscaled replica takes no request it could not answer, and never
loads CURRENT where a pin says otherwise. A request for a scene that exists but is still loading
here gets 503 with `Retry-After: RETRY_AFTER_S`; a scene the registry does not have stays a 404.
"""

import asyncio
import logging
import secrets
import time
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import RayServeException

from ray.serve._private.http_util import make_fastapi_class_based_view  # what @serve.ingress runs on the class

from services.adapter_cache import AdapterCache
from services.api_answers import count_refusal, error_answer, install_error_handlers, json_answer
from services.asgi_call import run_asgi
from services.hot_routes import HotRoutes
from services.api_guard import KEYED_ROUTE, ApiGuard, add_security_scheme
from services.api_schema import (
    EDGE_ERRORS, KEYED_ERRORS, MAX_K, ErrorBody, HealthResponse,
    ModelsResponse, ReadinessResponse, RecommendQuery, RecommendRequest, RecommendResponse, ReplicaView, SceneVersion, ScoredItem,
    SimilarQuery, SimilarResponse, error_responses, http_error,
)
from services.metrics import SOURCE_FALLBACK, SOURCE_MODEL, ServeMetrics
from services.impression_record import Shown
from services.replica_heartbeat import STORE_ERRORS, ReplicaHeartbeat
from services.request_limits import ApiEdge
from services.require_keys import check_api_keys_required
from streaming.online_store import popular_key, trending_key
from training.experiments import CONTROL

logger = logging.getLogger(__name__)

POPULAR_REFRESH_S = 5.0  # how often a replica refreshes its popularity snapshot (the Redis-down fallback)
REDIS_TIMEOUT_S = 0.25  # a slower Redis counts as down for this request
BATCH_MAX = 32
BATCH_WAIT_S = 0.002  # the user tower costs ~0.7 ms alone and ~0.15 ms/request in a batch of 16
ADAPTER_SWEEP_S = 5.0  # how often a replica drops the adapters no follower wants (services/adapter_cache.py)
GENRE_FETCH_FACTOR = 4  # candidates fetched per requested item when a genre filter may drop some
# A new replica's first reconfigure waits this long at most for the live set to load (an adapter
# loads in ~15 s; a registry of a few scenes fits with room to spare); past it the replica starts
# anyway, says what is still loading on /readyz, and answers those scenes with 503 until they load.
WARMUP_WAIT_S = 300.0
WARMUP_CHECK_S = 0.1  # how often that wait looks whether the warm-up is done
RETRY_AFTER_S = 5  # the Retry-After (seconds) of a 503 for a scene still loading (/readyz too)
TORCH_THREADS = 1
REQUEST_ID_BYTES = 12  # a request id is 24 hex characters: unique across replicas without coordination
IMPRESSIONS_CLOSE_S = 2.0  # a replica stopping waits this long at most for its buffered impressions
# Serve runs user code on an event loop of its own thread by default; on the replica's main loop a
# request skips two cross-thread hand-offs (bench/serve.py). Our request path never blocks that
# loop for long: Redis is async, a batch of the user tower costs ~1-2 ms, follower work is in threads.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# Serve's access log writes one INFO line per request to the replica's log file: ~5% of a replica's
# busy time on the recommendation path (py-spy, bench/serve.py load). Requests are counted and timed
# in Prometheus (`streamrec_requests_total`, `streamrec_request_seconds`) and errors are logged, so
# the per-request line is off; `LOGGING_CONFIG` is Serve's LoggingConfig (turn it back on there).
LOGGING_CONFIG = {"enable_access_log": False}

# What a scoring batch raises when the model or FAISS fails (torch and FAISS raise RuntimeError,
# shape mismatches ValueError/IndexError): the request gets the popularity fallback, not a 5xx.
MODEL_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, IndexError, KeyError)
# what the /v1 routes with parameters answer besides 200 (and the probes: the edge's refusals)
ROUTES_ERRORS = (*KEYED_ERRORS, 404, 422, 503, *EDGE_ERRORS)
# A recommendation's items lead to their similar items: an OpenAPI link (clients, and the fuzzer's
# stateful runs, follow it from a 200 answer).
SIMILAR_LINK = {200: {"links": {"SimilarToFirst": {"operationId": "similar_items", "parameters": {
    "item_id": "$response.body#/items/0/item_id", "scene": "$response.body#/scene"}}}}}

# FastAPI's native OpenTelemetry hooks are off: the service exports its own Prometheus metrics, and
# the hooks cost CPU on every request even with no exporter configured.
api = FastAPI(title="streamrec", version="1", description="Real-time recommendations (Ray Serve + FAISS).",
              telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
add_security_scheme(api)  # the x-api-key header, in /docs and for clients (and the fuzzer)


def _settings():
    from streaming.settings import load_settings

    return load_settings()


def _redis_kwargs(settings) -> dict:
    if not settings.redis_url:
        raise RuntimeError("STREAMREC_REDIS_URL is not set: serving needs the online store")
    return {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}


# The size limits and CORS, in front of every route (settings read on the first request); the one
# error body for every 4xx the app or its router answers (services/api_answers.py).
api.add_middleware(ApiEdge, settings=_settings, refused=count_refusal)
install_error_handlers(api)


class ApiReplica:
    def __init__(self) -> None:
        import faiss
        import torch

        from services.catalog_follower import CatalogFollower
        from services.experiment_follower import ExperimentFollower
        from services.impressions import ImpressionWriter
        from services.registry_follower import RegistryFollower
        from streaming.online_store import OnlineStore
        from streaming.pseudonym import Pseudonymizer
        from streaming.redis_io import make_async_redis, make_redis  # credentials and TLS from the settings
        from training.registry import Registry

        # One thread per replica: requests are parallel across replicas and batches, and
        # intra-op threads on a small machine only fight each other (scale with num_replicas).
        torch.set_num_threads(TORCH_THREADS)
        faiss.omp_set_num_threads(TORCH_THREADS)
        self.settings = _settings()
        check_api_keys_required(self.settings)  # STREAMREC_REQUIRE_API_KEYS: never an open API on k8s
        # Redis holds pseudonyms only: a request's raw user id is hashed the way ingest hashed it.
        self.pseudonymize = Pseudonymizer.from_settings(self.settings)
        self.registry = Registry(self.settings.registry_uri)
        kw = _redis_kwargs(self.settings)
        # blocking client for follower work in threads; asyncio client on the request path
        self.store = OnlineStore(make_redis(self.settings, **kw), self.settings.redis_prefix,
                                 self.settings.recent_items_max)
        self.aredis = make_async_redis(self.settings, **kw)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve (unit use)
            self.replica = "local"
        self.metrics = ServeMetrics(self.replica)
        # which version each scene serves (`.active`), refused versions, pins
        self.versions = RegistryFollower(self.registry, self._load, self.metrics)
        self.catalog = CatalogFollower(self.store, self.metrics, get_model=self.get_model,
                                       active=lambda: [f"{s}@{v}" for s, v in self.versions.active.items()])
        self.adapters = AdapterCache(self._load_model)  # what get_model serves from
        self.popular: list[tuple[str, float]] = []
        self.guard = ApiGuard(self.settings, self.aredis, self.metrics, STORE_ERRORS)  # API keys, rate limit
        self.hot = HotRoutes(api, self, self.settings)  # the hot routes without the framework around them
        # which variant of a scene's experiment answers whom (candidates load in the background)
        self.experiments = ExperimentFollower(self.registry, self._load_candidate, self.metrics,
                                              lambda: list(self.versions.wanted))
        self.heartbeat = ReplicaHeartbeat(self.aredis, self.settings.redis_prefix, self.replica, self.metrics,
                                          self._replica_view)
        self.impressions = None  # STREAMREC_IMPRESSIONS_ENABLED=false, or no broker to write them to
        if self.settings.impressions_enabled and self.settings.kafka_bootstrap_servers:
            self.impressions = ImpressionWriter(self.settings, self.metrics)
        elif self.settings.impressions_enabled:
            logger.warning("replica %s writes no impressions: KAFKA_BOOTSTRAP_SERVERS is not set in its environment",
                           self.replica)
        # the registry follower starts in the first reconfigure, once the pins are known
        loop = asyncio.get_event_loop()
        self._followers = {name: loop.create_task(coro, name=f"follower-{name}") for name, coro in (
            ("catalog", self.catalog.run()), ("popularity", self._follow_popularity()),
            ("heartbeat", self.heartbeat.run()), ("experiments", self.experiments.run()),
            ("adapters", self._sweep_adapters()))}

    async def _warm_up(self) -> None:
        """Wait until the registry follower is ready, a follower stopped, or WARMUP_WAIT_S passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WARMUP_WAIT_S
        while not self.versions.ready and not self.stopped_followers() and loop.time() < deadline:
            await asyncio.sleep(WARMUP_CHECK_S)
        if not self.versions.ready:
            states = self.versions.scene_states()
            logger.warning("replica %s starts before its warm-up is done (%s); /readyz says 503 until it is",
                           self.replica, ", ".join(f"{s}={st.state}" for s, st in states.items())
                           or self.versions.read_error or "registry not read yet")

    async def __call__(self, request: Request) -> Response:
        """Every HTTP request: the hot routes' happy path straight to the route (services/hot_routes.py),
        everything else through the FastAPI app `api`, run here (module docstring)."""
        answer, body = await self.hot.answer(request)
        if answer is not None:
            return answer
        return await run_asgi(api, request, body)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls it with the user_config after the constructor and whenever it changes. The
        first call starts the registry follower with the pins in place and waits for the warm-up:
        Serve routes no request to the replica before it returns."""
        self.versions.set_pins((user_config or {}).get("pins") or {})
        if "registry" not in self._followers:
            self._followers["registry"] = asyncio.create_task(self.versions.run(), name="follower-registry")
            await self._warm_up()

    def stopped_followers(self) -> dict[str, str]:
        """Follower name -> how it ended, for each follower loop that is no longer running."""
        stopped = {}
        for name, task in self._followers.items():
            if task.done():
                stopped[name] = "cancelled" if task.cancelled() else repr(task.exception() or "returned")
        return stopped

    def check_health(self) -> None:
        """Serve's liveness check: raises when a follower stopped, so Serve replaces the replica."""
        if stopped := self.stopped_followers():
            raise RuntimeError(f"follower(s) stopped: {stopped}")
        if "registry" not in self._followers:
            raise RuntimeError("the registry follower never started: it starts in the first reconfigure, so Api "
                               "needs a user_config (build_app gives it one)")

    def stop_followers(self) -> None:
        """Cancel the follower tasks (a replica's process ends with them; this is for a replica
        built in-process, as tests do)."""
        for t in self._followers.values():
            t.cancel()
        if self.impressions is not None:
            self.impressions.close(IMPRESSIONS_CLOSE_S)

    # adapters -----------------------------------------------------------------------------------
    async def get_model(self, model_id: str):
        """The adapter "scene@version", loaded on first use (raises AdapterLoadError for a version that cannot serve)."""
        return await self.adapters.get(model_id)

    async def _load_model(self, model_id: str):
        from services.catalog_follower import CATCH_UP_ERRORS
        from services.loaded_adapter import LoadedAdapter

        scene, _, version = model_id.partition("@")
        adapter = await asyncio.to_thread(LoadedAdapter.load, self.registry, scene, version,
                                          base_model=self.settings.base_model)
        try:
            await asyncio.to_thread(self.catalog.catch_up, adapter)
        except CATCH_UP_ERRORS as exc:  # Redis down: serve the trained catalog, the follower catches up
            self.metrics.survived("catalog", exc, f"catalog sync of {model_id} failed; serving its trained catalog")
        logger.info("loaded %s in %.2f s (%d items)", model_id, adapter.loaded_s, adapter.index.size)
        return adapter

    async def _sweep_adapters(self) -> None:
        """Drop the adapters no follower wants any more (the version a swap replaced, an ended experiment's)."""
        while True:
            await asyncio.sleep(ADAPTER_SWEEP_S)
            v, exps = self.versions, self.experiments.experiments
            wanted = {f"{s}@{x}" for s, x in (*v.active.items(), *v.wanted.items())}
            wanted |= {f"{s}@{c}" for s, exp in exps.items() for c in exp.candidates}
            dropped = self.adapters.retain(wanted)
            self.metrics.adapters_loaded.set(len(self.adapters.loaded()))
            if dropped:
                self.experiments.ready -= {tuple(m.split("@", 1)) for m in dropped}  # loads again if wanted again
                logger.info("replica %s unloaded %s (no longer wanted)", self.replica, ", ".join(dropped))

    async def _load(self, scene: str, version: str):
        """The registry follower's loader: the follower makes the version active as soon as this returns."""
        adapter = await self.get_model(f"{scene}@{version}")
        ndcg = await asyncio.to_thread(self._validation_ndcg, scene, version)
        self.metrics.serving(scene, version, self.versions.active.get(scene), ndcg)
        return adapter

    async def _load_candidate(self, scene: str, version: str):
        """The experiment follower's loader: a candidate is loaded like any version, without the live gauges."""
        return await self.get_model(f"{scene}@{version}")

    def _validation_ndcg(self, scene: str, version: str) -> float | None:
        """The version's validation NDCG@10 from its manifest (None: none recorded, or unreadable now)."""
        from training.registry import RegistryError
        from training.train_metrics import LIVE_METRIC

        try:
            value = self.registry.get(scene, version).metrics.get(LIVE_METRIC)
        except (RegistryError, OSError) as exc:  # the version itself loaded: serve it, without the gauge
            self.metrics.survived("registry", exc, f"cannot read {scene}@{version}'s manifest for its NDCG@10")
            return None
        return float(value) if value is not None else None

    async def _adapter(self, scene: str):
        """The scene's active adapter; None when the scene is on fallback (no version can answer).
        A scene still loading here is a 503 with Retry-After; one the registry does not have a 404."""
        versions = self.versions
        version = versions.active.get(scene)
        if version is not None:
            return await self.get_model(f"{scene}@{version}")
        state = versions.scene_state(scene)
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if state is None and not versions.listed:
            raise HTTPException(503, detail=f"scene {scene!r}: this replica has not read the registry yet "
                                            f"(warm-up); retry in {RETRY_AFTER_S} s", headers=retry)
        if state is None:
            known = sorted(versions.scene_states())
            raise HTTPException(404, detail=f"scene {scene!r} has no adapter (known: {known})")
        if state.state == "loading":
            raise HTTPException(503, detail=f"scene {scene!r} is still loading on this replica (version "
                                            f"{state.version}; warm-up); retry in {RETRY_AFTER_S} s", headers=retry)
        return None

    # followers of Redis (the registry and catalog followers are their own classes) ---------------
    async def _follow_popularity(self) -> None:
        key = popular_key(self.settings.redis_prefix)
        while True:
            try:
                raw = await self.aredis.zrevrange(key, 0, MAX_K * 4, withscores=True)
                if raw:
                    self.popular = [(m.decode(), float(s)) for m, s in raw]
            except STORE_ERRORS as exc:
                self.metrics.survived("popularity", exc, "Redis unavailable: keeping the last popularity snapshot")
            await asyncio.sleep(POPULAR_REFRESH_S)

    def _replica_view(self) -> ReplicaView:
        versions = self.versions
        return ReplicaView(scenes=dict(versions.active), pins=dict(versions.pins),
                           experiments=self.experiments.views(), age_s=0.0)

    # routes -------------------------------------------------------------------------------------
    @api.get("/healthz", response_model=HealthResponse, responses={**error_responses(*EDGE_ERRORS), 503: {
        "model": ErrorBody, "description": "a follower loop of this replica stopped (Serve replaces the replica)"}})
    async def healthz(self) -> Response:
        """Liveness, always open: the replica's process answers and its follower loops run."""
        if stopped := self.stopped_followers():
            return error_answer(503, http_error(f"replica {self.replica}: follower(s) stopped: {stopped}"))
        return json_answer(HealthResponse(status="ok", scenes=dict(self.versions.active), replica=self.replica))

    @api.get("/readyz", response_model=ReadinessResponse, responses={**error_responses(*EDGE_ERRORS), 503: {
        "model": ReadinessResponse, "description": "not ready: a scene of the registry's live set is still loading "
                                                   "(or the registry was not read yet); retry after Retry-After"}})
    async def readyz(self) -> Response:
        """Readiness, always open: 200 once every scene of the registry's live set is loaded or on
        fallback (each scene's state says which, and why), 503 with Retry-After before."""
        versions = self.versions
        detail = None
        if not versions.listed:
            detail = "the registry has not been read yet" + (f": {versions.read_error}" if versions.read_error else "")
        answer = ReadinessResponse(ready=versions.ready, scenes=versions.scene_states(), replica=self.replica,
                                   detail=detail)
        if answer.ready:
            return json_answer(answer)
        return json_answer(answer, 503, {"Retry-After": str(RETRY_AFTER_S)})

    @api.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text format"}, **error_responses(*EDGE_ERRORS, media_type="application/json")})
    async def metrics_route(self) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models", response_model=ModelsResponse, responses=error_responses(*KEYED_ERRORS, *EDGE_ERRORS),
             openapi_extra=KEYED_ROUTE)
    async def models(self, request: Request) -> Response:
        """The active version of each scene (on the replica that answers) and on every live replica."""
        await self.guard.admit(self.guard.auth(request))
        versions = self.versions
        mine = self._replica_view()
        replicas = {**await self.heartbeat.others(time.time()), self.replica: mine}
        return json_answer(ModelsResponse(
            scenes={s: SceneVersion(version=v, pinned=s in versions.pins) for s, v in versions.active.items()},
            refused={s: sorted(v) for s, v in versions.refused.items() if v},
            replica=self.replica, replicas=dict(sorted(replicas.items())), experiments=mine.experiments))

    @api.get("/v1/recommendations", response_model=RecommendResponse, operation_id="recommend_get",
             responses={**error_responses(*ROUTES_ERRORS), **SIMILAR_LINK}, openapi_extra=KEYED_ROUTE)
    async def recommend_get(self, request: Request, q: Annotated[RecommendQuery, Query()]) -> Response:
        bucket = self.guard.auth(request)
        try:
            body = RecommendRequest(user_id=q.user_id, k=q.k, scene=q.scene, exclude_seen=q.exclude_seen)
        except ValidationError as exc:  # an id of blanks: the body model strips it, the query parameter did not
            raise RequestValidationError(exc.errors()) from None
        return await self._recommend(body, "GET /v1/recommendations", bucket)

    @api.post("/v1/recommendations", response_model=RecommendResponse, operation_id="recommend_post",
              responses={**error_responses(*ROUTES_ERRORS), **SIMILAR_LINK}, openapi_extra=KEYED_ROUTE)
    async def recommend_post(self, request: Request, body: RecommendRequest) -> Response:
        return await self._recommend(body, "POST /v1/recommendations", self.guard.auth(request))

    @api.get("/v1/items/{item_id}/similar", response_model=SimilarResponse, operation_id="similar_items",
             responses=error_responses(*ROUTES_ERRORS), openapi_extra=KEYED_ROUTE)
    async def similar(self, request: Request, item_id: str, q: Annotated[SimilarQuery, Query()]) -> Response:
        await self.guard.admit(self.guard.auth(request))
        t0 = time.perf_counter()
        k, scene = q.k, q.scene
        adapter = await self._adapter(scene)
        if adapter is None:  # on fallback: popular items are no answer to "similar to this item"
            state = self.versions.scene_state(scene)
            raise HTTPException(503, detail=f"scene {scene!r} has no version that can answer on this replica "
                                            f"({state.reason if state else 'none loaded'})")
        found = adapter.similar(item_id, k)
        if found is None:
            raise HTTPException(404, detail=f"item_id {item_id!r} is not in the catalog of {adapter.model_id}")
        self._observe("GET /v1/items/{item_id}/similar", 200, t0)
        return json_answer(SimilarResponse(item_id=item_id, items=self._scored(adapter, *found), scene=scene,
                                     version=adapter.version))

    # internals ----------------------------------------------------------------------------------
    def _observe(self, route: str, status: int, t0: float) -> None:
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(route, str(status)).inc()

    @staticmethod
    def _scored(adapter, ids: list[str], scores: list[float]) -> list[dict]:
        return [{"item_id": a, "score": b, "title": adapter.titles.get(a)} for a, b in zip(ids, scores)]

    async def _recommend(self, body: RecommendRequest, route: str, bucket: str | None) -> Response:
        t0 = time.perf_counter()
        if errors := body.input_errors():
            raise RequestValidationError(errors)
        # Every answer is an impression: its id goes back to the client, and the user's variant is sticky
        # by pseudonym (services/experiment_follower.py).
        shown = Shown(secrets.token_hex(REQUEST_ID_BYTES), None, body.scene, CONTROL, None)
        if body.user_id is not None:
            shown.user = self.pseudonymize(body.user_id)
        history: list[str] = list(body.recent_items or [])
        history_ts: list[int] = [0] * len(history)
        recent_key = None
        if shown.user is not None and body.recent_items is None:
            recent_key = self.store.recent_key(shown.user)
        store_down = None
        if bucket is not None or recent_key is not None:
            try:
                raw = await self.guard.first_round_trip(bucket, recent_key)
            except STORE_ERRORS as exc:
                store_down = exc
        adapter = await self._adapter(body.scene)  # (before the Redis-down fallback: an unknown scene is a 404)
        shown.variant, candidate, shown.experiment = self.experiments.choose(body.scene, shown.user)
        if candidate is not None and adapter is not None:
            adapter = await self.get_model(f"{body.scene}@{candidate}")  # loaded: the follower made it ready
        if store_down is not None:
            self.metrics.survived("recent_items", store_down, "Redis unavailable: popularity fallback")
            return self._fallback(route, t0, shown, self._popular_answer(body, set(), "popular"))
        if recent_key is not None:
            history = [m.decode() for m, _ in raw]
            history_ts = [int(s) for _, s in raw]
        if not history and not body.query:
            return self._fallback(route, t0, shown, await self._trending_answer(body))
        exclude = set(body.filters.exclude_items) if body.filters else set()
        if body.exclude_seen:
            exclude |= set(history)
        if adapter is None:  # the scene is on fallback (its state on /readyz says why)
            return self._fallback(route, t0, shown, self._popular_answer(body, exclude, "popular"))
        genres = body.filters.genres if body.filters else []
        fetch = body.k * (GENRE_FETCH_FACTOR if genres else 1)
        try:
            ids, scores = await self._score((adapter, history, history_ts, body.query, fetch, exclude,
                                             body.query_weight))
        except MODEL_ERRORS as exc:
            self.metrics.survived("model", exc, "model call failed: popularity fallback", level=logging.ERROR)
            return self._fallback(route, t0, shown, self._popular_answer(body, exclude, "popular"))
        items = self._scored(adapter, ids, scores)
        if genres:
            items = await self._with_genres(items, genres)
        self._observe(route, 200, t0)
        self.metrics.answered(body.scene, SOURCE_MODEL)
        return self._shown(shown, RecommendResponse(items=items[:body.k], scene=body.scene, version=adapter.version,
                                                    fallback=None, request_id=shown.request_id, variant=shown.variant))

    def _shown(self, shown: Shown, answer: RecommendResponse) -> Response:
        """Write the answer's impression (asynchronously, services/impressions.py), then serialize it."""
        if self.impressions is not None:
            self.impressions.write(shown.user, shown.record(answer))
        return json_answer(answer)

    @serve.batch(max_batch_size=BATCH_MAX, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _score(self, requests: list[tuple]) -> list[tuple[list[str], list[float]]]:
        """One user-tower call per adapter for the whole batch, then `rank_request` per request:
        (adapter, history, ts, query, k, exclude, query_weight)."""
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
                                            [r[5] for r in rs], [r[6] for r in rs])
            for j, r, i, s in zip(members, rs, ids, scores):
                out[j] = (i[:r[4]], s[:r[4]])
        return out

    def _fallback(self, route: str, t0: float, shown: Shown, answer: RecommendResponse) -> Response:
        self.metrics.fallbacks.labels(answer.fallback).inc()
        self.metrics.answered(answer.scene, SOURCE_FALLBACK)
        self._observe(route, 200, t0)
        answer.request_id, answer.variant = shown.request_id, shown.variant
        return self._shown(shown, answer)

    async def _with_genres(self, items: list[dict], genres: list[str]) -> list[dict]:
        """Keep items whose text mentions one of `genres` (Redis down: the filter is not applied)."""
        try:
            pipe = self.aredis.pipeline(transaction=False)
            for it in items:
                pipe.hmget(self.store.item_key(it["item_id"]), "title", "text", "attributes")
            rows = await pipe.execute()
        except STORE_ERRORS as exc:
            self.metrics.survived("genres", exc, "Redis unavailable: genre filter not applied")
            return items
        wanted = [g.lower() for g in genres]
        kept = []
        for it, row in zip(items, rows):
            text = " ".join(v.decode() for v in row if v is not None).lower()
            if any(g in text for g in wanted):
                kept.append(it)
        return kept

    def _popular_answer(self, body: RecommendRequest, exclude: set[str], kind: str) -> RecommendResponse:
        items = [ScoredItem(item_id=i, score=s) for i, s in self.popular if i not in exclude][:body.k]
        return RecommendResponse(items=items, scene=body.scene, version=None, fallback=kind, request_id="")

    async def _trending_answer(self, body: RecommendRequest) -> RecommendResponse:
        key = trending_key(self.settings.redis_prefix)
        try:
            raw = await self.aredis.zrevrange(key, 0, body.k - 1, withscores=True)
        except STORE_ERRORS as exc:
            self.metrics.survived("trending", exc, "Redis unavailable: popular items instead of trending")
            return self._popular_answer(body, set(), "popular")
        items = [ScoredItem(item_id=m.decode(), score=float(s)) for m, s in raw]
        if not items:
            return self._popular_answer(body, set(), "trending")
        return RecommendResponse(items=items, scene=body.scene, version=None, fallback="trending", request_id="")


# The routes take the replica (`self`) from Serve's replica context. health_check_period_s bounds how long
# a killed replica goes unreplaced (bench/chaos.py serve-replica-sigkill); a check is one cheap actor call.
# The class keeps its own module-level name: Ray pickles it by reference, not with `api` by value.
make_fastapi_class_based_view(api, ApiReplica)
Api = serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256,
                       health_check_period_s=1, name="Api")(ApiReplica)


def build_app(env: dict[str, str] | None = None, pins: dict[str, str] | None = None, replicas: int = 1,
              max_replicas_per_node: int | None = None):
    """The application: `serve.run(build_app(settings_env(settings)))`.

    `env`: the STREAMREC_* variables the replicas load their settings from (Ray workers do not
    see a variable set in the driver after `ray.init`); `pins`: scene -> version (user_config);
    `max_replicas_per_node`: spread the replicas over the nodes (None: Serve's placement)."""
    # OMP_NUM_THREADS: FAISS' OpenMP pool in the request threads would otherwise size itself to the
    # machine and spin between calls (omp_set_num_threads in __init__ covers only that thread)
    opts = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(TORCH_THREADS), **REPLICA_ENV, **dict(env or {})}}}
    placement = {"max_replicas_per_node": max_replicas_per_node} if max_replicas_per_node else {}
    return Api.options(num_replicas=replicas, user_config={"pins": dict(pins or {})},
                       ray_actor_options={"num_cpus": 0.5, **opts}, logging_config=LOGGING_CONFIG, **placement).bind()


def app_builder(args: dict[str, str]):
    """`serve run services.serve_app:app_builder`, or a RayService's import path: the replicas read
    their settings from their own environment (the pod's, or that of `serve run`), so none are
    copied into the runtime env -- where API keys would show in the dashboard, and a head-local
    RAY_ADDRESS would be wrong on a worker. Validated here first, so bad settings fail the deploy."""
    check_api_keys_required(_settings())  # an open API on k8s fails the deploy, not just the replicas
    return build_app(None)


__all__ = ["Api", "ApiReplica", "api", "app_builder", "build_app"]

"""The hot routes answered in the replica's `__call__` without running the FastAPI app around them.

Which: `GET /v1/recommendations`, `POST /v1/recommendations` and `GET /v1/items/{item_id}/similar`.
Why: run inside a replica, Starlette's request handling around a route costs about half of a plain
Serve deployment's request ceiling (bench/serve.py: `noop` against `noop_asgi`; services/asgi_call.py),
more than the recommendation itself at a 2,000-item catalog. Here a hot request costs a dict lookup,
the query parse and one pydantic validation before the route's own code.

The same answer either way, by construction:
  * the parameters are validated by the very models FastAPI validates them with
    (`RecommendQuery`, `SimilarQuery`, `RecommendRequest` in services/api_schema.py; FastAPI reads
    the query through `Annotated[Model, Query()]`), and the route methods that run are the app's;
  * anything off the happy path goes to the app untouched, BEFORE any side effect: a parameter the
    model refuses, a repeated parameter, a body that is not a JSON object with
    `Content-Type: application/json`, anything the edge (services/request_limits.py) would look at
    twice -- headers or query string over their limits, a GET with a body, a POST body over its limit
    or without a Content-Length -- and every request while CORS is configured (the middleware
    adds headers). The app then answers as it always did (422, 413, ...);
  * an `HTTPException` or `RequestValidationError` raised by the route (401/403/429/404/503, the
    422 of a request naming no user) is answered by the app's own handlers
    (services/api_answers.py), with the route in the scope, so the error body and the
    `streamrec_requests_total` labels are the app's.
tests/services/test_hot_routes.py sends the same requests both ways and compares status, headers and body.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qsl

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api_answers import http_error_handler, validation_error_handler
from services.api_schema import RecommendQuery, RecommendRequest, SimilarQuery
from services.request_limits import headers_bytes, query_bytes

if TYPE_CHECKING:
    from fastapi import FastAPI

RECOMMEND_PATH = "/v1/recommendations"
SIMILAR_PREFIX, SIMILAR_SUFFIX = "/v1/items/", "/similar"
SIMILAR_PATH = SIMILAR_PREFIX + "{item_id}" + SIMILAR_SUFFIX
JSON_MEDIA_TYPE = b"application/json"


class FallThrough(Exception):
    """Not for the hot path: the app answers (nothing was done yet)."""


def route_path(scope: dict) -> str:
    """The path the app routes on: the request path without the deployment's route prefix (Starlette's rule)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path


def query_params(scope: dict) -> dict[str, str]:
    """The query string as Starlette parses it; a repeated name falls through (the app decides)."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    params = dict(pairs)
    if len(params) != len(pairs):
        raise FallThrough("repeated parameter")
    return params


def _validated(model: type, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError:
        raise FallThrough("invalid") from None


class HotRoutes:
    """The hot path of one replica: `await hot.answer(request)` gives the route's Response, or None and the
    body it already read (None: it read none) when the app must answer."""

    def __init__(self, app: "FastAPI", replica: Any, settings: Any) -> None:
        self.replica = replica
        self.enabled = not settings.cors_origins  # CORS adds headers to answers: the app's middleware does it
        self.max_body, self.max_query, self.max_headers = (settings.max_body_bytes, settings.max_query_bytes,
                                                           settings.max_header_bytes)
        self.routes = {(m, r.path): r for r in _api_routes(app) for m in r.methods}
        for key in (("GET", RECOMMEND_PATH), ("POST", RECOMMEND_PATH), ("GET", SIMILAR_PATH)):
            if key not in self.routes:
                raise RuntimeError(f"the app has no route {key}: services/hot_routes.py and services/serve_app.py "
                                   "disagree")

    async def answer(self, request: Request) -> tuple[Response | None, bytes | None]:
        """(the answer, None), or (None, the body it read, if any) when the app must answer."""
        if not self.enabled:
            return None, None
        scope = request.scope
        method, path = scope["method"], route_path(scope)
        if method == "GET" and path == RECOMMEND_PATH:
            key = ("GET", RECOMMEND_PATH)
        elif method == "GET" and path.startswith(SIMILAR_PREFIX) and path.endswith(SIMILAR_SUFFIX):
            key = ("GET", SIMILAR_PATH)
        elif method == "POST" and path == RECOMMEND_PATH:
            key = ("POST", RECOMMEND_PATH)
        else:
            return None, None
        body: bytes | None = None
        try:
            content_length, content_type = self._edge(scope)
            if method == "GET":
                if content_length is not None:  # a GET with a body: the edge reads and bounds it
                    raise FallThrough("body")
                stop_watching_disconnect(request)
                params = query_params(scope)
                if key[1] == RECOMMEND_PATH:
                    q = _validated(RecommendQuery, params)
                    call = lambda: self.replica.recommend_get(request=request, q=q)  # noqa: E731
                else:
                    item_id = path[len(SIMILAR_PREFIX):-len(SIMILAR_SUFFIX)]
                    if not item_id or "/" in item_id:
                        raise FallThrough("path")
                    q = _validated(SimilarQuery, params)
                    call = lambda: self.replica.similar(request=request, item_id=item_id, q=q)  # noqa: E731
            else:
                if content_length is None or content_length > self.max_body or content_type != JSON_MEDIA_TYPE:
                    raise FallThrough("body")
                body = await request.body()
                if len(body) != content_length:
                    raise FallThrough("body length")
                try:
                    data = json.loads(body)
                except ValueError:
                    raise FallThrough("json") from None
                if not isinstance(data, dict):
                    raise FallThrough("json")
                parsed = _validated(RecommendRequest, data)
                call = lambda: self.replica.recommend_post(request=request, body=parsed)  # noqa: E731
        except FallThrough:
            return None, body
        return await self._run(request, self.routes[key], call), None

    def _edge(self, scope: dict) -> tuple[int | None, bytes | None]:
        """What the edge middleware checks, looked at once: anything it would act on falls through."""
        if headers_bytes(scope) > self.max_headers or query_bytes(scope) > self.max_query:
            raise FallThrough("limits")  # the edge answers 431 / 414
        length, ctype = None, None
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    raise FallThrough("content-length")
                length = int(value)
            elif name == b"transfer-encoding":
                raise FallThrough("chunked")
            elif name == b"content-type":
                ctype = value
        return length, ctype

    @staticmethod
    async def _run(request: Request, route: APIRoute, call: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await call()
        except RequestValidationError as exc:
            request.scope["route"] = route  # the handlers label the error with it
            return await validation_error_handler(request, exc)
        except HTTPException as exc:
            request.scope["route"] = route
            return await http_error_handler(request, exc)


def stop_watching_disconnect(request: Request) -> bool:
    """Keep Serve's receive proxy of a bodiless `request` from calling back to the HTTP proxy.

    Why: for every HTTP request a replica runs a task that keeps an actor call open back to the HTTP
    proxy (`ASGIReceiveProxy.fetch_until_disconnect`: the body, then a wait for the client's
    disconnect), unless the request has ended before the task first runs. For a request that spends a
    few ms in the replica, that is two to three extra actor calls, measured at ~0.8 ms of proxy CPU
    and ~0.8 ms of replica CPU per request on 2 cores (a plain deployment that awaits 50 ms: 275
    req/s with the watch, 367 without, the plain no-op 381 in the same run). A hot GET is short,
    reads no body and needs no disconnect signal. (A POST keeps the watch: its body may take several
    fetches.) Serve offers this opt-out only on its direct-ingress path (`x-request-disconnect-disabled`),
    so this reaches into `ray.serve._private.http_util.ASGIReceiveProxy`: when that changes, nothing
    breaks -- this returns False and the request keeps Serve's watch (tests/services/test_hot_routes.py
    checks the attribute is still there). It runs before the hot path's first await, so before the
    task's first fetch (the replica runs user code on its own loop, serve_app.REPLICA_ENV); Serve
    cancels the task when the request ends."""
    receive = request.receive
    if not callable(getattr(receive, "_receive_asgi_messages", None)):
        return False

    async def never(_metadata: Any) -> bytes:
        await asyncio.Event().wait()  # until Serve cancels the task at the end of the request
        raise AssertionError("unreachable")

    receive._receive_asgi_messages = never
    return True


def _api_routes(app: "FastAPI") -> list[APIRoute]:
    from ray.serve._private.http_util import _walk_fastapi_routes  # FastAPI >= 0.137 nests the class's routes

    return [r for r, _, prefix in _walk_fastapi_routes(app) if isinstance(r, APIRoute) and not prefix]


__all__ = ["FallThrough", "HotRoutes", "stop_watching_disconnect", "RECOMMEND_PATH", "SIMILAR_PATH", "query_params", "route_path"]

"""An ASGI app run inside a plain Ray Serve deployment's `__call__`, on the request Serve hands it.

Why: it takes the ASGI ingress out of the request path and leaves a plain `__call__` in front of
the app, the place where hot routes can be served without the framework. What it is worth by
itself, measured on 2 cores with no-op apps in a replica (/tmp experiments of 2026-12-04, three
interleaved rounds of 5 s at 16 in flight, medians): plain `__call__` returning a Response 617-667
req/s; a raw ASGI callable run here 633-647; a Starlette app run here 314-340; the same FastAPI
app run here 308-343; behind `@serve.ingress` 175. So the ingress costs ~10% beyond the app, and
Starlette's request handling inside a replica costs about half the ceiling although it takes
~10 us of CPU per call when timed inside the same replica: not found yet (issue 18, left open).
The app is the same FastAPI object either way -- its routes, validation, error handlers,
middleware and OpenAPI document (`/docs`, `/openapi.json`) are unchanged.

Limits: the answer is collected whole before it is returned (no streaming responses: the API has
none), and an app that raises before starting its answer raises here (Serve answers 500).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from services.request_limits import replay


async def run_asgi(app: Any, request: Request, body: bytes | None = None) -> Response:
    """Run `app` on `request` (its scope and body stream) in this process; its answer as a Response.
    `body`: what was already read of the request's body (services/hot_routes.py), given to the app first."""
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        receive = request.receive if body is None else replay(body, request.receive)
        await app(request.scope, receive, send)
    except Exception:
        if status is None:  # nothing was answered: Serve's own 500
            raise
        # the app answered (Starlette's ServerErrorMiddleware sends its 500, then re-raises): keep that
    response = Response(b"".join(chunks), status_code=status or 500)
    response.raw_headers = headers  # the app's own, content-length included
    return response


__all__ = ["run_asgi"]

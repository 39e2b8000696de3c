"""The API's edge: limits on what a request may be, and CORS -- an ASGI middleware in front of every route.

Refused before any route runs, each with the one error shape (`ErrorBody`, services/api_schema.py):
  * 431 when the headers (names + values) exceed STREAMREC_MAX_HEADER_BYTES;
  * 414 when the query string exceeds STREAMREC_MAX_QUERY_BYTES;
  * 413 when the body exceeds STREAMREC_MAX_BODY_BYTES: at once when Content-Length says so, and
    otherwise while it arrives (a chunked body, or one longer than its Content-Length claims) -- the
    body is read here, at most the limit plus one chunk, and handed on whole to the route, which
    reads it whole anyway (a JSON body of at most a few hundred KiB).
A GET without Content-Length or Transfer-Encoding has no body (HTTP/1.1) and is not read here; a POST
is read whatever its headers say (its route reads it anyway).

The HTTP server in front (Ray Serve's proxy, uvicorn) has limits of its own on the request line and
headers; these are the API's own, documented, and the same behind any proxy.

CORS: off unless STREAMREC_CORS_ORIGINS lists origins; then Starlette's CORSMiddleware wraps the
limits (so a refusal carries the CORS headers too and a browser can read it), allowing GET and POST
and the headers a client sends (x-api-key, content-type).

The settings are read on the first request (`settings` is a callable): the middleware is declared
with the module-level app, before a replica has loaded its settings.
"""

from __future__ import annotations

from typing import Callable

from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api_schema import http_error

CORS_METHODS = ("GET", "POST")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # read (and bounded) even without a length header
CORS_HEADERS = ("x-api-key", "content-type")
CORS_MAX_AGE_S = 600  # how long a browser may cache a preflight answer

# the reason (services/metrics.py REFUSAL_REASONS) each refusal is counted under
REFUSAL_REASON_OF = {413: "body_too_large", 414: "query_too_long", 431: "headers_too_large"}


def headers_bytes(scope: Scope) -> int:
    """What STREAMREC_MAX_HEADER_BYTES bounds: the request's header names and values, in bytes."""
    return sum(len(name) + len(value) for name, value in scope.get("headers") or ())


def query_bytes(scope: Scope) -> int:
    """What STREAMREC_MAX_QUERY_BYTES bounds: the query string, in bytes."""
    return len(scope.get("query_string") or b"")


class RequestLimits:
    """Pure ASGI middleware enforcing the three size limits (bytes) on HTTP requests."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_query_bytes: int, max_header_bytes: int,
                 refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_body, self.max_query, self.max_headers = max_body_bytes, max_query_bytes, max_header_bytes
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        size = headers_bytes(scope)
        if size > self.max_headers:
            await self._refuse(scope, receive, send, 431, f"request headers too large: {size} bytes "
                                                          f"(at most {self.max_headers}; STREAMREC_MAX_HEADER_BYTES)")
            return
        query = query_bytes(scope)
        if query > self.max_query:
            await self._refuse(scope, receive, send, 414, f"query string too long: {query} bytes "
                                                          f"(at most {self.max_query}; STREAMREC_MAX_QUERY_BYTES)")
            return
        length, chunked = None, False
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is None and not chunked and scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await self._refuse(scope, receive, send, 400, f"invalid Content-Length {length[:40]!r}")
                return
            if declared > self.max_body:
                await self._refuse(scope, receive, send, 413, self._body_message(f"{declared} bytes declared"))
                return
        body = await self._read_body(receive)
        if body is None:
            await self._refuse(scope, receive, send, 413, self._body_message("more than that sent"))
            return
        await self.app(scope, replay(body, receive), send)

    def _body_message(self, what: str) -> str:
        return f"request body too large: {what} (at most {self.max_body} bytes; STREAMREC_MAX_BODY_BYTES)"

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is not read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: hand on what came
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        if self.refused is not None and status in REFUSAL_REASON_OF:
            self.refused(REFUSAL_REASON_OF[status])
        # Connection: close -- the rest of an unread body must not be parsed as the next request
        response = JSONResponse(status_code=status, content=http_error(message).model_dump(mode="json"),
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then defers to the real one (for the disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class ApiEdge:
    """The middleware the app declares: CORS (when origins are configured) around `RequestLimits`,
    both built from `settings()` on the first request."""

    def __init__(self, app: ASGIApp, settings: Callable[[], object],
                 refused: Callable[[str], None] | None = None) -> None:
        self.app, self.settings, self.refused = app, settings, refused
        self.inner: ASGIApp | None = None

    def build(self) -> ASGIApp:
        s = self.settings()
        inner: ASGIApp = RequestLimits(self.app, max_body_bytes=s.max_body_bytes, max_query_bytes=s.max_query_bytes,
                                       max_header_bytes=s.max_header_bytes, refused=self.refused)
        if s.cors_origins:
            inner = CORSMiddleware(inner, allow_origins=list(s.cors_origins), allow_methods=list(CORS_METHODS),
                                   allow_headers=list(CORS_HEADERS), max_age=CORS_MAX_AGE_S)
        return inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.inner is None:
            self.inner = self.build()
        await self.inner(scope, receive, send)


__all__ = ["ApiEdge", "BODY_METHODS", "CORS_HEADERS", "CORS_MAX_AGE_S", "CORS_METHODS", "REFUSAL_REASON_OF",
           "RequestLimits", "headers_bytes", "query_bytes", "replay"]

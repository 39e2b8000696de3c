"""Who may call the API, and how often: the API key check and the per-key rate limit of a replica.

`ApiGuard.auth` answers 401 (no key) or 403 (a key not accepted; compared in constant time,
services/api_keys.py) when STREAMREC_API_KEYS is set, and gives the key's rate-limit bucket. The
limit (services/rate_limit.py: a token bucket per key in Redis, shared by every replica) applies
only with keys: an open API -- the local quick start, bench/serve.py -- has no caller identity
worth limiting (behind an Ingress or a NAT every client has the same address), and on Kubernetes
keys are required. Over the limit: 429 with `Retry-After` and the one error body.

A request that reads Redis anyway (a user's recent items) sends its rate-limit check on the same
pipeline (`first_round_trip`): one round trip, as before the limit. Redis down or failing: the limit
FAILS OPEN -- the request is served and `streamrec_request_errors_total{what="rate_limit"}` counts it.

`add_security_scheme` documents the key in the OpenAPI schema (the routes that need it name it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request

from services.api_keys import ApiKeys
from services.metrics import ServeMetrics
from services.rate_limit import RateLimiter, Verdict

API_KEY_HEADER = "x-api-key"
API_KEY_SCHEME = "ApiKey"  # the OpenAPI security scheme of the x-api-key header
KEYED_ROUTE = {"security": [{API_KEY_SCHEME: []}]}  # openapi_extra of a route that takes the key


class ApiGuard:
    def __init__(self, settings, aredis, metrics: ServeMetrics, store_errors: tuple[type[BaseException], ...]) -> None:
        self.keys = ApiKeys(settings.api_keys or ())
        self.limiter = RateLimiter.from_settings(settings)
        self.limited = bool(self.keys) and self.limiter.enabled
        self.aredis, self.metrics, self.store_errors = aredis, metrics, store_errors

    def auth(self, request: Request) -> str | None:
        """401/403 unless the request carries an accepted key; the key's rate-limit bucket, or None
        when no limit applies (an open API, or STREAMREC_RATE_LIMIT_RPS=0)."""
        if not self.keys:
            return None
        key = request.headers.get(API_KEY_HEADER)
        if key is None:
            raise HTTPException(401, detail=f"missing API key (header {API_KEY_HEADER})")
        bucket = self.keys.match(key)
        if bucket is None:
            raise HTTPException(403, detail="API key not accepted")
        return bucket if self.limited else None

    async def admit(self, bucket: str | None) -> None:
        """The rate limit of a request that needs nothing else from Redis first (one round trip)."""
        if bucket is None:
            return
        try:
            verdict = await self.limiter.check(self.aredis, bucket)
        except self.store_errors as exc:
            self._not_enforced(exc)
            return
        self._enforce(verdict)

    async def first_round_trip(self, bucket: str | None, recent_key: str | None) -> Any:
        """The rate-limit check (when `bucket`) and the ZRANGE of `recent_key` (when given, its reply
        is returned), pipelined; 429 when over the limit. Redis failing: the limit is not enforced
        (counted) and the error is raised when the recent items were asked for."""
        pipe = self.aredis.pipeline(transaction=False)
        if bucket is not None:
            self.limiter.check_on(pipe, bucket)
        if recent_key is not None:
            pipe.zrange(recent_key, 0, -1, withscores=True)
        verdict = None
        try:
            replies = await pipe.execute(raise_on_error=False)
            if bucket is not None:
                verdict = await self.limiter.verdict(self.aredis, bucket, replies[0])
            if recent_key is not None and isinstance(replies[-1], BaseException):
                raise replies[-1]
        except self.store_errors as exc:
            if verdict is None and bucket is not None:
                self._not_enforced(exc)
            if verdict is not None:
                self._enforce(verdict)
            if recent_key is not None:
                raise
            return None
        if verdict is not None:
            self._enforce(verdict)
        return replies[-1] if recent_key is not None else None

    def _not_enforced(self, exc: BaseException) -> None:
        self.metrics.survived("rate_limit", exc, "Redis unavailable: rate limit not enforced (fail open)")

    def _enforce(self, verdict: Verdict) -> None:
        if not verdict.allowed:
            self.metrics.refused("rate_limit")
            raise HTTPException(429, detail=f"rate limit of this API key exceeded ({self.limiter.rps:g} requests/s, "
                                            f"bursts of {self.limiter.burst}); retry in {verdict.retry_after_s} s",
                                headers={"Retry-After": str(verdict.retry_after_s)})


def add_security_scheme(app: FastAPI) -> None:
    """Make `app.openapi()` declare the x-api-key header as the security scheme KEYED_ROUTE names."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # (FastAPI caches it: the scheme is added once)
        schema.setdefault("components", {}).setdefault("securitySchemes", {API_KEY_SCHEME: {
            "type": "apiKey", "in": "header", "name": API_KEY_HEADER,
            "description": "one of STREAMREC_API_KEYS (not checked when that is empty)"}})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["API_KEY_HEADER", "API_KEY_SCHEME", "ApiGuard", "KEYED_ROUTE", "add_security_scheme"]

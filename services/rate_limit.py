"""The per-API-key rate limit of the API, shared by every replica through Redis.

A token bucket per key, kept in one Redis hash (`<prefix>rl:<bucket id>`, the id a hash of the key:
services/api_keys.py) and updated by one Lua script, so that every replica draws from the same
bucket and a check is atomic. The bucket holds `burst` tokens and refills at `rps` tokens/s (the
settings STREAMREC_RATE_LIMIT_RPS and STREAMREC_RATE_LIMIT_BURST); a request takes one token, and
with none left it is refused: 429 with `Retry-After` (whole seconds until a token is back, at least 1).

Why a token bucket in Lua rather than INCR + EXPIRE per second: a fixed window lets a client send
twice its limit across a window boundary and can only say "retry next second"; the bucket smooths
that, gives an exact Retry-After, and still costs one round trip. The script reads the clock with
Redis' TIME, so replicas with skewed clocks share one notion of time. The hash expires once a
bucket would be full again, so idle keys cost no memory.

Cost on the hot path: one EVALSHA, queued on the pipeline the request already sends (its recent
items), so still one Redis round trip per request (`check_on` + `verdict`); `check` is the same
alone. The script is cached by Redis: after a Redis restart the first EVALSHA answers NOSCRIPT and
`verdict` runs it once with EVAL, which caches it again.

Redis down or failing (a timeout, an OOM under `noeviction`): the limiter FAILS OPEN -- the caller
catches the Redis error, serves the request without the limit and counts it as a survived error
(`streamrec_request_errors_total{what="rate_limit"}`, services/metrics.py). Availability wins over
the limit: the API already degrades to popular items then, and an outage is not the moment to
refuse paying clients.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError

KEY_PART = "rl:"  # <redis_prefix>rl:<bucket id>
EXPIRE_SLACK_MS = 1000  # a bucket's hash outlives its full refill by this much

# KEYS[1] the bucket; ARGV[1] burst (tokens), ARGV[2] rate (tokens/s). Returns 0 when a token was
# taken, else the milliseconds until one is back. `tokens` and `ts` (seconds, Redis' clock) persist.
TOKEN_BUCKET_LUA = """
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
else
  now = ts
end
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + tonumber(ARGV[3]))
return wait_ms
"""
TOKEN_BUCKET_SHA = hashlib.sha1(TOKEN_BUCKET_LUA.encode()).hexdigest()


class Verdict(NamedTuple):
    allowed: bool
    retry_after_s: int  # 0 when allowed; else whole seconds until a token is back (>= 1)


class RateLimiter:
    """Token buckets under `prefix`; `enabled` is False when `rps` is 0 (no limit)."""

    def __init__(self, prefix: str, rps: float, burst: int) -> None:
        self.prefix, self.rps, self.burst = prefix, float(rps), int(burst)
        self.enabled = self.rps > 0

    @classmethod
    def from_settings(cls, settings) -> "RateLimiter":
        return cls(settings.redis_prefix, settings.rate_limit_rps, settings.rate_limit_burst)

    def key(self, bucket: str) -> str:
        return f"{self.prefix}{KEY_PART}{bucket}"

    def _args(self, bucket: str) -> tuple:
        return 1, self.key(bucket), self.burst, repr(self.rps), EXPIRE_SLACK_MS

    def check_on(self, pipe, bucket: str) -> None:
        """Queue the check of `bucket` on a pipeline; its reply goes to `verdict`."""
        pipe.evalsha(TOKEN_BUCKET_SHA, *self._args(bucket))

    async def verdict(self, aredis, bucket: str, reply: Any) -> Verdict:
        """The verdict from the check's reply (a pipeline run with `raise_on_error=False`). NOSCRIPT
        (Redis restarted) runs the script once with EVAL; another error is raised (the caller fails open)."""
        if isinstance(reply, NoScriptError):
            reply = await aredis.eval(TOKEN_BUCKET_LUA, *self._args(bucket))
        elif isinstance(reply, BaseException):
            raise reply
        wait_ms = int(reply)
        if wait_ms <= 0:
            return Verdict(True, 0)
        return Verdict(False, max(1, math.ceil(wait_ms / 1000)))

    async def check(self, aredis, bucket: str) -> Verdict:
        """One request's check in its own round trip (Redis errors propagate: fail open in the caller)."""
        pipe = aredis.pipeline(transaction=False)
        self.check_on(pipe, bucket)
        (reply,) = await pipe.execute(raise_on_error=False)
        return await self.verdict(aredis, bucket, reply)


__all__ = ["EXPIRE_SLACK_MS", "KEY_PART", "RateLimiter", "TOKEN_BUCKET_LUA", "TOKEN_BUCKET_SHA", "Verdict"]

"""Every Redis client streamrec makes, and the one startup check of its address and credentials.

Clients come from `make_redis` (blocking) or `make_async_redis` (serving's request path), so the
transport settings reach all of them: REDIS_URL (`redis://` or `rediss://` for TLS, credentials
may sit in it: `redis://user:password@host:6379/0`), or `STREAMREC_REDIS_USERNAME` /
`STREAMREC_REDIS_PASSWORD` (an ACL user, or `requirepass` with no user) and
`STREAMREC_REDIS_TLS_CAFILE` (the CA of a `rediss://` server). `connection_kwargs` is that part
alone, for a caller that builds its own keyword arguments.

`check_redis` is what a command does first: a PING under a short timeout, turned into one clear
error -- `RedisRefused` (wrong password, unknown user, an ACL user without the needed commands:
configuration, exit 2) or `RedisUnavailable` (nothing answers) -- that names REDIS_URL with its
password masked, instead of a traceback or a hang.
"""

from __future__ import annotations

import redis

from streaming.settings import Settings, redact_url

# A startup check gives up after this long: a firewalled address must not look like a hang.
CHECK_TIMEOUT_S = 5.0

# The errors that mean "Redis does not answer right now" (a restart, a network cut): worth waiting
# out. BusyLoadingError (a restarted server still reading its AOF) is a ConnectionError; so is
# AuthenticationError, which `check_redis` tells apart first.
REDIS_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class RedisUnavailable(RuntimeError):
    """Redis does not answer at the configured address; the message names it (password masked)."""


class RedisRefused(RedisUnavailable):
    """Redis answers but refuses the credentials (or the ACL user lacks a command): a configuration error."""


def shown_url(settings: Settings) -> str:
    """REDIS_URL as messages show it: the password masked."""
    return str(redact_url(settings.redis_url))


def connection_kwargs(settings: Settings) -> dict:
    """redis-py keyword arguments for the credentials and TLS settings (beside the URL). A password in
    the URL and STREAMREC_REDIS_PASSWORD together are refused when the settings load, so nothing here
    is silently overridden by the URL."""
    kwargs: dict = {}
    if settings.redis_username is not None:
        kwargs["username"] = settings.redis_username
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_tls_cafile is not None:  # validated: only with a rediss:// URL
        kwargs["ssl_ca_certs"] = str(settings.redis_tls_cafile)
    return kwargs


def _url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RedisUnavailable("no Redis address: set REDIS_URL, or let the CLI start the embedded stack")
    return settings.redis_url


def make_redis(settings: Settings, **overrides) -> redis.Redis:
    """A blocking client of REDIS_URL with the configured credentials and TLS (`overrides`: redis-py
    options such as socket_timeout or decode_responses)."""
    return redis.Redis.from_url(_url(settings), **{**connection_kwargs(settings), **overrides})


def make_async_redis(settings: Settings, **overrides):
    """An asyncio client (`redis.asyncio.Redis`) of REDIS_URL, configured like `make_redis`."""
    import redis.asyncio as aredis

    return aredis.Redis.from_url(_url(settings), **{**connection_kwargs(settings), **overrides})


def refusal(settings: Settings, exc: Exception) -> RedisRefused:
    """The configuration error for a refused AUTH or command, naming where the credentials come from."""
    where = ("STREAMREC_REDIS_USERNAME / STREAMREC_REDIS_PASSWORD"
             if settings.redis_password is not None or settings.redis_username is not None
             else "the user:password in REDIS_URL (or STREAMREC_REDIS_PASSWORD)")
    return RedisRefused(f"Redis at STREAMREC_REDIS_URL={shown_url(settings)} refused the credentials "
                        f"({type(exc).__name__}: {exc}): check {where}, and the ACL user's permissions")


def is_refusal(exc: Exception) -> bool:
    """True for a credentials or permission refusal (not a Redis that is merely down)."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.NoPermissionError)):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))


def check_redis(settings: Settings, client: redis.Redis | None = None, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """PING Redis (with a client of its own under `timeout_s`, so a firewalled address fails fast
    rather than hangs); raise `RedisRefused` or `RedisUnavailable`, naming REDIS_URL masked."""
    own = client is None
    if own:
        client = make_redis(settings, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as exc:
        if is_refusal(exc):
            raise refusal(settings, exc) from None
        raise RedisUnavailable(f"Redis does not answer at STREAMREC_REDIS_URL={shown_url(settings)} "
                               f"({type(exc).__name__}: {exc})") from None
    finally:
        if own:
            client.close()


__all__ = ["CHECK_TIMEOUT_S", "REDIS_DOWN_ERRORS", "RedisRefused", "RedisUnavailable", "check_redis",
           "connection_kwargs", "is_refusal", "make_async_redis", "make_redis", "refusal", "shown_url"]

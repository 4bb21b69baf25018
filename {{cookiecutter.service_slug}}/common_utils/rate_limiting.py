"""Rate limiting per client address, with Flask-Limiter.

- Every route gets RATELIMIT_DEFAULT (say `300 per minute`); the resource's
  writes (POST, PUT, PATCH, DELETE) also get RATELIMIT_WRITE, through
  `rate_limiting.limit_writes(blueprint)` in create_app.
- /health, /health/ready and /metrics are never limited: probes and scrapes
  must not be refused because a client was greedy.
- Over a limit: 429 in the service's JSON error shape with Retry-After.
  Every limited response carries X-RateLimit-Limit, X-RateLimit-Remaining and
  X-RateLimit-Reset.
- The client is `request.remote_addr`, which honours X-Forwarded-For only for
  the TRUSTED_PROXY_COUNT proxies app/security.py trusts, so a client cannot
  dodge its limit by sending the header itself.
- Counters live in RATELIMIT_STORAGE_URI: `memory://` (per process) for local
  runs, Redis in docker compose so every worker and replica shares them. If
  Redis cannot be reached, each process falls back to its own in-memory
  counters with a warning in the log, and returns to Redis once it answers
  again: limits get looser for a while, requests never fail because of it.
- A Redis that hangs (accepts, never answers) costs a bounded time: every
  connect and every reply waits at most RATELIMIT_STORAGE_TIMEOUT (0.25 s),
  a failed command is not retried, and the request that finds Redis gone
  waits at most twice (the limit check, then the headers) before the process
  switches to memory. Flask-Limiter then re-checks Redis with one ping after
  1, 2, 4, 8, 16 and 32 s (then again from 1 s): that one request waits at
  most one timeout more. So: at most 2 x RATELIMIT_STORAGE_TIMEOUT on the
  first request, at most 1 x at each re-check, nothing on the others.

Each app gets its own Limiter (Flask-Limiter keeps its storage and limits
on the Limiter object), so several apps in one process never share counters.

One Redis round trip per limit and request: Flask-Limiter counts a hit
(one call) and then reads the window's count and expiry for the headers
(two more). OneTripRedisStorage counts and reads both in one script and
answers the two reads from what that script returned.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.storage import RedisStorage
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.errors import error_response
from common_utils.health import add_readiness_check

EXTENSION_KEY = "rate_limiting"
EXEMPT_PATHS = frozenset({"/health", "/health/ready", "/metrics"})
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
DEFAULT_STORAGE_TIMEOUT = 0.25  # seconds; a healthy Redis answers in about a millisecond
#: Prepended to redis:// URIs so that limits builds OneTripRedisStorage for them.
ONE_TRIP_PREFIX = "one-trip+"
#: Counts a hit (fixed window) and returns the new count with the window's remaining seconds.
INCR_EXPIRE_TTL = """
local current = redis.call("incrby", KEYS[1], ARGV[2])
if current == tonumber(ARGV[2]) then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("ttl", KEYS[1])}
"""


class OneTripRedisStorage(RedisStorage):
    """limits' Redis storage, answering the reads that follow a hit from the hit's own reply.

    Flask-Limiter reads the count and expiry of a window right after
    counting a hit on it (for the X-RateLimit-* headers). The hit's script
    returns both, kept per thread for that key and used once; any other
    read goes to Redis as before.
    """

    STORAGE_SCHEME = [ONE_TRIP_PREFIX + scheme for scheme in ("redis", "rediss", "redis+unix")]

    def __init__(self, uri: str, **options) -> None:
        super().__init__(uri.removeprefix(ONE_TRIP_PREFIX), **options)
        self._after_hit = threading.local()

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_incr_expire_ttl = self.get_connection().register_script(INCR_EXPIRE_TTL)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        count, ttl = self.lua_incr_expire_ttl([self.prefixed_key(key)], [expiry, amount])
        self._after_hit.key = key
        self._after_hit.count = int(count)
        self._after_hit.expires_at = max(int(ttl), 0) + time.time()
        self._after_hit.unread = {"count", "expiry"}
        return int(count)

    def _from_last_hit(self, key: str, what: str):
        remembered = self._after_hit
        if getattr(remembered, "key", None) != key or what not in remembered.unread:
            return None
        remembered.unread.discard(what)
        return remembered.count if what == "count" else remembered.expires_at

    def get(self, key: str) -> int:
        count = self._from_last_hit(key, "count")
        return super().get(key) if count is None else count

    def get_expiry(self, key: str) -> float:
        expires_at = self._from_last_hit(key, "expiry")
        return super().get_expiry(key) if expires_at is None else expires_at


def redis_options(timeout: float) -> dict:
    """Each connect and each reply waits `timeout` at most, and a failed command is not retried."""
    if timeout <= 0:
        raise ValueError(f"RATELIMIT_STORAGE_TIMEOUT must be > 0, got {timeout}")
    return {"socket_connect_timeout": timeout, "socket_timeout": timeout, "retry": Retry(NoBackoff(), 0)}


def client_address() -> str:
    """The rate-limit key: the client's address (after the trusted proxies, see app/security.py)."""
    return request.remote_addr or "unknown"


def is_exempt() -> bool:
    return request.path in EXEMPT_PATHS


def remember_retry_after(response):
    g.retry_after_before_limits = response.headers.get("Retry-After")
    return response


def restore_retry_after(response):
    """Flask-Limiter writes Retry-After on every limited response; keep it on 429s only.

    Other responses get back the Retry-After they had (say, a 503 from an open
    circuit breaker), or none.
    """
    if response.status_code != 429:
        original = g.pop("retry_after_before_limits", None)
        if original is None:
            response.headers.pop("Retry-After", None)
        else:
            response.headers["Retry-After"] = original
    return response


def too_many_requests(error: RateLimitExceeded):
    """429 in the JSON error shape; Flask-Limiter adds Retry-After and the X-RateLimit headers."""
    return error_response(
        429,
        f"Too many requests: the limit is {error.description}. Retry after the time in Retry-After.",
        {"limit": error.description},
    )


def check_storage(limiter: Limiter) -> dict:
    scheme = limiter.storage.__class__.__name__
    if not limiter.storage.check():
        raise ConnectionError(f"{scheme} does not answer; limits are per process meanwhile")
    return {"storage": scheme}


def one_trip(storage_uri: str) -> bool:
    return storage_uri.startswith(("redis://", "rediss://", "redis+unix://"))


class RateLimiting:
    """The extension; `rate_limiting.limiter()` is the app's flask_limiter.Limiter."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> Limiter:
        storage_uri = app.config.setdefault("RATELIMIT_STORAGE_URI", "memory://")
        redis = storage_uri.startswith(("redis://", "rediss://", "redis+"))
        limiter = Limiter(
            key_func=client_address,
            storage_uri=ONE_TRIP_PREFIX + storage_uri if one_trip(storage_uri) else None,
            headers_enabled=True,
            retry_after="delta-seconds",
            in_memory_fallback_enabled=True,
            storage_options=redis_options(
                app.config.get("RATELIMIT_STORAGE_TIMEOUT", DEFAULT_STORAGE_TIMEOUT)
            )
            if redis
            else {},
        )
        limiter.request_filter(is_exempt)
        # after_request functions run last-registered first: remember the
        # response's own Retry-After before the limiter's hook, restore it after.
        app.after_request(restore_retry_after)
        limiter.init_app(app)
        app.after_request(remember_retry_after)
        app.extensions[EXTENSION_KEY] = limiter
        app.register_error_handler(RateLimitExceeded, too_many_requests)
        if limiter.enabled:
            # Informational: without its storage the limiter falls back, it does not fail.
            add_readiness_check(
                app, "rate_limit_storage", lambda: check_storage(limiter), critical=False
            )
        return limiter

    @staticmethod
    def limiter(app: Flask | None = None) -> Limiter:
        return (app or current_app).extensions[EXTENSION_KEY]

    def limit_writes(self, blueprint, app: Flask | None = None) -> None:
        """Add RATELIMIT_WRITE to the write methods of every view in `blueprint` (on top of the default)."""
        app = app or current_app
        limiter = self.limiter(app)
        if not limiter.enabled:
            return
        limiter.limit(
            app.config["RATELIMIT_WRITE"], methods=WRITE_METHODS, override_defaults=False
        )(blueprint)

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

Per request the limiter does only what the request needs. Flask-Limiter
resolves which limits apply to a request (defaults, blueprint limits,
exemptions, methods) on every request, and builds a few objects per limit
for the headers; the limits of a route do not change between requests, so
LeanLimiter resolves them once per endpoint and method and then only counts:
one Redis round trip per limit (the hit, and the window's count and expiry
for the headers, in one script sent straight on a connection each thread
keeps) and the three headers. Flask-Limiter's full path still serves what
cannot be resolved once: views decorated with `limiter.limit(...)`, dynamic limits
(a callable instead of a string), `exempt_when`, `deduct_when`, `cost`
callables, meta limits, and the in-memory fallback while Redis is away.
Its public API is unchanged: `limiter.limit`, `limiter.shared_limit`,
`limiter.exempt`, `limiter.request_filter` and the RATELIMIT_* settings.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref

from flask import Flask, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_qualified_name
from limits.storage import RedisStorage
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.retry import Retry

from common_utils.health import add_readiness_check
from common_utils.json_errors import error_response

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
#: Marks an endpoint and method whose limits only Flask-Limiter's own path can resolve.
FULL_PATH = object()
#: Stands for the client's identity in a key built once per plan (never part of a real one).
IDENTITY = "\x00identity\x00"


def bulk_strings(*values: str | int) -> bytes:
    """`values` as RESP bulk strings, as redis-py's command packer writes them (without its generality)."""
    packed = b""
    for value in values:
        data = str(value).encode()
        packed += b"$%d\r\n%s\r\n" % (len(data), data)
    return packed


class OneTripRedisStorage(RedisStorage):
    """limits' Redis storage, counting a hit and reading its window in one round trip.

    `hit_window` is LeanLimiter's call: the script runs with EVALSHA on a
    connection this thread keeps for itself (see `_thread_connection`).
    Flask-Limiter's own path (see the module docstring) reads the count and
    expiry of a window right after counting a hit on it, for the
    X-RateLimit-* headers: `incr` keeps the script's answer per thread for
    that key and `get`/`get_expiry` answer from it once; any other read goes
    to Redis as before.
    """

    STORAGE_SCHEME = [ONE_TRIP_PREFIX + scheme for scheme in ("redis", "rediss", "redis+unix")]

    def __init__(self, uri: str, **options) -> None:
        super().__init__(uri.removeprefix(ONE_TRIP_PREFIX), **options)
        self._after_hit = threading.local()
        self._per_thread = threading.local()
        # A forked child (a gunicorn worker of a preloaded app) must not use its parent's sockets.
        owner = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: forget_thread_connections(owner))

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_incr_expire_ttl = self.get_connection().register_script(INCR_EXPIRE_TTL)
        # EVALSHA <sha> 1 <key> <expiry> <amount> in RESP, packed once up to the key;
        # <expiry> <amount> packed once per pair (a route's limits have one or two).
        self._evalsha = b"*6\r\n" + bulk_strings("EVALSHA", self.lua_incr_expire_ttl.sha, 1)
        self._packed_arguments: dict[tuple[int, int], bytes] = {}

    def hit_window(self, key: str, expiry: int, amount: int = 1) -> tuple[int, float]:
        """Count `amount` on `key`: (the window's count, when it expires as a timestamp)."""
        key = self.prefixed_key(key)
        arguments = self._packed_arguments.get((expiry, amount))
        if arguments is None:
            arguments = self._packed_arguments[expiry, amount] = bulk_strings(expiry, amount)
        packed_key = key.encode()
        command = [b"%s$%d\r\n%s\r\n%s" % (self._evalsha, len(packed_key), packed_key, arguments)]
        kept = getattr(self._per_thread, "connection", None)
        if kept is not None:
            try:
                count, ttl = self._run(kept, command, key, expiry, amount)
                return int(count), max(int(ttl), 0) + time.time()
            except RedisConnectionError:
                # Redis closed this idle connection (its `timeout` setting, a restart):
                # the pool would have found that out before sending, so once more on a
                # new connection. A hung Redis raises TimeoutError, which is not retried.
                pass
        connection = self._per_thread.connection = self._thread_connection()
        count, ttl = self._run(connection, command, key, expiry, amount)
        return int(count), max(int(ttl), 0) + time.time()

    def _thread_connection(self):
        """A connection of this thread's own, with the pool's settings (timeouts, parser, auth, db).

        Taking one from the pool and giving it back costs about seventy Python
        calls a request in redis-py (locking, a stale-data check, connection
        metrics); a gunicorn worker's few threads can each keep their own. It
        goes when its thread does (AbstractConnection.__del__ disconnects).
        """
        pool = self.storage.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    def _run(self, connection, command: list[bytes], key: str, expiry: int, amount: int):
        try:
            connection.send_packed_command(command)
            return connection.read_response()
        except NoScriptError:  # Redis restarted or SCRIPT FLUSH: redis-py loads it again
            return self.lua_incr_expire_ttl([key], [expiry, amount])
        except BaseException:
            connection.disconnect()  # a reply may still be on its way: never reuse it
            self._per_thread.connection = None
            raise

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


def forget_thread_connections(owner: weakref.ref) -> None:
    """In a forked child: drop the connections inherited from the parent (their sockets are shared)."""
    storage = owner()
    if storage is not None:
        storage._per_thread = threading.local()


class LeanLimiter(Limiter):
    """A flask_limiter.Limiter that resolves each route's limits once (see the module docstring).

    The limits that apply to an endpoint and method are resolved on its first
    request with Flask-Limiter's own rules and kept as a plan: each limit with
    its scope and its storage key around the client's identity, sorted as
    Flask-Limiter sorts them. A plan is kept only when every
    limit is static; otherwise the endpoint is marked FULL_PATH and every
    request goes through Flask-Limiter's `_check_request_limit` as before.
    Headers follow Flask-Limiter's rules too: the breached limit, or else the
    first one not shared; Retry-After only on a 429.
    """

    def init_app(self, app: Flask) -> None:
        # Flask-Limiter registers its hooks unless the app already lists this
        # limiter: list it first, and register the lean hooks instead.
        app.extensions.setdefault("limiter", set()).add(self)
        super().init_app(app)
        if not self.enabled:
            return
        self._plans: dict[tuple[str, str], object] = {}
        self._hit_window = getattr(self.storage, "hit_window", None)
        app.before_request(self._check_request_limit)
        app.after_request(self._add_headers)
        # No teardown: Flask-Limiter's per-request state lives on the request
        # context, and LeanLimiter's on the request: both go with the request.

    def _check_request_limit(
        self, callable_name: str | None = None, in_middleware: bool = True
    ) -> None:
        req = request._get_current_object()  # once: each `request.x` is a context lookup
        endpoint = req.endpoint
        if callable_name is not None or not in_middleware:
            return self._full_path_from_view(endpoint, callable_name)
        if self._storage_dead or not endpoint:
            return self._full_path(callable_name, in_middleware)
        for exempt in self._request_filters:
            if exempt():
                return None
        plan = self._plans.get((endpoint, req.method))
        if plan is None:
            plan = self._plans[endpoint, req.method] = self._plan(endpoint)
        if plan is FULL_PATH:
            return self._full_path(callable_name, in_middleware)
        try:
            self._count(plan, req)
        except RateLimitExceeded:
            raise
        except Exception:
            if not self._in_memory_fallback_enabled:
                if self._swallow_errors:
                    self.logger.exception("Failed to rate limit. Swallowing error")
                    return None
                raise
            self.logger.warning(
                "Rate limit storage unreachable - falling back to in-memory storage"
            )
            self._storage_dead = True
            return self._full_path(callable_name, in_middleware)
        return None

    def _full_path(self, callable_name: str | None, in_middleware: bool) -> None:
        request.rate_limit_full_path = True
        return super()._check_request_limit(callable_name, in_middleware)

    def _full_path_from_view(self, endpoint: str | None, callable_name: str | None) -> None:
        """A `limiter.limit` decorator or context manager inside a view: Flask-Limiter's path.

        If this request's defaults were already counted from a plan, Flask-Limiter
        is told so (it would count them again), and the endpoint's plan is dropped:
        its limits now depend on the view.
        """
        plan = self._plans.get((endpoint, request.method))
        if plan is not None and plan is not FULL_PATH:
            self.context.seen_limits.update(entry[0] for entry in plan)
            self._plans[endpoint, request.method] = FULL_PATH
        return self._full_path(callable_name, False)

    def _plan(self, endpoint: str):
        """This request's limits as [(RuntimeLimit, scope)], or FULL_PATH when they may change per request."""
        manager = self.limit_manager
        groups = itertools.chain(
            manager._application_limits,
            manager._default_limits,
            *manager._blueprint_limits.values(),
            *manager._decorated_limits.values(),
        )
        view = current_app.view_functions.get(endpoint)
        if (
            self._meta_limits
            or self._on_breach
            or manager.has_hints(endpoint)
            or (view is not None and get_qualified_name(view) in self._marked_for_limiting)
            or any(callable(group.limit_provider) for group in groups)
        ):
            return FULL_PATH
        limits = self._Limiter__filter_limits(endpoint, request.blueprint, None, True)
        self.context.seen_limits.clear()  # the resolution above noted them for this request only
        plan = []
        for limit in sorted(limits, key=lambda lim: lim.limit):
            if (
                limit.exempt_when
                or limit.deduct_when
                or limit.on_breach
                or limit.meta_limits
                or callable(limit.cost)
            ):
                return FULL_PATH
            if callable(limit.scope):
                return FULL_PATH
            if not limit.method_exempt:
                scope = limit.scope_for(endpoint, request.method)
                # limits' own key for this limit and scope, split where the client's identity goes.
                ids = (self._key_prefix, IDENTITY, scope) if self._key_prefix else (IDENTITY, scope)
                head, _, tail = limit.limit.key_for(*ids).partition(IDENTITY)
                plan.append((limit, scope, head, tail))
        return plan

    def _count(self, plan, req) -> None:
        """Count a hit on each limit of the plan; raise RateLimitExceeded at the first one over."""
        headers = []
        for limit, scope, head, tail in plan:
            item = limit.limit
            identity = limit.key_func()
            if not identity:
                self.logger.error("Skipping limit: %s. Empty value found in parameters.", item)
                continue
            key = head + str(identity) + tail
            if self._hit_window is not None:
                count, expires_at = self._hit_window(key, item.get_expiry(), limit.cost)
            else:
                count = self.storage.incr(key, item.get_expiry(), amount=limit.cost)
                expires_at = self.storage.get_expiry(key)
            header = (item.amount, max(0, item.amount - count), int(expires_at + 1))
            if count > item.amount:
                self.logger.info(
                    "ratelimit %s (%s) exceeded at endpoint: %s", item, identity, scope
                )
                req.rate_limit_header = header
                raise RateLimitExceeded(limit)
            headers.append((limit.shared, header))
        if headers:
            # Flask-Limiter's choice: the first limit not shared (plans are sorted), else the first.
            req.rate_limit_header = next(
                (header for shared, header in headers if not shared), headers[0][1]
            )

    def _add_headers(self, response):
        """X-RateLimit-Limit, -Remaining and -Reset on every limited response; Retry-After on a 429."""
        header = getattr(request._get_current_object(), "rate_limit_header", None)
        if header is None:
            header = self._header_from_full_path()
            if header is None:
                return response
        amount, remaining, reset_at = header
        headers = response.headers  # only this hook writes these: add, no search for old ones
        headers.add("X-RateLimit-Limit", str(amount))
        headers.add("X-RateLimit-Remaining", str(remaining))
        headers.add("X-RateLimit-Reset", str(reset_at))
        if response.status_code == 429:
            headers["Retry-After"] = str(max(0, int(reset_at - time.time())))
        return response

    def _header_from_full_path(self) -> tuple[int, int, int] | None:
        """The header values Flask-Limiter's own path left in its request context, if it ran."""
        if not getattr(request, "rate_limit_full_path", False):
            return None
        limit = self.current_limit
        if limit is None:
            return None
        try:
            return limit.limit.amount, limit.remaining, limit.reset_at
        except Exception:
            if self._in_memory_fallback_enabled and not self._storage_dead:
                self.logger.warning(
                    "Rate limit storage unreachable - falling back to in-memory storage"
                )
                self._storage_dead = True
                return self._header_from_full_path()
            raise


def redis_options(timeout: float) -> dict:
    """Each connect and each reply waits `timeout` at most, and a failed command is not retried."""
    if timeout <= 0:
        raise ValueError(f"RATELIMIT_STORAGE_TIMEOUT must be > 0, got {timeout}")
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }


def client_address() -> str:
    """The rate-limit key: the client's address (after the trusted proxies, see app/security.py)."""
    return request._get_current_object().remote_addr or "unknown"


def is_exempt() -> bool:
    """Probes and scrapes are never limited.

    Like client_address it runs on every request, so it fetches the request
    from its context once instead of through the proxy's attribute lookup.
    """
    return request._get_current_object().path in EXEMPT_PATHS


def too_many_requests(error: RateLimitExceeded):
    """429 in the JSON error shape; the limiter adds Retry-After and the X-RateLimit headers."""
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
    """The extension; `rate_limiting.limiter()` is the app's flask_limiter.Limiter (a LeanLimiter)."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> Limiter:
        storage_uri = app.config.setdefault("RATELIMIT_STORAGE_URI", "memory://")
        redis = storage_uri.startswith(("redis://", "rediss://", "redis+"))
        limiter = LeanLimiter(
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
        limiter.init_app(app)
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

"""Calling other services: `service_clients.get("payments-service").get("/api/v1/payments/42")`.

Every call made through a ServiceClient
- finds the service's base URL with the resolver create_app passed (the
  service registry, when it is on), falling back to DOWNSTREAM_SERVICES
  (`payments-service=http://payments:8000,...`);
- has a connect and a read timeout (HTTP_CLIENT_CONNECT_TIMEOUT,
  HTTP_CLIENT_READ_TIMEOUT), always: a hung downstream cannot hang this
  service. The read timeout bounds each wait for bytes, not the whole body;
- goes through that service's circuit breaker, so a service that keeps
  failing is given a rest and callers fail fast meanwhile;
- is retried, with exponential backoff and jitter, at most HTTP_CLIENT_RETRIES
  times, and only when that cannot do harm: an idempotent method (GET, HEAD,
  OPTIONS, PUT, DELETE) that failed to connect, timed out or got a 502, 503 or
  504. A POST or PATCH is sent once. A downstream's Retry-After (seconds or an
  HTTP date) is waited for instead of the backoff when it is longer; one over
  HTTP_CLIENT_MAX_RETRY_AFTER, or past the deadline, ends the call at once;
- ends within one overall deadline, HTTP_CLIENT_DEADLINE (10 s), that covers
  the address lookups, every attempt and every wait: each attempt's timeouts
  are cut to the time left, no wait starts that would end past it, and when
  it is spent the call fails with DownstreamTimeout;
- carries no state from one call to the next: the shared connection pool
  keeps no cookies (a downstream's Set-Cookie for one end user must never go
  out with a call made for another);
- carries the X-Request-ID of the request being served and, when OpenTelemetry
  is installed, the trace context (traceparent), so logs and traces join up;
- fails with a DownstreamError subclass naming the service, which a view may
  catch; one it lets through becomes a 502, 503 or 504 in the JSON error shape
  (a downstream's 503 becomes this service's 503, its Retry-After passed on).
"""

from __future__ import annotations

import http.cookiejar
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from flask import Flask, current_app, g, has_request_context
from urllib3.util import Timeout

from common_utils.circuit_breaker import CircuitBreaker, CircuitBreakers, CircuitOpenError
from common_utils.json_errors import error_response

try:  # present when tracing is on; then the trace context goes with every call
    from opentelemetry.propagate import inject as inject_trace_context
except ImportError:  # tracing is off: nothing to propagate

    def inject_trace_context(carrier: dict) -> None:
        return None


logger = logging.getLogger(__name__)

EXTENSION_KEY = "service_clients"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})
MAX_BACKOFF = 5.0  # seconds; no single wait between attempts is longer
REQUEST_ID_HEADER = "X-Request-ID"

#: resolve(name, timeout=seconds) -> base URL; the timeout is what the call's deadline has left.
Resolver = Callable[..., str]


class DownstreamError(Exception):
    """A call to another service failed; `status` and `code` are what this service answers."""

    status = 502
    code = "downstream_error"

    def __init__(
        self,
        service: str,
        message: str,
        *,
        status_code: int | None = None,
        body: str = "",
        retry_after: float | None = None,
    ):
        self.service = service
        self.status_code = status_code  # the downstream's HTTP status, when it answered
        self.body = body
        self.retry_after = retry_after  # seconds the downstream asked callers to wait, if it did
        super().__init__(f"{service}: {message}")


class DownstreamUnavailable(DownstreamError):
    """Could not reach the service (no address, connection refused or reset)."""

    status = 503
    code = "downstream_unavailable"


class DownstreamTimeout(DownstreamUnavailable):
    """The service did not connect or answer within the timeout."""

    status = 504
    code = "downstream_timeout"


class DownstreamCircuitOpen(DownstreamUnavailable):
    """The service's circuit breaker is open: not even tried."""

    code = "downstream_circuit_open"

    def __init__(self, service: str, message: str, *, retry_after: float):
        super().__init__(service, message, retry_after=retry_after)


class DownstreamServerError(DownstreamError):
    """The service answered 5xx; a 503 ("unavailable for now") is passed on as this service's 503."""

    def __init__(self, service: str, message: str, **kwargs: Any):
        super().__init__(service, message, **kwargs)
        if self.status_code == 503:
            self.status = 503
            self.code = DownstreamUnavailable.code


class DownstreamClientError(DownstreamError):
    """The service answered 4xx: it is up, but refused this request."""

    code = "downstream_rejected"


@dataclass
class ClientSettings:
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    retries: int = 2
    backoff: float = 0.2
    deadline: float = 10.0
    max_retry_after: float = 5.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientSettings:
        settings = cls(
            connect_timeout=config.get("HTTP_CLIENT_CONNECT_TIMEOUT", cls.connect_timeout),
            read_timeout=config.get("HTTP_CLIENT_READ_TIMEOUT", cls.read_timeout),
            retries=config.get("HTTP_CLIENT_RETRIES", cls.retries),
            backoff=config.get("HTTP_CLIENT_BACKOFF", cls.backoff),
            deadline=config.get("HTTP_CLIENT_DEADLINE", cls.deadline),
            max_retry_after=config.get("HTTP_CLIENT_MAX_RETRY_AFTER", cls.max_retry_after),
        )
        if min(settings.connect_timeout, settings.read_timeout, settings.deadline) <= 0:
            raise ValueError(
                "HTTP_CLIENT_CONNECT_TIMEOUT, HTTP_CLIENT_READ_TIMEOUT and HTTP_CLIENT_DEADLINE must be > 0"
            )
        if settings.max_retry_after < 0:
            raise ValueError("HTTP_CLIENT_MAX_RETRY_AFTER must be >= 0")
        if settings.retries < 0 or settings.backoff < 0:
            raise ValueError("HTTP_CLIENT_RETRIES and HTTP_CLIENT_BACKOFF must be >= 0")
        return settings


class RefuseAllCookies(http.cookiejar.DefaultCookiePolicy):
    """No cookie is stored or sent: one session serves every end user of this service."""

    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


class ServiceClient:
    """Calls one downstream service by name (see the module docstring for the rules)."""

    def __init__(
        self,
        name: str,
        *,
        breaker: CircuitBreaker,
        settings: ClientSettings,
        configured_url: str | None = None,
        resolve: Resolver | None = None,
        app: Flask | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.name = name
        self.breaker = breaker
        self.settings = settings
        self.configured_url = configured_url
        self._resolve = resolve
        self._app = app
        self.clock = clock  # injectable, so tests can check the deadline without waiting it out
        self.sleep = sleep
        self.session = requests.Session()
        self.session.cookies.set_policy(RefuseAllCookies())

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send `method path` (relative to the service's base URL); a 2xx or 3xx response, or DownstreamError."""
        method = method.upper()
        attempts = 1 + (self.settings.retries if method in IDEMPOTENT_METHODS else 0)
        deadline = self.clock() + self.settings.deadline
        attempt = 1
        while True:
            # The lookup gets what is left of the deadline, and its time counts against it.
            url = self.base_url(timeout=deadline - self.clock()).rstrip("/") + "/" + path.lstrip("/")
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise DownstreamTimeout(
                    self.name, f"{method} {url}: the {self.settings.deadline} s deadline is spent"
                )
            outgoing = self.outgoing_headers(headers)
            timeout = Timeout(
                connect=min(self.settings.connect_timeout, remaining),
                read=min(self.settings.read_timeout, remaining),
                total=remaining,  # connect and read together never outlast the deadline
            )
            try:
                return self.breaker.call(self._send, method, url, params, json, outgoing, timeout)
            except CircuitOpenError as error:
                raise DownstreamCircuitOpen(self.name, str(error), retry_after=error.retry_after) from error
            except DownstreamError as error:
                if attempt >= attempts or not is_retryable(error):
                    raise
                delay = self.retry_delay(attempt, error)
                if delay is None or self.clock() + delay >= deadline:
                    logger.warning(
                        "%s %s failed (%s); not retried: the wait it needs is past the deadline or "
                        "HTTP_CLIENT_MAX_RETRY_AFTER",
                        method, url, error,
                    )
                    raise
                logger.warning(
                    "%s %s failed (%s); attempt %d of %d in %.2f s",
                    method, url, error, attempt + 1, attempts, delay,
                )
            self.sleep(delay)
            attempt += 1

    def retry_delay(self, attempt: int, error: DownstreamError) -> float | None:
        """The wait before the next attempt: the backoff, or the downstream's longer Retry-After.

        None when the downstream asks for more than HTTP_CLIENT_MAX_RETRY_AFTER:
        waiting that long inside one call helps nobody.
        """
        delay = self.backoff_delay(attempt)
        if error.retry_after is None:
            return delay
        if error.retry_after > self.settings.max_retry_after:
            return None
        return max(delay, error.retry_after)

    def base_url(self, timeout: float | None = None) -> str:
        """The resolver's answer (within `timeout` seconds), else the configured URL, else DownstreamUnavailable."""
        if self._resolve is not None:
            try:
                if self._app is None:
                    return self._resolve(self.name, timeout=timeout)
                with self._app.app_context():  # the resolver may read current_app
                    return self._resolve(self.name, timeout=timeout)
            except Exception as error:
                if not self.configured_url:
                    raise DownstreamUnavailable(self.name, f"cannot find an address: {error}") from error
                logger.warning("Resolving %s failed (%s); using %s", self.name, error, self.configured_url)
        if not self.configured_url:
            raise DownstreamUnavailable(
                self.name, "no address: add it to DOWNSTREAM_SERVICES (name=http://host:port)"
            )
        return self.configured_url

    def outgoing_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        outgoing = {"Accept": "application/json", **(headers or {})}
        if has_request_context() and g.get("request_id"):
            outgoing.setdefault(REQUEST_ID_HEADER, g.request_id)
        inject_trace_context(outgoing)
        return outgoing

    def backoff_delay(self, attempt: int) -> float:
        """Full jitter: a random wait up to backoff * 2^(attempt-1), so callers spread out."""
        ceiling = min(self.settings.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
        return random.uniform(0, ceiling)  # noqa: S311 (timing jitter, not cryptography)

    def _send(self, method: str, url: str, params, json, headers, timeout: Timeout) -> requests.Response:
        """One HTTP exchange, its failures turned into DownstreamError (what the breaker counts)."""
        try:
            response = self.session.request(
                method, url, params=params, json=json, headers=headers, timeout=timeout
            )
        except requests.Timeout as error:
            raise DownstreamTimeout(self.name, f"{method} {url} timed out ({error})") from error
        except requests.RequestException as error:
            raise DownstreamUnavailable(self.name, f"{method} {url} failed: {error}") from error
        if response.status_code >= 500:
            raise DownstreamServerError(
                self.name,
                f"{method} {url} answered {response.status_code}",
                status_code=response.status_code,
                body=response.text[:2000],
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if response.status_code >= 400:
            raise DownstreamClientError(
                self.name,
                f"{method} {url} answered {response.status_code}",
                status_code=response.status_code,
                body=response.text[:2000],
            )
        return response


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(moment.timestamp() - time.time(), 0.0)


def is_retryable(error: DownstreamError) -> bool:
    if isinstance(error, DownstreamServerError):
        return error.status_code in RETRYABLE_STATUSES
    return isinstance(error, DownstreamUnavailable) and not isinstance(error, DownstreamCircuitOpen)


@dataclass
class ClientRegistry:
    """The ServiceClients of one app, one per downstream, made on first use."""

    app: Flask
    breakers: CircuitBreakers
    settings: ClientSettings
    services: Mapping[str, str]
    resolve: Resolver | None = None
    clients: dict[str, ServiceClient] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str) -> ServiceClient:
        with self.lock:
            client = self.clients.get(name)
            if client is None:
                client = ServiceClient(
                    name,
                    # A 4xx means the service is up: it must not trip the breaker.
                    breaker=self.breakers.get(name, self.app, exclude=(DownstreamClientError,)),
                    settings=self.settings,
                    configured_url=self.services.get(name),
                    resolve=self.resolve,
                    app=self.app,
                )
                self.clients[name] = client
            return client


class ServiceClients:
    """The extension: `service_clients.get(name)` is the ServiceClient for that service.

    init_app needs the circuit breakers initialised first. `resolve(name, timeout=...)`
    returns a base URL (create_app passes the service registry's resolve).
    """

    def __init__(self, breakers: CircuitBreakers):
        self.breakers = breakers

    def init_app(self, app: Flask, resolve: Resolver | None = None) -> ClientRegistry:
        registry = ClientRegistry(
            app=app,
            breakers=self.breakers,
            settings=ClientSettings.from_config(app.config),
            services=dict(app.config.get("DOWNSTREAM_SERVICES", {})),
            resolve=resolve,
        )
        app.extensions[EXTENSION_KEY] = registry
        app.register_error_handler(DownstreamError, downstream_error_response)
        return registry

    @staticmethod
    def registry(app: Flask | None = None) -> ClientRegistry:
        return (app or current_app).extensions[EXTENSION_KEY]

    def get(self, name: str, app: Flask | None = None) -> ServiceClient:
        return self.registry(app).get(name)


def downstream_error_response(error: DownstreamError):
    """A DownstreamError a view did not handle: 502/503/504 in the JSON error shape."""
    # The full error (with internal URLs) goes to the log, not to the caller.
    logger.warning("Answering %s: %s", error.status, error)
    details: dict[str, Any] = {"service": error.service}
    if error.status_code is not None:
        details["status"] = error.status_code
    response, status = error_response(
        error.status, f"The {error.service} service could not be used.", details, error.code
    )
    if status == 503 and error.retry_after is not None:
        # An open breaker's time to its next probe, or the downstream's own Retry-After.
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return response, status

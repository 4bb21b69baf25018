"""The service-to-service client against a real local HTTP server that fails, hangs and recovers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flask import g

from app.request_logging import RequestContextFilter
from common_utils.circuit_breaker import CLOSED, OPEN, CircuitBreaker, CircuitBreakers
from common_utils.http_client import (
    ClientSettings,
    DownstreamCircuitOpen,
    DownstreamClientError,
    DownstreamServerError,
    DownstreamTimeout,
    DownstreamUnavailable,
    ServiceClient,
    ServiceClients,
)

FAST = ClientSettings(connect_timeout=0.5, read_timeout=0.3, retries=2, backoff=0.01)


class Downstream:
    """A local stand-in for another service. Set `statuses` (answered in turn, the last
    one repeating), `hang` (seconds to wait before answering) or `headers` (sent with
    every answer); `requests` records every request received as (method, path, headers)."""

    def __init__(self):
        self.statuses = [200]
        self.hang = 0.0
        self.headers: dict[str, str] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                owner.requests.append((self.command, self.path, dict(self.headers)))
                if owner.hang:
                    owner.stopping.wait(owner.hang)
                status = owner.statuses.pop(0) if len(owner.statuses) > 1 else owner.statuses[0]
                body = json.dumps({"status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in owner.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def calls(self, method: str | None = None) -> int:
        return sum(1 for request in self.requests if method in (None, request[0]))


@pytest.fixture
def downstream():
    service = Downstream()
    service.thread.start()
    yield service
    service.stopping.set()
    service.server.shutdown()
    service.server.server_close()


def make_client(url, settings=FAST, **breaker_options) -> ServiceClient:
    options = {"failure_threshold": 5, "recovery_timeout": 30, **breaker_options}
    breaker = CircuitBreaker("inventory", exclude=[DownstreamClientError], **options)
    return ServiceClient("inventory", breaker=breaker, settings=settings, configured_url=url)


def test_get_returns_the_downstream_response(downstream):
    """A 2xx comes back as the response, the path joined to the base URL, JSON accepted."""
    response = make_client(downstream.url + "/").get("/api/v1/items/7", params={"full": "1"})
    assert response.status_code == 200
    assert response.json() == {"status": 200}
    method, path, headers = downstream.requests[0]
    assert (method, path) == ("GET", "/api/v1/items/7?full=1")
    assert headers["Accept"] == "application/json"


def test_read_timeout_holds(downstream):
    """A downstream that hangs costs at most the read timeout per attempt, never more."""
    downstream.hang = 5
    client = make_client(downstream.url, ClientSettings(connect_timeout=0.5, read_timeout=0.3, retries=0))
    started = time.perf_counter()
    with pytest.raises(DownstreamTimeout) as error:
        client.get("/slow")
    elapsed = time.perf_counter() - started
    assert 0.25 < elapsed < 1.5
    assert error.value.service == "inventory"
    assert error.value.status == 504


def test_connect_timeout_holds():
    """A host that never accepts the connection costs the connect timeout, not the OS's minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    backlog = []
    for _ in range(3):  # fill the accept queue so the next SYN is dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        backlog.append(filler)
    try:
        client = make_client(
            f"http://127.0.0.1:{port}", ClientSettings(connect_timeout=0.3, read_timeout=5, retries=0)
        )
        started = time.perf_counter()
        with pytest.raises(DownstreamTimeout):
            client.get("/")
        assert time.perf_counter() - started < 1.5
    finally:
        for filler in backlog:
            filler.close()
        listener.close()


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connection_refused_is_downstream_unavailable():
    """Nothing listening: a DownstreamUnavailable naming the service, after the bounded retries."""
    port = closed_port()
    with pytest.raises(DownstreamUnavailable) as error:
        make_client(f"http://127.0.0.1:{port}").get("/")
    assert not isinstance(error.value, DownstreamTimeout)
    assert error.value.status == 503
    assert "inventory" in str(error.value)


def test_idempotent_call_is_retried_until_it_succeeds(downstream):
    """A GET that meets 503, 503, 200 succeeds on its third attempt."""
    downstream.statuses = [503, 503, 200]
    assert make_client(downstream.url).get("/items").status_code == 200
    assert downstream.calls("GET") == 3


def test_retries_are_bounded(downstream):
    """A downstream that keeps failing gets 1 + HTTP_CLIENT_RETRIES attempts, then the error."""
    downstream.statuses = [502]
    with pytest.raises(DownstreamServerError) as error:
        make_client(downstream.url).put("/items/1", json={"name": "x"})
    assert downstream.calls("PUT") == 3
    assert error.value.status_code == 502


def test_non_idempotent_calls_are_never_retried(downstream):
    """POST and PATCH are sent once, whether they got a 503 or timed out."""
    downstream.statuses = [503, 200]
    with pytest.raises(DownstreamServerError):
        make_client(downstream.url).post("/items", json={"name": "x"})
    assert downstream.calls("POST") == 1

    downstream.statuses = [200]
    downstream.hang = 5
    with pytest.raises(DownstreamTimeout):
        make_client(downstream.url).patch("/items/1", json={"name": "y"})
    assert downstream.calls("PATCH") == 1


def test_timed_out_get_is_retried(downstream):
    """A GET that timed out is tried again, up to the bound."""
    downstream.hang = 5
    with pytest.raises(DownstreamTimeout):
        make_client(downstream.url).get("/slow")
    assert downstream.calls("GET") == 3


def test_500_and_4xx_are_not_retried(downstream):
    """Only 502, 503 and 504 are worth another attempt; a 500 or 404 is an answer."""
    downstream.statuses = [500]
    with pytest.raises(DownstreamServerError):
        make_client(downstream.url).get("/broken")
    downstream.statuses = [404]
    with pytest.raises(DownstreamClientError) as error:
        make_client(downstream.url).get("/missing")
    assert error.value.status_code == 404
    assert downstream.calls("GET") == 2


def test_breaker_opens_fails_fast_and_recovers(downstream):
    """Failures open the breaker (no more requests sent); after the timeout a probe closes it again."""
    settings = ClientSettings(connect_timeout=0.5, read_timeout=0.5, retries=0)
    client = make_client(downstream.url, settings, failure_threshold=3, recovery_timeout=0.3)
    downstream.statuses = [503]
    for _ in range(3):
        with pytest.raises(DownstreamServerError):
            client.get("/items")
    assert client.breaker.state == OPEN
    with pytest.raises(DownstreamCircuitOpen) as refused:
        client.get("/items")
    assert downstream.calls() == 3
    assert 0 < refused.value.retry_after <= 0.3

    downstream.statuses = [200]
    time.sleep(0.35)
    assert client.get("/items").status_code == 200
    assert client.breaker.state == CLOSED


def test_client_errors_do_not_trip_the_breaker(downstream):
    """A 4xx means the downstream is up: it is raised, but never opens the breaker."""
    downstream.statuses = [404]
    client = make_client(downstream.url, failure_threshold=2)
    for _ in range(4):
        with pytest.raises(DownstreamClientError):
            client.get("/missing")
    assert client.breaker.state == CLOSED


def test_retries_stop_when_the_breaker_opens(downstream):
    """Retrying does not hammer an open breaker: the attempt that meets it ends the call."""
    downstream.statuses = [503]
    with pytest.raises(DownstreamCircuitOpen):
        make_client(downstream.url, failure_threshold=2).get("/items")
    assert downstream.calls() == 2


def test_base_url_comes_from_the_resolver_then_configuration(make_app, downstream):
    """The resolver's URL is used; if it fails, DOWNSTREAM_SERVICES; with neither, DownstreamUnavailable."""
    app = make_app(DOWNSTREAM_SERVICES={"inventory": downstream.url})
    breakers = CircuitBreakers()
    asked = []

    def resolve(name):
        asked.append(name)
        return downstream.url

    ServiceClients(breakers).init_app(app, resolve=resolve)
    assert ServiceClients(breakers).get("inventory", app).get("/a").status_code == 200
    assert asked == ["inventory"]

    def registry_down(name):
        raise ConnectionError("consul unreachable")

    fallback_app = make_app(DOWNSTREAM_SERVICES={"inventory": downstream.url})
    ServiceClients(breakers).init_app(fallback_app, resolve=registry_down)
    assert ServiceClients(breakers).get("inventory", fallback_app).get("/b").status_code == 200

    nowhere_app = make_app(DOWNSTREAM_SERVICES={})
    ServiceClients(breakers).init_app(nowhere_app, resolve=registry_down)
    with pytest.raises(DownstreamUnavailable, match="consul unreachable"):
        ServiceClients(breakers).get("inventory", nowhere_app).get("/c")
    assert downstream.calls() == 2


def test_one_client_and_breaker_per_downstream(make_app, downstream):
    """The extension keeps one client per service, sharing the app's breaker of the same name."""
    app = make_app(DOWNSTREAM_SERVICES={"inventory": downstream.url, "users": downstream.url})
    clients = ServiceClients(CircuitBreakers())
    inventory = clients.get("inventory", app)
    assert clients.get("inventory", app) is inventory
    assert clients.get("users", app) is not inventory
    assert inventory.breaker is CircuitBreakers().get("inventory", app)
    assert inventory.settings.read_timeout == app.config["HTTP_CLIENT_READ_TIMEOUT"]


def test_request_id_goes_with_the_call(make_app, downstream):
    """Inside a request, the call carries that request's X-Request-ID."""
    app = make_app()
    client = make_client(downstream.url)
    with app.test_request_context("/"):
        g.request_id = "req-123"
        client.get("/items")
    assert downstream.requests[0][2]["X-Request-ID"] == "req-123"


def test_no_cookie_travels_from_one_caller_to_the_next(make_app, downstream):
    """A cookie the downstream sets while serving user A never goes out with the call made for user B."""
    app = make_app()
    client = make_client(downstream.url)
    downstream.headers = {"Set-Cookie": "session=user-A-secret; Path=/"}
    with app.test_request_context("/"):
        g.request_id = "for-user-a"
        client.get("/profile")
    downstream.headers = {}
    with app.test_request_context("/"):
        g.request_id = "for-user-b"
        client.get("/profile")
        client.post("/orders", json={})
    for _, _, headers in downstream.requests[1:]:
        assert "Cookie" not in headers, headers
    assert len(downstream.requests) == 3


def test_trace_context_goes_with_the_call(downstream):
    """With OpenTelemetry installed the caller's trace id reaches the downstream; without it calls work unchanged."""
    client = make_client(downstream.url)
    try:
        from opentelemetry import trace
    except ImportError:
        client.get("/items")
        assert "traceparent" not in {key.lower() for key in downstream.requests[0][2]}
        return
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    parent = trace.NonRecordingSpan(
        trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    with trace.use_span(parent):
        client.get("/items")
    headers = {key.lower(): value for key, value in downstream.requests[0][2].items()}
    assert headers["traceparent"].split("-")[1] == f"{trace_id:032x}"


def test_unhandled_downstream_errors_become_json_gateway_errors(make_app, downstream):
    """A view that lets a DownstreamError through answers 503/504 in the JSON error shape, not 500."""
    app = make_app(
        DOWNSTREAM_SERVICES={"inventory": downstream.url},
        HTTP_CLIENT_READ_TIMEOUT=0.3,
        HTTP_CLIENT_RETRIES=0,
        CIRCUIT_BREAKER_FAILURE_THRESHOLD=2,
    )
    clients = ServiceClients(CircuitBreakers())

    @app.get("/proxy")
    def proxy():
        return clients.get("inventory").get("/items").json()

    http = app.test_client()
    downstream.hang = 5
    timed_out = http.get("/proxy")
    assert timed_out.status_code == 504
    assert timed_out.get_json()["error"]["code"] == "downstream_timeout"
    assert timed_out.get_json()["error"]["details"] == {"service": "inventory"}
    assert downstream.url not in timed_out.get_data(as_text=True)

    downstream.hang = 0
    downstream.statuses = [502]  # (a 503 is passed on as a 503: see below)
    failed = http.get("/proxy").get_json()["error"]
    assert failed == {
        "code": "downstream_error",
        "message": "The inventory service could not be used.",
        "details": {"service": "inventory", "status": 502},
    }
    refused = http.get("/proxy")
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "downstream_circuit_open"
    assert int(refused.headers["Retry-After"]) >= 1


def test_downstream_failures_reach_the_log_not_the_caller(make_app, caplog):
    """Connection refused: the caller sees a code and the service's name; the address and reason are logged with the request id."""
    port = closed_port()
    app = make_app(DOWNSTREAM_SERVICES={"inventory": f"http://127.0.0.1:{port}"}, HTTP_CLIENT_RETRIES=0)
    clients = ServiceClients(CircuitBreakers())
    app.add_url_rule("/proxy", "proxy", lambda: clients.get("inventory").get("/items").json())
    caplog.handler.addFilter(RequestContextFilter())
    response = app.test_client().get("/proxy", headers={"X-Request-ID": "req-hostile-2"})
    assert response.status_code == 503
    body = response.get_data(as_text=True)
    for secret in ("127.0.0.1", str(port), "refused", "Errno", "HTTPConnectionPool", "/items"):
        assert secret not in body, (secret, body)
    assert response.get_json()["error"]["details"] == {"service": "inventory"}
    logged = [record for record in caplog.records if str(port) in record.getMessage()]
    assert logged
    assert {record.request_id for record in logged} == {"req-hostile-2"}


class FakeClock:
    """time.monotonic and time.sleep for a ServiceClient: time passes only when the test says."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def clocked_client(url, clock: FakeClock, settings: ClientSettings, **options) -> ServiceClient:
    breaker = CircuitBreaker("inventory", failure_threshold=50, recovery_timeout=30, exclude=[DownstreamClientError])
    return ServiceClient(
        "inventory", breaker=breaker, settings=settings, configured_url=url, clock=clock, sleep=clock.sleep, **options
    )


def test_retry_after_is_honoured_within_its_bound(downstream):
    """A 503 with Retry-After: 2 is retried after 2 s (more than the backoff); the second answer is returned."""
    clock = FakeClock()
    downstream.statuses = [503, 200]
    downstream.headers = {"Retry-After": "2"}
    settings = ClientSettings(retries=2, backoff=0.01, deadline=10, max_retry_after=5)
    response = clocked_client(downstream.url, clock, settings).get("/items")
    assert response.status_code == 200
    assert clock.sleeps == [2.0]


def test_a_retry_after_beyond_the_bound_or_the_deadline_is_not_waited_for(downstream):
    """Retry-After longer than HTTP_CLIENT_MAX_RETRY_AFTER, or than the time left: fail now, keeping the hint."""
    clock = FakeClock()
    downstream.statuses = [503, 200]
    downstream.headers = {"Retry-After": "120"}
    settings = ClientSettings(retries=2, backoff=0.01, deadline=10, max_retry_after=5)
    with pytest.raises(DownstreamServerError) as error:
        clocked_client(downstream.url, clock, settings).get("/items")
    assert (downstream.calls(), clock.sleeps, error.value.retry_after) == (1, [], 120.0)
    downstream.statuses = [503, 200]
    downstream.headers = {"Retry-After": "4"}
    settings = ClientSettings(retries=2, backoff=0.01, deadline=3, max_retry_after=5)
    with pytest.raises(DownstreamServerError):
        clocked_client(downstream.url, clock, settings).get("/items")
    assert clock.sleeps == []


def test_one_deadline_covers_lookups_attempts_and_waits(downstream):
    """A downstream that uses every second it is given, a slow lookup: the call still ends within HTTP_CLIENT_DEADLINE."""
    clock = FakeClock()
    downstream.statuses = [503]
    settings = ClientSettings(connect_timeout=2, read_timeout=5, retries=10, backoff=0.5, deadline=4)

    def slow_lookup(name: str) -> str:
        clock.now += 0.3
        return downstream.url

    client = clocked_client(None, clock, settings, resolve=slow_lookup)
    send = client.session.request
    budgets = []

    def uses_all_its_time(method, url, **kwargs):
        timeout = kwargs["timeout"]
        allowed = timeout.total if timeout.total is not None else timeout.connect_timeout + timeout.read_timeout
        budgets.append(allowed)
        clock.now += allowed  # connected and answered at the last moment it was allowed
        return send(method, url, **kwargs)

    client.session.request = uses_all_its_time
    started = clock.now
    with pytest.raises((DownstreamServerError, DownstreamTimeout)):
        client.get("/items")
    assert clock.now - started <= 4
    assert len(budgets) >= 1
    assert all(budget <= 4 for budget in budgets)


def test_a_downstream_503_is_passed_on_with_its_retry_after(make_app, downstream):
    """The caller of this service gets a 503 with the downstream's Retry-After, not a bare 502."""
    app = make_app(DOWNSTREAM_SERVICES={"inventory": downstream.url}, HTTP_CLIENT_RETRIES=0)
    clients = ServiceClients(CircuitBreakers())
    app.add_url_rule("/proxy", "proxy", lambda: clients.get("inventory").get("/items").json())
    downstream.statuses = [503]
    downstream.headers = {"Retry-After": "7"}
    response = app.test_client().get("/proxy")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.get_json()["error"]["code"] == "downstream_unavailable"

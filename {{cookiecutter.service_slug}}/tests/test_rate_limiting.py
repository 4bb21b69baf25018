"""Rate limiting: limits, headers, exemptions, client keys, Redis and its absence."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import pytest
from flask import request

from tests.conftest import skip_or_fail

LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def redis_app(make_app):
    """Builds apps that count in the test Redis under a key prefix of this test's; its keys go afterwards."""
    url = os.environ.get("TEST_REDIS_URL")
    if not url:
        skip_or_fail("TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    prefix = f"test-{uuid.uuid4().hex}"
    built = []

    def build(limit: str):
        built.append(make_app(RATELIMIT_DEFAULT=limit, RATELIMIT_STORAGE_URI=url, RATELIMIT_KEY_PREFIX=prefix))
        return built[-1]

    yield build
    if built:
        redis = built[0].extensions["rate_limiting"].storage.get_connection()
        for key in redis.scan_iter(f"*{prefix}*"):
            redis.delete(key)


def test_limit_headers_on_normal_responses(make_app, collection_url):
    """Each limited response says the limit, what is left and when it resets; Retry-After only on refusals."""
    client = make_app(RATELIMIT_DEFAULT="5 per minute").test_client()
    remaining = []
    for _ in range(3):
        response = client.get(collection_url)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert int(response.headers["X-RateLimit-Reset"]) > 0
        assert "Retry-After" not in response.headers
        remaining.append(response.headers["X-RateLimit-Remaining"])
    assert remaining == ["4", "3", "2"]


def test_over_the_limit_is_429_in_the_json_error_shape(make_app, collection_url):
    """The request after the limit is a 429 with the JSON error body and a Retry-After in seconds."""
    client = make_app(RATELIMIT_DEFAULT="2 per minute").test_client()
    assert [client.get(collection_url).status_code for _ in range(2)] == [200, 200]
    response = client.get(collection_url)
    assert response.status_code == 429
    assert response.content_type == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert "2 per 1 minute" in error["message"]
    assert error["details"] == {"limit": "2 per 1 minute"}
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert response.headers["X-RateLimit-Remaining"] == "0"


def test_a_responses_own_retry_after_is_kept(make_app):
    """A 503 saying Retry-After: 7 keeps its value; the limiter's Retry-After is only for 429s."""
    app = make_app(RATELIMIT_DEFAULT="5 per minute")

    @app.get("/busy")
    def busy():
        return {"error": {"code": "busy", "message": "Busy.", "details": {}}}, 503, {"Retry-After": "7"}

    response = app.test_client().get("/busy")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-RateLimit-Limit"] == "5"


def test_the_limiters_own_decorators_still_apply(make_app):
    """`limiter.limit(...)` on a view replaces the default limit there; `limiter.exempt` lifts every limit."""
    app = make_app(RATELIMIT_DEFAULT="3 per minute")
    limiter = app.extensions["rate_limiting"]

    @app.get("/tight")
    @limiter.limit("1 per minute")
    def tight():
        return {"served": True}

    @app.get("/free")
    @limiter.exempt
    def free():
        return {"served": True}

    client = app.test_client()
    first = client.get("/tight")
    assert (first.status_code, first.headers["X-RateLimit-Limit"]) == (200, "1")
    refused = client.get("/tight")
    assert refused.status_code == 429
    assert refused.get_json()["error"]["details"] == {"limit": "1 per 1 minute"}
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    free_responses = [client.get("/free") for _ in range(5)]
    assert [response.status_code for response in free_responses] == [200] * 5
    assert not any(header in free_responses[-1].headers for header in LIMIT_HEADERS)


def test_counters_are_kept_under_flask_limiters_own_keys(make_app, collection_url):
    """The lean path counts where Flask-Limiter's own path (decorated views, fallback, its CLI) looks."""
    app = make_app(RATELIMIT_DEFAULT="5 per minute")
    limiter = app.extensions["rate_limiting"]
    client = app.test_client()
    assert [client.get(collection_url).status_code for _ in range(2)] == [200, 200]
    with app.test_request_context(collection_url):
        endpoint = request.url_rule.endpoint
    [default] = limiter.limit_manager.default_limits
    prefix = [app.config["RATELIMIT_KEY_PREFIX"]] if app.config.get("RATELIMIT_KEY_PREFIX") else []
    window = limiter.limiter.get_window_stats(default.limit, *prefix, "127.0.0.1", endpoint)
    assert window.remaining == 3


def test_writes_have_their_own_tighter_limit(make_app, collection_url, new_item):
    """RATELIMIT_WRITE applies to every write method on top of the default; reads are not affected."""
    client = make_app(RATELIMIT_DEFAULT="100 per minute", RATELIMIT_WRITE="2 per minute").test_client()
    created = [client.post(collection_url, json={**new_item, "name": f"item {n}"}) for n in range(2)]
    assert [response.status_code for response in created] == [201, 201]
    refused = client.post(collection_url, json={**new_item, "name": "one too many"})
    assert refused.status_code == 429
    assert refused.get_json()["error"]["details"] == {"limit": "2 per 1 minute"}
    assert client.get(collection_url).status_code == 200

    item_url = created[0].headers["Location"]
    assert client.put(item_url, json={**new_item, "name": "renamed"}).status_code == 200
    assert client.patch(item_url, json={"quantity": 9}).status_code == 200
    assert client.delete(item_url).status_code == 429
    assert client.get(item_url).status_code == 200


def test_health_and_metrics_are_never_limited(make_app):
    """Probes and scrapes are exempt: /health, /health/ready and /metrics never answer 429."""
    client = make_app(RATELIMIT_DEFAULT="1 per minute").test_client()
    for path in ("/health", "/health/ready", "/metrics"):
        for _ in range(4):
            response = client.get(path)
            assert response.status_code != 429, path
            assert "X-RateLimit-Limit" not in response.headers, path


def test_forwarded_for_is_ignored_without_trusted_proxies(make_app, collection_url):
    """With TRUSTED_PROXY_COUNT=0 a client cannot escape its limit by inventing X-Forwarded-For."""
    client = make_app(RATELIMIT_DEFAULT="2 per minute", TRUSTED_PROXY_COUNT=0).test_client()
    statuses = [
        client.get(collection_url, headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
        for n in range(3)
    ]
    assert statuses == [200, 200, 429]


def test_trusted_proxy_hop_identifies_the_client(make_app, collection_url):
    """Behind one trusted proxy the client is the address that proxy appended, whatever came before it."""
    client = make_app(RATELIMIT_DEFAULT="2 per minute", TRUSTED_PROXY_COUNT=1).test_client()
    proxy = {"REMOTE_ADDR": "10.0.0.2"}

    def get(forwarded_for: str) -> int:
        return client.get(
            collection_url, headers={"X-Forwarded-For": forwarded_for}, environ_base=proxy
        ).status_code

    # The same client, each time claiming a different origin in front of the real one.
    assert [get(f"198.51.100.{n}, 203.0.113.7") for n in range(3)] == [200, 200, 429]
    # Another client behind the same proxy has its own allowance.
    assert get("203.0.113.8") == 200


def test_apps_in_one_process_do_not_share_counters(make_app, collection_url):
    """Each app has its own limiter: exhausting one leaves the other untouched."""
    first = make_app(RATELIMIT_DEFAULT="1 per minute").test_client()
    second = make_app(RATELIMIT_DEFAULT="1 per minute").test_client()
    assert [first.get(collection_url).status_code for _ in range(2)] == [200, 429]
    assert second.get(collection_url).status_code == 200


def test_disabled_rate_limiting_limits_nothing(make_app, collection_url):
    """RATELIMIT_ENABLED=false: no limits and no rate-limit headers."""
    client = make_app(RATELIMIT_ENABLED=False, RATELIMIT_DEFAULT="1 per minute").test_client()
    responses = [client.get(collection_url) for _ in range(3)]
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert not any(header in responses[-1].headers for header in LIMIT_HEADERS)


def test_unreachable_redis_falls_back_to_memory_limits(make_app, collection_url, caplog):
    """Redis down: requests still succeed, limits hold per process, a warning is logged, readiness says so."""
    app = make_app(
        RATELIMIT_DEFAULT="2 per minute",
        RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{closed_port()}/0",
    )
    client = app.test_client()
    with caplog.at_level(logging.WARNING):
        statuses = [client.get(collection_url).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert any("falling back to in-memory" in record.getMessage() for record in caplog.records)

    ready = client.get("/health/ready")
    storage = ready.get_json()["checks"]["rate_limit_storage"]
    assert ready.status_code == 200
    assert storage["status"] == "down"
    assert storage["critical"] is False


class HungRedis:
    """A TCP listener that accepts connections and never answers: a Redis that hangs."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)

    def close(self):
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_a_hung_redis_costs_a_bounded_time(make_app, collection_url, caplog, monkeypatch):
    """Redis accepts and never answers: each wait is RATELIMIT_STORAGE_TIMEOUT, at most two per request, never retried, then memory."""
    redis = HungRedis()
    try:
        app = make_app(RATELIMIT_STORAGE_URI=redis.url, RATELIMIT_STORAGE_TIMEOUT=0.1)
        storage = app.extensions["rate_limiting"].storage.storage
        options = storage.connection_pool.connection_kwargs
        assert (options["socket_connect_timeout"], options["socket_timeout"]) == (0.1, 0.1)
        assert options["retry"].get_retries() == 0  # one wait per command, not four
        client = app.test_client()
        with caplog.at_level(logging.WARNING):
            assert client.get(collection_url).status_code == 200
        assert any("falling back to in-memory" in record.getMessage() for record in caplog.records)
        first = len(redis.connections)
        assert 1 <= first <= 2  # the documented worst case: two waits on the first request
        # Flask-Limiter's timed re-check (one ping after 1, 2, 4, ... s) would make the
        # count below depend on the machine's speed: hold it off, then count.
        limiter = app.extensions["rate_limiting"]
        monkeypatch.setattr(limiter, "_Limiter__should_check_backend", lambda: False)
        for _ in range(5):
            assert client.get(collection_url).status_code == 200
        assert len(redis.connections) == first  # the other requests do not wait on Redis at all
    finally:
        redis.close()


def test_limit_is_shared_across_instances_through_redis(redis_app, collection_url):
    """Two app instances on the same Redis share one counter per client, as replicas do in production."""
    first, second = redis_app("3 per minute"), redis_app("3 per minute")
    assert first.test_client().get("/health/ready").get_json()["checks"]["rate_limit_storage"][
        "status"
    ] == "up", "the test Redis does not answer"
    one, two = first.test_client(), second.test_client()
    statuses = [one.get(collection_url).status_code, two.get(collection_url).status_code]
    statuses += [one.get(collection_url).status_code, two.get(collection_url).status_code]
    assert statuses == [200, 200, 200, 429]
    assert two.get(collection_url).headers["X-RateLimit-Remaining"] == "0"


def test_one_redis_round_trip_per_request(redis_app, collection_url, monkeypatch):
    """Counting a hit and reading the window for the headers is one Redis command, not three."""
    app = redis_app("5 per minute")
    redis = app.extensions["rate_limiting"].storage.get_connection()
    sent = []
    connection_class = redis.connection_pool.connection_class
    send_packed_command = connection_class.send_packed_command

    def counting(connection, command, *args, **kwargs):
        packed = b"".join(command) if isinstance(command, list) else command
        sent.append(packed.split(b"\r\n")[2].decode())  # *<n> $<length> <command name> ...
        return send_packed_command(connection, command, *args, **kwargs)

    client = app.test_client()
    # The first request opens the pooled connection (its handshake is not a round trip per request).
    assert client.get(collection_url).headers["X-RateLimit-Remaining"] == "4"
    # Every command this process sends to Redis from here, whichever client or pool sends it.
    monkeypatch.setattr(connection_class, "send_packed_command", counting)
    responses = [client.get(collection_url) for _ in range(3)]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["3", "2", "1"]
    now = time.time()
    assert all(now < int(r.headers["X-RateLimit-Reset"]) <= now + 61 for r in responses)
    assert sent == ["EVALSHA"] * 3


def test_a_connection_redis_closed_is_replaced_without_falling_back(
    redis_app, collection_url, caplog
):
    """Redis dropping a thread's idle connection (its `timeout`, a restart) costs a reconnect, not the shared counters."""
    app = redis_app("5 per minute")
    storage = app.extensions["rate_limiting"].storage
    redis = storage.get_connection()
    client = app.test_client()
    assert client.get(collection_url).headers["X-RateLimit-Remaining"] == "4"
    # This thread's own connection, opened by that request.
    kept = storage._per_thread.connection
    kept.send_command("CLIENT", "ID")
    redis.client_kill_filter(_id=kept.read_response())
    with caplog.at_level(logging.WARNING):
        response = client.get(collection_url)
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "3"  # still counted in Redis
    assert not any("falling back" in record.getMessage() for record in caplog.records)
    assert storage._per_thread.connection is not kept


def test_each_thread_counts_on_a_connection_of_its_own(redis_app, collection_url):
    """Threads never share a Redis connection (replies would interleave), and their hits add up."""
    app = redis_app("100 per minute")
    storage = app.extensions["rate_limiting"].storage
    connections, statuses = [], []

    def serve() -> None:
        client = app.test_client()
        statuses.extend(client.get(collection_url).status_code for _ in range(5))
        connections.append(storage._per_thread.connection)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 20
    assert len({id(connection) for connection in connections}) == 4
    remaining = app.test_client().get(collection_url).headers["X-RateLimit-Remaining"]
    assert remaining == str(100 - 21)


# The child only opens a socket and counts, taking no lock another thread of the test run may hold.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_opens_a_redis_connection_of_its_own(redis_app, collection_url):
    """A child forked from a process that counted (a preloaded gunicorn master) never reuses its parent's socket."""
    app = redis_app("5 per minute")
    storage = app.extensions["rate_limiting"].storage
    client = app.test_client()
    assert client.get(collection_url).headers["X-RateLimit-Remaining"] == "4"
    inherited = storage._per_thread.connection
    child = os.fork()
    if child == 0:  # the child counts straight on the storage (no database) and reports its connection
        try:
            count, _ = storage.hit_window(f"fork-check-{uuid.uuid4().hex}", 60)
            own = storage._per_thread.connection is not inherited
            os._exit(0 if (own, count) == (True, 1) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child reused its parent's Redis connection"
    assert storage._per_thread.connection is inherited  # the parent's own is left alone
    assert client.get(collection_url).headers["X-RateLimit-Remaining"] == "3"

"""The RabbitMQ transport against a real broker (TEST_AMQP_URL).

Connection failures are made with a local TCP proxy between the relay and
the broker: cutting its connections is a broker outage as the relay sees
it, without stopping a RabbitMQ that other users share.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

from app.events import processor
from app.extensions import db
from common_utils.outbox import PENDING, PROCESSED, OutboxEvent
from common_utils.outbox.consumer import idempotent_consumer
from common_utils.outbox.transport import TransportUnavailable
from tests.conftest import skip_or_fail
from tests.outbox_support import (
    PROJECT,
    PYTHON,
    count_pending,
    subprocess_env,
    wait_until,
    write_streams,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get("TEST_AMQP_URL")
    if not url:
        skip_or_fail("TEST_AMQP_URL is not set (e.g. amqp://guest:guest@127.0.0.1:5672/%2F)")
    return url


class BoundQueue:
    """A queue bound to everything on the test's exchange, read with basic_get."""

    def __init__(self, url: str, exchange: str):
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, "topic", durable=True)
        self.name = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.name, exchange, "#")

    def count(self) -> int:
        return self.channel.queue_declare(self.name, passive=True).method.message_count

    def drain(self, at_least: int = 0, timeout: float = 20.0) -> list[tuple]:
        """Every message now in the queue (waiting for `at_least` of them), as (method, properties, body)."""
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            method, properties, body = self.channel.basic_get(self.name, auto_ack=True)
            if method is not None:
                messages.append((method, properties, body))
                continue
            if len(messages) >= at_least or time.monotonic() > deadline:
                return messages
            self.connection.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.channel.exchange_delete(self.exchange)
            self.connection.close()


@pytest.fixture
def exchange() -> str:
    return f"outbox-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queue(amqp_url, exchange):
    bound = BoundQueue(amqp_url, exchange)
    yield bound
    bound.close()


@pytest.fixture
def rabbit_app(app, make_app, amqp_url, exchange):
    """Build apps publishing to the test's exchange; closes them (and their connections) after."""
    built = []

    def build(url: str = amqp_url, **overrides):
        config = {
            "OUTBOX_TRANSPORT": "rabbitmq",
            "AMQP_URL": url,
            "OUTBOX_EXCHANGE": exchange,
            "OUTBOX_PUBLISH_TIMEOUT": 5.0,
            "OUTBOX_MIN_POLL_INTERVAL": 0.01,
            "OUTBOX_PROCESSING_INTERVAL": 0.2,
            **overrides,
        }
        instance = make_app(**config)
        built.append(instance)
        return instance

    yield build
    for instance in built:
        instance.extensions["outbox"].close()
        with instance.app_context():
            db.engine.dispose()


class TcpProxy:
    """A loopback TCP proxy whose connections can be cut, and new ones refused, at will."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.refusing = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, amqp_url: str) -> str:
        parts = urlsplit(amqp_url)
        credentials = parts.netloc.rpartition("@")[0]
        return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{self.port}"))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.server.close()
        self.cut()


@pytest.fixture
def proxy(amqp_url):
    parts = urlsplit(amqp_url)
    running = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    yield running
    running.close()


def run_relays(app, count: int):
    """Start `count` relay threads on `app`; returns a function that stops them."""
    state = app.extensions["outbox"]
    relays = [state.relay() for _ in range(count)]
    threads = [threading.Thread(target=relay.run) for relay in relays]
    for thread in threads:
        thread.start()

    def stop() -> None:
        for relay in relays:
            relay.stop()
        for thread in threads:
            thread.join(15)

    return stop


def deliveries(messages) -> list[tuple[str, int, str]]:
    return [(properties.headers["aggregate_id"], json.loads(body)["seq"], properties.message_id) for _, properties, body in messages]


def first_deliveries_in_order(delivered, aggregates, per_aggregate) -> None:
    """Each aggregate's events first arrived in sequence order, and none is missing."""
    seen = set()
    by_aggregate = defaultdict(list)
    for aggregate_id, seq, message_id in delivered:
        if message_id not in seen:
            seen.add(message_id)
            by_aggregate[aggregate_id].append(seq)
    assert len(seen) == len(aggregates) * per_aggregate, "an event never reached the broker"
    assert all(by_aggregate[name] == list(range(per_aggregate)) for name in aggregates)


def test_an_event_is_published_with_confirms_to_the_service_exchange(rabbit_app, queue, collection_url, new_item, exchange):
    """Topic exchange named after the service, routing key = type, message id = event id, trace in headers."""
    published = rabbit_app()
    response = published.test_client().post(collection_url, json=new_item, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 201
    with published.app_context():
        assert processor.process_pending_events() == 1
        event = db.session.scalars(db.select(OutboxEvent)).one()
    [(method, properties, body)] = queue.drain(at_least=1)
    assert (method.exchange, method.routing_key) == (exchange, "{{ cookiecutter.resource_name }}.created")
    assert properties.message_id == event.id
    assert properties.type == "{{ cookiecutter.resource_name }}.created"
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.app_id == published.config["SERVICE_NAME"]
    assert properties.headers["aggregate_id"] == str(response.json["id"])
    assert properties.headers["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    assert json.loads(body) == event.data
    assert event.status == PROCESSED


def test_an_unreachable_broker_leaves_events_pending_and_shows_in_readiness(rabbit_app, proxy, amqp_url, collection_url, new_item):
    """Broker down: no event is lost or counted as a failed attempt; /health/ready reports it."""
    proxy.refusing.set()
    down = rabbit_app(proxy.url(amqp_url), OUTBOX_PUBLISH_TIMEOUT=1.0)
    client = down.test_client()
    assert client.post(collection_url, json=new_item).status_code == 201
    with down.app_context(), pytest.raises(TransportUnavailable):
        processor.process_pending_events()
    with down.app_context():
        event = db.session.scalars(db.select(OutboxEvent)).one()
    assert (event.status, event.retry_count, event.error) == (PENDING, 0, None)
    response = client.get("/health/ready")
    assert response.status_code == 200  # degraded, not down
    assert response.json["checks"]["broker"]["status"] == "down"
    assert response.json["checks"]["broker"]["critical"] is False


def test_readiness_probes_the_broker_when_no_relay_runs_here(rabbit_app):
    """The app process of a compose setup (relay elsewhere) still reports broker connectivity."""
    body = rabbit_app().test_client().get("/health/ready").json
    assert body["checks"]["broker"]["status"] == "up"
    assert body["checks"]["broker"]["connected"] is True


def test_connections_cut_under_load_lose_nothing_and_the_backlog_drains(rabbit_app, proxy, queue, amqp_url):
    """Cut every broker connection twice while events flow: all arrive, in order, backlog drains."""
    flowing = rabbit_app(proxy.url(amqp_url), OUTBOX_BATCH_SIZE=50)
    stop = run_relays(flowing, 1)
    try:
        writer = threading.Thread(target=write_streams, args=(flowing, 20, 40), kwargs={"per_transaction": 5})
        writer.start()
        for _ in range(2):
            time.sleep(0.4)
            proxy.refusing.set()
            proxy.cut()
            time.sleep(1.0)  # events keep being written while the broker is away
            proxy.refusing.clear()
        writer.join()
        wait_until(lambda: count_pending(flowing) == 0, timeout=60, what="the backlog to drain")
    finally:
        stop()
    delivered = deliveries(queue.drain(at_least=800))
    first_deliveries_in_order(delivered, [f"agg-{index:04d}" for index in range(20)], 40)
    duplicated = len(delivered) - len({message_id for _, _, message_id in delivered})
    assert duplicated <= 2 * 50  # at most the batch in flight at each cut


def test_relays_publish_each_event_once_in_aggregate_order(rabbit_app, queue, app):
    """Four relays (one on SQLite) publish every event exactly once, each aggregate in commit order."""
    with app.app_context():
        relays = 4 if db.engine.dialect.name != "sqlite" else 1
    publishing = rabbit_app(OUTBOX_BATCH_SIZE=100)
    stop = run_relays(publishing, relays)
    try:
        aggregates = write_streams(publishing, 50, 40, writers=2, per_transaction=25)
        wait_until(lambda: count_pending(publishing) == 0, timeout=60, what="the backlog to drain")
    finally:
        stop()
    delivered = deliveries(queue.drain(at_least=2000))
    assert len(delivered) == 2000
    assert len({message_id for _, _, message_id in delivered}) == 2000
    first_deliveries_in_order(delivered, aggregates, 40)


def test_the_relay_command_killed_at_random_moments_loses_nothing(app, make_app, queue, amqp_url, exchange, database_url):
    """SIGKILL `flask outbox relay` mid-run several times: nothing lost, duplicates deduplicated."""
    writer = make_app()
    write_streams(writer, 40, 100, per_transaction=40)
    env = subprocess_env(
        database_url,
        OUTBOX_TRANSPORT="rabbitmq",
        AMQP_URL=amqp_url,
        OUTBOX_EXCHANGE=exchange,
        OUTBOX_BATCH_SIZE="100",
    )
    rng = random.Random(99)  # noqa: S311 - reproducible kill times, not secrets
    kills = []
    for _ in range(4):
        process = subprocess.Popen([PYTHON, "-m", "flask", "outbox", "relay"], cwd=PROJECT, env=env)
        before = queue.count()
        wait_until(
            lambda before=before, process=process: queue.count() > before or process.poll() is not None,
            timeout=30,
            what="the relay to publish",
        )
        time.sleep(rng.uniform(0.0, 0.15))
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        kills.append(queue.count())
    final = subprocess.run([PYTHON, "-m", "flask", "outbox", "relay", "--once"], cwd=PROJECT, env=env, timeout=120, check=False)
    assert final.returncode == 0
    assert count_pending(writer) == 0
    messages = queue.drain(at_least=4000)
    counts = Counter(properties.message_id for _, properties, _ in messages)
    duplicated = sum(count - 1 for count in counts.values())
    assert len(counts) == 4000, "an event was lost"
    assert duplicated <= 4 * 100  # only the batch in flight at each kill
    print(f"\nrabbitmq crash test: kills at {kills} messages; 4000 events, 0 lost, {duplicated} duplicated")

    runs = Counter()

    @idempotent_consumer("rabbitmq-crash-test")
    def consume(channel, method, properties, body):
        runs[properties.message_id] += 1

    duplicated_ids = {message_id for message_id, count in counts.items() if count > 1}
    with writer.app_context():
        for method, properties, body in messages:
            if properties.message_id in duplicated_ids:
                consume(None, method, properties, body)
        db.session.remove()
    assert set(runs) == duplicated_ids
    assert set(runs.values()) <= {1}


{%- if cookiecutter.use_tracing %}


def test_a_consumer_span_continues_the_writers_trace_over_rabbitmq(rabbit_app, queue):
    """A consumer's span made from the message headers is a child of the span that wrote the event."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from app.models import {{ cookiecutter.__resource_class }}
    from common_utils.outbox import continue_trace

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    published = rabbit_app()
    with published.app_context():
        with tracer.start_as_current_span("POST /{{ cookiecutter.resource_plural }}") as request_span:
            db.session.add({{ cookiecutter.__resource_class }}(name="traced over rabbitmq"))
            db.session.commit()
        assert processor.process_pending_events() == 1
    [(method, properties, _)] = queue.drain(at_least=1)
    with continue_trace(properties.headers, f"{method.routing_key} process", tracer=tracer):
        pass
    [consumer] = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.CONSUMER]
    assert consumer.context.trace_id == request_span.get_span_context().trace_id
    assert consumer.parent.span_id == request_span.get_span_context().span_id
{%- endif %}

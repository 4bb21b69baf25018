"""The RabbitMQ transport against a real broker (TEST_AMQP_URL).

Connection failures are made with a local TCP proxy between the relay and
the broker: cutting its connections is a broker outage as the relay sees
it, without stopping a RabbitMQ that other users share.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from sqlalchemy import func, select

from app.events import processor
from app.extensions import db
from common_utils.outbox import FAILED, PENDING, PROCESSED, OutboxEvent
from common_utils.outbox.rabbitmq import (
    PublishNacked,
    PublishRejected,
    PublishReturned,
    RabbitMQTransport,
)
from common_utils.outbox.transport import SKIPPED, TransportUnavailable
from tests.conftest import skip_or_fail
from tests.outbox_support import (
    Launcher,
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
    """A queue bound to the test's exchange (everything, unless told), read with basic_get.

    `arguments` are the queue's x-arguments: a max length with overflow
    reject-publish makes the broker nack what does not fit.
    """

    def __init__(self, url: str, exchange: str, binding: str = "#", arguments: dict | None = None):
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, "topic", durable=True)
        self.name = self.channel.queue_declare("", exclusive=True, arguments=arguments).method.queue
        self.channel.queue_bind(self.name, exchange, binding)

    def count(self) -> int:
        return self.channel.queue_declare(self.name, passive=True).method.message_count

    def drain(self, at_least: int = 0, timeout: float = 20.0, limit: int | None = None) -> list[tuple]:
        """Every message now in the queue (waiting for `at_least` of them; at most `limit`), as (method, properties, body)."""
        messages = []
        deadline = time.monotonic() + timeout
        while limit is None or len(messages) < limit:
            method, properties, body = self.channel.basic_get(self.name, auto_ack=True)
            if method is not None:
                messages.append((method, properties, body))
                continue
            if len(messages) >= at_least or time.monotonic() > deadline:
                return messages
            self.connection.sleep(0.05)
        return messages

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()


@pytest.fixture
def exchange(amqp_url):
    """The test's own exchange, deleted afterwards."""
    name = f"outbox-test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(pika.exceptions.AMQPError):
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().exchange_delete(name)
        connection.close()


@pytest.fixture
def queue(amqp_url, exchange):
    bound = BoundQueue(amqp_url, exchange)
    yield bound
    bound.close()


@pytest.fixture
def transport(amqp_url, exchange):
    """Build RabbitMQ transports on the test's exchange, used without a relay; closed after."""
    built = []

    def build(**options) -> RabbitMQTransport:
        built.append(RabbitMQTransport(amqp_url, exchange=exchange, app_id="outbox-test", **{"confirm_timeout": 10.0, **options}))
        return built[-1]

    yield build
    for made in built:
        made.close()


def event_row(aggregate_id: str, seq: int, *, event_type: str = "test.happened", payload: str | None = None, headers: dict | None = None):
    """An outbox row as the relay hands it to a transport."""
    return SimpleNamespace(
        position=seq,
        id=str(uuid.uuid4()),
        event_type=event_type,
        aggregate_type="test",
        aggregate_id=aggregate_id,
        ordering_key=f"test:{aggregate_id}",
        payload=payload if payload is not None else json.dumps({"seq": seq, "aggregate": aggregate_id}),
        headers=json.dumps(headers) if headers else None,
        created_at=datetime.now(UTC),
        retry_count=0,
    )


def publish_until_settled(publisher: RabbitMQTransport, rows: list, rounds: int) -> dict:
    """Publish as the relay does: rows left unsettled (unavailable, skipped) go again, up to `rounds` times."""
    outcomes: dict = {}
    for _ in range(rounds):
        waiting = [row for row in rows if row.id not in outcomes]
        if not waiting:
            break
        for row, result in zip(waiting, publisher.publish(waiting), strict=True):
            if result is not SKIPPED and not isinstance(result, TransportUnavailable):
                outcomes[row.id] = result
    return outcomes


def hold_back_confirms(publisher: RabbitMQTransport, per_channel: int) -> None:
    """Let through the broker's confirms of each channel's first `per_channel` messages only: slow confirms."""
    on_confirm = publisher._on_confirm

    def slow(frame) -> None:
        method = frame.method
        if method.delivery_tag > per_channel:
            if not method.multiple:
                return
            frame = pika.frame.Method(frame.channel_number, type(method)(delivery_tag=per_channel, multiple=True))
        on_confirm(frame)

    publisher._on_confirm = slow  # before the first publish: the channel is opened with it


def rabbitmqctl(*arguments: str) -> str:
    """Run rabbitmqctl (TEST_RABBITMQCTL, e.g. `docker exec <container> rabbitmqctl` in CI)."""
    command = [*shlex.split(os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl")), *arguments]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        skip_or_fail(f"{shlex.join(command)} failed (set TEST_RABBITMQCTL): {error}")


def broker_max_message_size() -> int:
    output = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).")
    match = re.search(r"\{ok,\s*(\d+)\}", output)
    if not match:
        skip_or_fail(f"cannot read the broker's max_message_size from {output!r}")
    return int(match.group(1))


def failed_attempts(app, error: str) -> int:
    """Pending events whose last attempt failed with `error` in its message."""
    with app.app_context():
        return db.session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .where(OutboxEvent.status == PENDING, OutboxEvent.error.contains(error))
        )


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
    """Cut every broker connection twice while events flow: all arrive, in order, backlog drains.

    Each cut comes once the relay is publishing what was written before it,
    and the next events are written while the broker refuses connections,
    so the relay meets a broker that is away with a backlog behind it.
    """
    flowing = rabbit_app(proxy.url(amqp_url), OUTBOX_BATCH_SIZE=50)
    aggregates, per_phase, phases = 20, 10, 4
    per_written = aggregates * per_phase

    def processed() -> int:
        with flowing.app_context():
            return db.session.scalar(select(func.count()).where(OutboxEvent.status == PROCESSED))

    stop = run_relays(flowing, 1)
    try:
        write_streams(flowing, aggregates, per_phase, per_transaction=5)
        for cut in range(2):
            wait_until(lambda cut=cut: processed() >= cut * per_written + 50, timeout=30, what="the relay to publish")
            proxy.refusing.set()
            proxy.cut()
            write_streams(flowing, aggregates, per_phase, per_transaction=5, first_seq=(cut + 1) * per_phase)
            assert count_pending(flowing) >= per_written  # written while the broker is away, waiting for it
            proxy.refusing.clear()
        write_streams(flowing, aggregates, per_phase, per_transaction=5, first_seq=3 * per_phase)
        wait_until(lambda: count_pending(flowing) == 0, timeout=60, what="the backlog to drain")
    finally:
        stop()
    delivered = deliveries(queue.drain(at_least=phases * per_written))
    first_deliveries_in_order(delivered, [f"agg-{index:04d}" for index in range(aggregates)], phases * per_phase)
    duplicated = len(delivered) - len({message_id for _, _, message_id in delivered})
    assert duplicated <= 2 * 50  # at most the batch in flight at each cut


def test_relays_publish_each_event_once_in_aggregate_order(rabbit_app, queue, app):
    """Four relays (one on SQLite) publish every event exactly once, each aggregate in commit order."""
    with app.app_context():
        relays = 4 if db.engine.dialect.name != "sqlite" else 1
    publishing = rabbit_app(OUTBOX_BATCH_SIZE=100)
    stop = run_relays(publishing, relays)
    try:
        aggregates = write_streams(publishing, 40, 15, writers=2, per_transaction=20)
        wait_until(lambda: count_pending(publishing) == 0, timeout=60, what="the backlog to drain")
    finally:
        stop()
    delivered = deliveries(queue.drain(at_least=600))
    assert len(delivered) == 600
    assert len({message_id for _, _, message_id in delivered}) == 600
    first_deliveries_in_order(delivered, aggregates, 15)


def test_an_event_no_queue_is_bound_for_is_not_marked_processed(rabbit_app, collection_url, new_item):
    """Published mandatory: the broker returns an unroutable event, which counts as a failed attempt."""
    published = rabbit_app()  # its exchange has no queue bound
    assert published.test_client().post(collection_url, json=new_item).status_code == 201
    with published.app_context():
        assert processor.process_pending_events() == 0
        event = db.session.scalars(db.select(OutboxEvent)).one()
    assert (event.status, event.retry_count) == (PENDING, 1)
    assert "PublishReturned: no queue is bound for routing key" in event.error


def test_a_confirm_timeout_keeps_the_confirms_received_before_it(transport, queue):
    """Slow confirms: what was confirmed before the timeout stays done; only the rest is published again."""
    publisher = transport(confirm_timeout=1.0)
    hold_back_confirms(publisher, per_channel=250)
    rows = [event_row(f"agg-{index:04d}", 0) for index in range(500)]
    results = publisher.publish(rows)
    assert results[:250] == [None] * 250
    assert all(isinstance(result, TransportUnavailable) for result in results[250:])
    outcomes = publish_until_settled(publisher, rows[250:], rounds=3)  # a new channel: 250 confirms again
    assert list(outcomes.values()) == [None] * 250
    messages = queue.drain(at_least=750)
    assert len({properties.message_id for _, properties, _ in messages}) == 500
    assert len(messages) == 750  # each event once, plus once more the 250 left unconfirmed


def test_a_header_the_client_cannot_encode_is_that_events_failure(rabbit_app, queue):
    """A header key over 255 bytes: the event fails (here dead-lettered at once), the others are published."""
    published = rabbit_app(OUTBOX_MAX_RETRY=1)
    with published.app_context():
        bad = OutboxEvent.create_event(db.session, "test.happened", "test", "agg-bad", {"seq": 0}, headers={"k" * 300: "v"})
        good = OutboxEvent.create_event(db.session, "test.happened", "test", "agg-good", {"seq": 0})
        db.session.commit()
        bad_id, good_id = bad.id, good.id
        assert processor.process_pending_events() == 1
        db.session.rollback()  # a fresh snapshot (MySQL reads repeatably within a transaction)
        events = {event.id: event for event in db.session.scalars(db.select(OutboxEvent))}
    assert events[good_id].status == PROCESSED
    assert (events[bad_id].status, events[bad_id].retry_count) == (FAILED, 1)
    assert "ShortStringTooLong" in events[bad_id].error
    assert [properties.message_id for _, properties, _ in queue.drain(at_least=1)] == [good_id]


def test_a_nacked_event_is_that_events_failure(transport, amqp_url, exchange):
    """A queue that is full (max-length, overflow reject-publish) nacks: a failed attempt, not an outage."""
    full = BoundQueue(amqp_url, exchange, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    try:
        results = transport().publish([event_row("agg-a", 0), event_row("agg-b", 0), event_row("agg-c", 0)])
    finally:
        full.close()
    assert results[0] is None
    assert all(isinstance(result, PublishNacked) for result in results[1:])


def test_a_message_over_the_brokers_max_size_is_that_events_failure(transport, queue):
    """The broker closes the channel over one message: that event fails, the rest of the batch goes through."""
    too_big = "x" * (broker_max_message_size() + 1)
    rows = [event_row("agg-a", 0), event_row("agg-b", 0, payload=too_big), event_row("agg-c", 0)]
    outcomes = publish_until_settled(transport(), rows, rounds=4)
    assert outcomes[rows[0].id] is None
    assert isinstance(outcomes[rows[1].id], PublishRejected)
    assert outcomes[rows[2].id] is None
    assert {properties.message_id for _, properties, _ in queue.drain(at_least=2)} == {rows[0].id, rows[2].id}


def test_a_suspect_event_is_published_alone_even_with_several_relay_workers(transport, queue):
    """While a suspect (in flight at a channel error) is retried, another worker's batch waits its turn.

    Otherwise each channel error would find several events in flight and
    never the one at fault (the relay runs OUTBOX_RELAY_WORKERS batches at once).
    """
    publisher = transport(confirm_timeout=1.0)
    hold_back_confirms(publisher, per_channel=0)  # the suspect stays in flight until the timeout
    suspect, other = event_row("agg-a", 0), event_row("agg-b", 0)
    publisher._suspects[suspect.id] = None  # as after a channel error with it in flight
    isolating = threading.Thread(target=publisher.publish, args=([suspect],))
    isolating.start()
    wait_until(lambda: queue.count() == 1, timeout=10, what="the suspect to reach the broker")
    [result] = publisher.publish([other])
    isolating.join()
    assert result is SKIPPED or isinstance(result, TransportUnavailable)
    assert [properties.message_id for _, properties, _ in queue.drain()] == [suspect.id]


def test_a_suspect_waiting_for_the_channel_is_not_overtaken_by_new_batches(transport, queue):
    """Once a suspect waits for the channel to empty, other workers' new batches wait too (no starvation)."""
    publisher = transport(confirm_timeout=1.0)
    hold_back_confirms(publisher, per_channel=0)  # every batch stays in flight until its timeout
    first, suspect, later = event_row("agg-a", 0), event_row("agg-b", 0), event_row("agg-c", 0)
    publisher._suspects[suspect.id] = None
    in_flight = threading.Thread(target=publisher.publish, args=([first],))
    in_flight.start()
    wait_until(lambda: queue.count() == 1, timeout=10, what="the first batch to reach the broker")
    isolating = threading.Thread(target=publisher.publish, args=([suspect],))
    isolating.start()
    wait_until(lambda: len(publisher._gate._waiters) == 1, timeout=10, what="the suspect to wait for the channel")
    [result] = publisher.publish([later])
    in_flight.join()
    isolating.join()
    assert result is SKIPPED or isinstance(result, TransportUnavailable)
    assert later.id not in {properties.message_id for _, properties, _ in queue.drain()}


def test_after_an_event_fails_its_keys_later_events_in_the_batch_are_not_published(transport, amqp_url, exchange):
    """A returned event holds back the later events of its key (SKIPPED); other keys go on."""
    bound = BoundQueue(amqp_url, exchange, binding="bound.#")
    try:
        first = event_row("agg-a", 0, event_type="unbound.created")
        second = event_row("agg-a", 1, event_type="bound.updated")
        other = event_row("agg-b", 0, event_type="bound.updated")
        results = transport().publish([first, second, other])
        assert isinstance(results[0], PublishReturned)
        assert results[1] is SKIPPED
        assert results[2] is None
        assert [properties.message_id for _, properties, _ in bound.drain(at_least=1)] == [other.id]
    finally:
        bound.close()


def test_relay_processes_under_returns_nacks_and_a_kill_lose_nothing_and_keep_each_keys_order(make_app, amqp_url, exchange, database_url, tmp_path):
    """Two `flask outbox relay` processes (two workers each) against a hostile broker.

    First no queue is bound (returns), then one that holds 40 messages and
    nacks the rest (reject-publish). The first relay publishes alone for a
    while, so what arrives then is its own; the second joins, and the first
    is killed with SIGKILL while events are still to come, and replaced.
    Every event arrives, and each aggregate's events first arrive in commit
    order. Duplicates are counted, not bounded: besides the killed relay's
    batches in flight, a confirm later than OUTBOX_PUBLISH_TIMEOUT (a relay
    starved of CPU) has its batch published again, as it should.

    The relays are forked from one launcher that imported the service
    (see Launcher): a restart costs a fork, and the test waits only on conditions.
    """
    batch, workers, aggregates_count, per_aggregate = 50, 2, 20, 15
    total = aggregates_count * per_aggregate
    env = subprocess_env(
        database_url,
        OUTBOX_TRANSPORT="rabbitmq",
        AMQP_URL=amqp_url,
        OUTBOX_EXCHANGE=exchange,
        OUTBOX_BATCH_SIZE=str(batch),
        OUTBOX_RELAY_WORKERS=str(workers),
        OUTBOX_MAX_RETRY="1000",
        OUTBOX_BACKOFF_BASE="0.02",
        OUTBOX_BACKOFF_MAX="0.1",
        OUTBOX_MIN_POLL_INTERVAL="0.01",
        OUTBOX_PROCESSING_INTERVAL="0.05",
        OUTBOX_PUBLISH_TIMEOUT="1",
        # How long the killed relay's batches wait. A live batch takes
        # milliseconds here, at worst a 1 s connect wait and a 1 s confirm
        # wait; one that outlives its lease (a relay starved of CPU) is
        # published again by another relay, a duplicate, not a loss.
        OUTBOX_LEASE_SECONDS="2",
    )
    launcher = Launcher(tmp_path, env)  # imports the service while the events are written
    bounded = None
    delivered: list[tuple[str, int, str]] = []

    def unique() -> int:
        return len({message_id for _, _, message_id in delivered})

    def arrived(count: int) -> bool:
        """Take up to `count` distinct events off the queue (no more: the rest stays in flight)."""
        delivered.extend(deliveries(bounded.drain(limit=max(1, count - unique()))))
        return unique() >= count

    try:
        writer = make_app()
        aggregates = write_streams(writer, aggregates_count, per_aggregate, per_transaction=20)
        first = launcher.start()
        wait_until(lambda: failed_attempts(writer, "PublishReturned"), timeout=60, what="the broker to return events")
        bounded = BoundQueue(amqp_url, exchange, arguments={"x-max-length": 40, "x-overflow": "reject-publish"})
        wait_until(lambda: arrived(20), timeout=60, what="the first relay's events to arrive")
        second = launcher.start()
        wait_until(lambda: failed_attempts(writer, "PublishNacked"), timeout=60, what="the broker to nack events")
        wait_until(lambda: arrived(100), timeout=60, what="100 events to arrive")
        assert launcher.stop(first, signal.SIGKILL) == -signal.SIGKILL, "the relay had exited by itself"
        assert unique() + bounded.count() < total, "the kill landed after every event reached the broker"
        replacement = launcher.start()
        wait_until(lambda: arrived(total), timeout=60, what="every event to arrive")
        assert [launcher.poll(relay) for relay in (second, replacement)] == [None, None], "a relay exited by itself"
    finally:
        launcher.close()  # what arrived is recorded; a graceful stop would only cost time
        if bounded is not None:
            bounded.close()
    first_deliveries_in_order(delivered, aggregates, per_aggregate)
    print(f"\nrelay processes: {total} events, 0 lost, {len(delivered) - unique()} arrived again")


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

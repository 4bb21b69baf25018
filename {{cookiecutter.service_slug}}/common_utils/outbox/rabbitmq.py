"""The outbox's RabbitMQ transport: pika, a topic exchange, publisher confirms.

Every event goes to the durable topic exchange named after the service
(OUTBOX_EXCHANGE, default SERVICE_NAME) with the event type as routing key,
the event id as AMQP message id and the W3C trace context of the request
that wrote it in the headers. A batch is published in one go and the relay
waits for the broker's confirms: an event is marked processed only once
the broker has acknowledged it.

pika's BlockingConnection waits for each confirm before the next publish,
which caps a relay at one round trip per event; this transport instead
runs a SelectConnection in its own I/O thread and pipelines the batch.
When the broker is unreachable the I/O thread reconnects with backoff and
`publish` raises TransportUnavailable, which leaves the events pending.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import pika
from pika.exceptions import AMQPError
from pika.spec import Basic

from common_utils.outbox.transport import TransportUnavailable

logger = logging.getLogger(__name__)
# pika logs every failed connection attempt at ERROR, several lines each; this
# transport logs one WARNING per attempt instead. Set a level on "pika" to see its own.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)

PROBE_CACHE_SECONDS = 10.0


class PublishNacked(Exception):
    """The broker refused the message (a negative acknowledgement); it is retried."""


class _Batch:
    """Results of one published batch, filled in by the I/O thread."""

    def __init__(self, rows: list):
        self.rows = rows
        self.results: list[Any] = [None] * len(rows)
        self.remaining = len(rows)
        self.done = threading.Event()
        if not rows:
            self.done.set()

    def resolve(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


class RabbitMQTransport:
    name = "rabbitmq"

    def __init__(
        self,
        url: str,
        *,
        exchange: str,
        app_id: str,
        confirm_timeout: float = 10.0,
        connect_wait: float = 5.0,
    ):
        self.url = url
        self.exchange = exchange
        self.app_id = app_id
        self.confirm_timeout = confirm_timeout
        self.connect_wait = connect_wait
        self.parameters = pika.URLParameters(url)
        if "socket_timeout" not in url:
            self.parameters.socket_timeout = 5
        if "blocked_connection_timeout" not in url:
            # A broker that blocks publishers (disk or memory alarm) for this
            # long gets the connection closed and reopened.
            self.parameters.blocked_connection_timeout = 30
        self.parameters.connection_attempts = 1
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._delivery_tag = 0
        self._outstanding: OrderedDict[int, tuple[_Batch, int]] = OrderedDict()
        # Batches handed to the I/O loop that it has not started publishing yet.
        self._queued: set[_Batch] = set()
        self._queued_lock = threading.Lock()
        self._probe: tuple[float, dict | Exception] | None = None

    # -- called by the relay ------------------------------------------------

    def publish(self, rows: list) -> list:
        """Publish `rows` and wait for their confirms; per row None (confirmed) or an error."""
        self._ensure_started()
        if not self._ready.wait(self.connect_wait):
            raise TransportUnavailable(f"RabbitMQ not connected: {self.last_error or 'connecting'}")
        batch = _Batch(rows)
        with self._queued_lock:
            self._queued.add(batch)
        connection = self._connection
        try:
            connection.ioloop.add_callback_threadsafe(lambda: self._publish(batch))
        except Exception as error:  # the loop closed under us: the batch waits
            raise TransportUnavailable(f"RabbitMQ connection closing: {error}") from error
        if not batch.done.wait(self.confirm_timeout):
            self._call_in_loop(lambda: self._drop_connection("no confirms in time"))
            raise TransportUnavailable(f"RabbitMQ did not confirm within {self.confirm_timeout:g}s")
        return batch.results

    def status(self) -> dict:
        """Connection state for /health/ready; raises when the broker is unreachable."""
        details = {"transport": self.name, "exchange": self.exchange}
        if self._thread is not None and self._thread.is_alive():
            if not self._ready.is_set():
                raise ConnectionError(f"RabbitMQ not connected: {self.last_error or 'connecting'}")
            return {**details, "connected": True, "connected_for_seconds": round(time.monotonic() - self.connected_since, 1)}
        return {**details, **self._probe_broker()}

    def close(self) -> None:
        self._stopping.set()
        self._call_in_loop(self._close_connection)
        if self._thread is not None:
            self._thread.join(5.0)

    # -- the I/O thread -------------------------------------------------------

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="outbox-rabbitmq", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            self.connected_since = None
            try:
                self._connection = pika.SelectConnection(
                    self.parameters,
                    on_open_callback=self._on_connection_open,
                    on_open_error_callback=self._on_open_error,
                    on_close_callback=self._on_connection_closed,
                )
                self._connection.ioloop.start()
            except Exception as error:  # never let the I/O thread die
                self.last_error = f"{type(error).__name__}: {error}"
                logger.warning("RabbitMQ I/O loop failed: %s", self.last_error)
            self._ready.clear()
            error = TransportUnavailable(self.last_error or "connection closed")
            self._fail_outstanding(error)
            with self._queued_lock:
                queued, self._queued = self._queued, set()
            for batch in queued:  # handed over as the loop stopped: never published
                for index in range(len(batch.rows)):
                    batch.resolve(index, error)
            if self._stopping.is_set():
                break
            if self.connected_since is not None:
                delay = 0.5
            logger.warning("RabbitMQ unavailable (%s); reconnecting in %.1fs", self.last_error, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, 30.0)

    def _call_in_loop(self, callback) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # the loop is already gone
                connection.ioloop.add_callback_threadsafe(callback)

    def _on_connection_open(self, connection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, connection, error) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        connection.ioloop.stop()

    def _on_connection_closed(self, connection, reason) -> None:
        if not self._stopping.is_set():
            self.last_error = f"{type(reason).__name__}: {reason}"
        self._channel = None
        self._ready.clear()
        connection.ioloop.stop()

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.exchange_declare(
            exchange=self.exchange, exchange_type="topic", durable=True, callback=self._on_exchange_ok
        )

    def _on_exchange_ok(self, _frame) -> None:
        self._delivery_tag = 0
        self._channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame) -> None:
        self.last_error = None
        self.connected_since = time.monotonic()
        self._ready.set()
        logger.info("RabbitMQ connected; publishing to exchange %r with confirms", self.exchange)

    def _on_channel_closed(self, channel, reason) -> None:
        self.last_error = f"channel closed: {reason}"
        self._ready.clear()
        self._fail_outstanding(TransportUnavailable(self.last_error))
        self._close_connection()

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()

    def _drop_connection(self, why: str) -> None:
        self.last_error = why
        self._close_connection()

    def _publish(self, batch: _Batch) -> None:
        with self._queued_lock:
            if batch not in self._queued:
                return  # already failed by a loop that stopped
            self._queued.discard(batch)
        channel = self._channel
        for index, row in enumerate(batch.rows):
            if channel is None or not channel.is_open or not self._ready.is_set():
                batch.resolve(index, TransportUnavailable(self.last_error or "channel closed"))
                continue
            try:
                channel.basic_publish(
                    exchange=self.exchange,
                    routing_key=row.event_type,
                    body=row.payload.encode(),
                    properties=self.properties(row),
                )
            except AMQPError as error:
                batch.resolve(index, TransportUnavailable(f"{type(error).__name__}: {error}"))
                continue
            self._delivery_tag += 1
            self._outstanding[self._delivery_tag] = (batch, index)

    def properties(self, row) -> pika.BasicProperties:
        headers = json.loads(row.headers) if row.headers else {}
        headers.update(aggregate_type=row.aggregate_type, aggregate_id=row.aggregate_id)
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=row.id,
            type=row.event_type,
            app_id=self.app_id,
            timestamp=int(row.created_at.timestamp()),
            headers=headers,
        )

    def _on_confirm(self, frame) -> None:
        method = frame.method
        result = None if isinstance(method, Basic.Ack) else PublishNacked("the broker nacked the message")
        if method.multiple:
            while self._outstanding and next(iter(self._outstanding)) <= method.delivery_tag:
                _, (batch, index) = self._outstanding.popitem(last=False)
                batch.resolve(index, result)
        else:
            entry = self._outstanding.pop(method.delivery_tag, None)
            if entry is not None:
                entry[0].resolve(entry[1], result)

    def _fail_outstanding(self, error: Exception) -> None:
        while self._outstanding:
            _, (batch, index) = self._outstanding.popitem(last=False)
            batch.resolve(index, error)

    # -- readiness without a running relay ------------------------------------

    def _probe_broker(self) -> dict:
        """Connect once (cached for a few seconds) when no relay runs in this process."""
        now = time.monotonic()
        if self._probe is None or now - self._probe[0] > PROBE_CACHE_SECONDS:
            parameters = pika.URLParameters(self.url)
            parameters.connection_attempts = 1
            parameters.socket_timeout = 2
            parameters.stack_timeout = 3
            try:
                connection = pika.BlockingConnection(parameters)
                connection.close()
                outcome: dict | Exception = {"connected": True, "probe": True}
            except Exception as error:  # reported as down by the readiness check
                outcome = ConnectionError(f"RabbitMQ unreachable: {type(error).__name__}: {error}")
            self._probe = (now, outcome)
        outcome = self._probe[1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

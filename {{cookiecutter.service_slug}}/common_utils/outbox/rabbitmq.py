"""The outbox's RabbitMQ transport: pika, a topic exchange, publisher confirms.

Every event goes to the durable topic exchange named after the service
(OUTBOX_EXCHANGE, default SERVICE_NAME) with the event type as routing key,
the event id as AMQP message id and the W3C trace context of the request
that wrote it in the headers. An event is marked processed only once the
broker has confirmed it, and never when the broker could not deliver it:

- Unroutable: events are published `mandatory`, so an event that no queue
  is bound for comes back (basic.return) and counts as a failed attempt
  instead of vanishing.
- Rejected: a nack, a message the client cannot encode (a header key over
  255 bytes) or one the broker closes the channel over (a payload over its
  max_message_size) is that event's failure, counted toward its retries
  and dead letter. When the broker closes the channel with several events
  in flight, those events are retried one at a time, so the one at fault
  is found and the others go through.
- Unavailable: only a lost connection, or no confirm within
  OUTBOX_PUBLISH_TIMEOUT, is TransportUnavailable (the batch waits, no
  retry counted). Confirms received before that are kept, so only the
  unconfirmed events are published again.
- Order: events of one ordering key are published one after the other,
  the next once the previous one is confirmed, and after a failure the
  key's later events in the batch are not published (SKIPPED), so they
  cannot overtake it. Different keys are pipelined.

pika's BlockingConnection waits for each confirm before the next publish;
this transport runs a SelectConnection in its own I/O thread instead. When
the broker is unreachable that thread reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelClosedByBroker
from pika.spec import Basic

from common_utils.outbox.transport import SKIPPED, TransportUnavailable

logger = logging.getLogger(__name__)
# pika logs every failed connection attempt at ERROR, several lines each; this
# transport logs one WARNING per attempt instead. Set a level on "pika" to see its own.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)

PROBE_CACHE_SECONDS = 10.0
# Channel errors a single message causes (PRECONDITION_FAILED, e.g. over
# max_message_size; CONTENT_TOO_LARGE). Others (ACCESS_REFUSED, NOT_FOUND)
# come from the broker's set-up and are an outage, not an event's fault.
MESSAGE_REPLY_CODES = frozenset({311, 406})
MAX_SUSPECTS = 10_000
UNSET = object()


class PublishNacked(Exception):
    """The broker refused the message (basic.nack, e.g. a full queue with overflow reject-publish)."""


class PublishReturned(Exception):
    """No queue is bound for the event's routing key: the broker returned it (basic.return)."""


class PublishRejected(Exception):
    """The message itself is at fault: the client cannot encode it, or the broker closed the channel over it."""


class _Batch:
    """One `publish` call: its rows, their results, and the rows waiting for their key's turn.

    Rows wait in lanes: one lane per ordering key (a key's next event goes
    out once its previous one is confirmed), or a single lane when the
    batch holds an event under suspicion (one event in flight at a time).
    """

    def __init__(self, rows: list, *, one_at_a_time: bool):
        self.rows = rows
        self.one_at_a_time = one_at_a_time
        self.results: list[Any] = [UNSET] * len(rows)
        self.remaining = len(rows)
        self.done = threading.Event()
        self.closed = False
        self.lock = threading.Lock()
        self.lanes: dict[Any, deque[int]] = {}
        for index, row in enumerate(rows):
            self.lanes.setdefault(None if one_at_a_time else row.ordering_key, deque()).append(index)
        # Keys with a failed event: their later events get this outcome, unpublished.
        self.blocked: dict[str, Any] = {}
        if not rows:
            self.done.set()

    def resolve(self, index: int, result: Any) -> None:
        with self.lock:
            if self.closed or self.results[index] is not UNSET:
                return
            self.results[index] = result
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail_rest(self, error: Exception) -> None:
        for index in range(len(self.rows)):
            self.resolve(index, error)

    def close(self, error: Exception) -> list:
        """Stop taking results; rows without one get `error`. Results received so far are kept."""
        with self.lock:
            self.closed = True
            return [error if result is UNSET else result for result in self.results]


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
        # The I/O thread's bookkeeping, touched only by that thread.
        self._delivery_tag = 0
        self._outstanding: OrderedDict[int, tuple[_Batch, int, Any]] = OrderedDict()
        self._tags_by_id: dict[str, int] = {}
        self._returned: dict[int, str] = {}
        self._active: set[_Batch] = set()
        # Events in flight when the broker closed the channel over a message:
        # published one at a time, and nothing else meanwhile, until the one at
        # fault is found (with several relay workers sharing this transport).
        self._suspects: OrderedDict[str, None] = OrderedDict()
        self._gate = threading.Condition()
        self._publishing = 0
        self._isolating = False
        self._isolators_waiting = 0
        # Batches handed to the I/O loop that it has not started publishing yet.
        self._queued: set[_Batch] = set()
        self._queued_lock = threading.Lock()
        self._probe: tuple[float, dict | Exception] | None = None

    # -- called by the relay ------------------------------------------------

    def publish(self, rows: list) -> list:
        """Publish `rows` and wait for their confirms; one outcome per row (see the module docstring)."""
        self._ensure_started()
        if not self._ready.wait(self.connect_wait):
            raise TransportUnavailable(f"RabbitMQ not connected: {self.last_error or 'connecting'}")
        isolating = any(row.id in self._suspects for row in rows)
        if not self._enter(isolating):
            return [SKIPPED] * len(rows)  # another relay worker is isolating a suspect: next time
        try:
            return self._publish_batch(_Batch(rows, one_at_a_time=isolating))
        finally:
            self._leave(isolating)

    def _enter(self, isolating: bool) -> bool:
        """A batch with a suspect is published alone; the others share the channel."""
        with self._gate:
            if isolating:
                self._isolators_waiting += 1  # new batches wait, so the ones in flight drain
                try:
                    entered = self._gate.wait_for(lambda: not self._isolating and not self._publishing, self.confirm_timeout)
                finally:
                    self._isolators_waiting -= 1
                    self._gate.notify_all()  # after a give-up the others go on
                self._isolating = entered
            else:
                entered = self._gate.wait_for(lambda: not (self._isolating or self._isolators_waiting), self.confirm_timeout)
            if entered:
                self._publishing += 1
            return entered

    def _leave(self, isolating: bool) -> None:
        with self._gate:
            self._publishing -= 1
            if isolating:
                self._isolating = False
            self._gate.notify_all()

    def _publish_batch(self, batch: _Batch) -> list:
        with self._queued_lock:
            self._queued.add(batch)
        connection = self._connection
        try:
            connection.ioloop.add_callback_threadsafe(lambda: self._start_batch(batch))
        except Exception as error:  # the loop closed under us: the batch waits
            raise TransportUnavailable(f"RabbitMQ connection closing: {error}") from error
        if not batch.done.wait(self.confirm_timeout):
            self._ready.clear()  # the next batch waits for a new connection
            self._call_in_loop(lambda: self._drop_connection("no confirms in time"))
        # After a timeout the events confirmed so far stay confirmed; only the others are published again.
        return batch.close(TransportUnavailable(f"RabbitMQ did not confirm within {self.confirm_timeout:g}s"))

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
            self._fail_in_flight(error)
            with self._queued_lock:
                queued, self._queued = self._queued, set()
            for batch in queued:  # handed over as the loop stopped: never published
                batch.fail_rest(error)
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
        channel.add_on_return_callback(self._on_return)
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
        if isinstance(reason, ChannelClosedByBroker) and reason.reply_code in MESSAGE_REPLY_CODES:
            self._blame(reason)
        self._fail_in_flight(TransportUnavailable(self.last_error))
        self._close_connection()

    def _blame(self, reason: ChannelClosedByBroker) -> None:
        """The broker closed the channel over a message: find which one."""
        in_flight = list(self._outstanding.values())
        if len(in_flight) == 1 and in_flight[0][0].one_at_a_time:
            batch, index, _ = in_flight[0]  # published alone: it is the one
            row = batch.rows[index]
            self._suspects.pop(row.id, None)
            logger.warning("RabbitMQ rejected outbox event %s: %s", row.id, reason)
            batch.resolve(index, PublishRejected(f"the broker closed the channel over this message: {reason}"))
            return
        for batch, index, _ in in_flight:
            self._suspects[batch.rows[index].id] = None
        while len(self._suspects) > MAX_SUSPECTS:
            self._suspects.popitem(last=False)
        logger.warning("RabbitMQ closed the channel (%s); retrying %d event(s) one at a time", reason, len(in_flight))

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()

    def _drop_connection(self, why: str) -> None:
        self.last_error = why
        self._close_connection()

    def _start_batch(self, batch: _Batch) -> None:
        with self._queued_lock:
            if batch not in self._queued:
                return  # already failed by a loop that stopped
            self._queued.discard(batch)
        self._active.add(batch)
        for lane in list(batch.lanes):
            self._advance(batch, lane)
        self._forget_if_done(batch)

    def _advance(self, batch: _Batch, lane) -> None:
        """Publish the lane's next event, or settle events that must not go out."""
        queue = batch.lanes[lane]
        while queue and not batch.closed:
            index = queue.popleft()
            row = batch.rows[index]
            if row.ordering_key in batch.blocked:
                batch.resolve(index, batch.blocked[row.ordering_key])
                continue
            error = self._send(batch, index, lane)
            if error is None:
                return  # in flight: its confirm advances the lane
            self._settle(batch, index, error)

    def _settle(self, batch: _Batch, index: int, result: Any) -> None:
        batch.resolve(index, result)
        if result is not None:
            key = batch.rows[index].ordering_key
            batch.blocked[key] = result if isinstance(result, TransportUnavailable) else SKIPPED

    def _send(self, batch: _Batch, index: int, lane) -> Exception | None:
        """Publish one event; None once it is in flight, else the reason it was not sent."""
        row = batch.rows[index]
        channel = self._channel
        if channel is None or not channel.is_open or not self._ready.is_set():
            return TransportUnavailable(self.last_error or "channel closed")
        try:
            properties = self.properties(row)
            channel.basic_publish(
                exchange=self.exchange,
                routing_key=row.event_type,
                body=row.payload.encode(),
                properties=properties,
                mandatory=True,
            )
        except (AMQPConnectionError, AMQPChannelError) as error:
            return TransportUnavailable(f"{type(error).__name__}: {error}")
        except Exception as error:  # pika encodes a message before sending any of it
            return PublishRejected(f"the message cannot be encoded: {type(error).__name__}: {error}")
        self._delivery_tag += 1
        self._outstanding[self._delivery_tag] = (batch, index, lane)
        self._tags_by_id[row.id] = self._delivery_tag
        return None

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

    def _on_return(self, _channel, method, properties, _body) -> None:
        """basic.return comes before the confirm of the same message: remember it for the confirm."""
        tag = self._tags_by_id.get(properties.message_id)
        if tag is not None:
            self._returned[tag] = f"{method.reply_code} {method.reply_text}"

    def _on_confirm(self, frame) -> None:
        method = frame.method
        if method.multiple:
            while self._outstanding and (tag := next(iter(self._outstanding))) <= method.delivery_tag:
                self._confirmed(tag, method)
        else:
            self._confirmed(method.delivery_tag, method)

    def _confirmed(self, tag: int, method) -> None:
        entry = self._outstanding.pop(tag, None)
        if entry is None:
            return
        batch, index, lane = entry
        row = batch.rows[index]
        if self._tags_by_id.get(row.id) == tag:
            del self._tags_by_id[row.id]
        returned = self._returned.pop(tag, None)
        if isinstance(method, Basic.Nack):
            result: Exception | None = PublishNacked("the broker nacked the message")
        elif returned is not None:
            result = PublishReturned(f"no queue is bound for routing key {row.event_type!r} on exchange {self.exchange!r}: {returned}")
        else:
            result = None
            self._suspects.pop(row.id, None)
        self._settle(batch, index, result)
        self._advance(batch, lane)
        self._forget_if_done(batch)

    def _forget_if_done(self, batch: _Batch) -> None:
        if batch.done.is_set() or batch.closed:
            self._active.discard(batch)

    def _fail_in_flight(self, error: Exception) -> None:
        """The channel is gone: every event not yet settled gets `error` (confirmed ones keep theirs)."""
        self._outstanding.clear()
        self._tags_by_id.clear()
        self._returned.clear()
        active, self._active = self._active, set()
        for batch in active:
            batch.fail_rest(error)

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

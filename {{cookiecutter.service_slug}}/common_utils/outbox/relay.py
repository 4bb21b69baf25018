"""The outbox relay: claims pending events, publishes them, marks them processed.

How it stays correct with several relays and crashes:

- Claim. One statement takes the oldest due events, `FOR UPDATE SKIP
  LOCKED` on PostgreSQL and MySQL/MariaDB, so relays never take the same
  rows. The rows stay locked while the batch is published and are marked
  in the same transaction: a relay that dies mid-batch leaves them pending
  and unlocked, so the only duplicates are those of the batch in flight.
  SQLite has a single writer: one relay per database file (a file lock).
- Order. Events of one ordering key (the aggregate) are published in
  position order: a claimed event is held back while an earlier pending
  event of its key exists outside the batch (in another relay's batch, or
  waiting to retry). A failing event holds back its key only.
- Retries. A failed attempt waits `OUTBOX_BACKOFF_BASE * 2**n` seconds (at
  most OUTBOX_BACKOFF_MAX) with jitter; after OUTBOX_MAX_RETRY attempts
  the event is `failed` with its error (dead letter) and `flask outbox
  requeue` puts it back. A broker that is down is not the event's fault:
  the batch is left untouched and the relay reconnects with backoff.
- Wake-up. PostgreSQL NOTIFY (sent by the writing transaction) and
  commits in this process wake the relay at once; otherwise it polls,
  quickly after finding work and more slowly, up to
  OUTBOX_PROCESSING_INTERVAL, when idle.
- Retention. Processed events (and processed-message marks) older than
  OUTBOX_RETENTION_HOURS are deleted in small batches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from flask import Flask, request
from flask.cli import AppGroup
from sqlalchemy import and_, any_, bindparam, delete, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from common_utils.health import add_readiness_check
from common_utils.outbox.consumer import ProcessedMessage
from common_utils.outbox.model import (
    FAILED,
    NOTIFY_CHANNEL,
    PENDING,
    PROCESSED,
    continue_trace,
    register_waker,
    utcnow,
)
from common_utils.outbox.transport import SKIPPED, TransportUnavailable

logger = logging.getLogger(__name__)

EXTENSION_KEY = "outbox"
TRANSPORTS = ("rabbitmq", "in_process")
MAX_ERROR_LENGTH = 2000


class InProcessTransport:
    """Runs the processor's registered handlers in this process (the guide's behaviour).

    Events of one ordering key run in order; once one fails, the later
    events of that key in the batch are skipped, so they cannot overtake it.
    """

    name = "in_process"

    def __init__(self, processor, app: Flask):
        self.processor = processor
        self.app = app

    def publish(self, rows: list) -> list:
        state: OutboxState = self.app.extensions[EXTENSION_KEY]
        results: list = []
        failed_keys: set[str] = set()
        for row in rows:
            if row.ordering_key in failed_keys:
                results.append(SKIPPED)
                continue
            event = self.processor.model(**row._asdict())
            handlers = self.processor.handlers.get(row.event_type, []) + self.processor.handlers.get("*", [])
            try:
                if handlers:
                    payload = json.loads(row.payload)
                    with continue_trace(
                        event.header_map,
                        f"{row.event_type} process",
                        tracer=state.tracer,
                        **{"messaging.message.id": row.id, "messaging.system": "in_process"},
                    ):
                        for handler in handlers:
                            handler(row.aggregate_id, payload, event)
                results.append(None)
            except Exception as error:  # a handler's failure is the event's, retried later
                logger.warning("outbox handler failed for %s %s: %r", row.event_type, row.id, error)
                failed_keys.add(row.ordering_key)
                results.append(error)
            finally:
                state.db.session.remove()  # a handler's session work never leaks into the next
        return results

    def status(self) -> dict:
        return {"transport": self.name}

    def close(self) -> None:
        pass


def make_transport(state: OutboxState):
    if state.transport_name == "in_process":
        return InProcessTransport(state.processor, state.app)
    from common_utils.outbox.rabbitmq import RabbitMQTransport

    config = state.app.config
    return RabbitMQTransport(
        config["AMQP_URL"],
        exchange=config["OUTBOX_EXCHANGE"],
        app_id=config["SERVICE_NAME"],
        confirm_timeout=config["OUTBOX_PUBLISH_TIMEOUT"],
        connect_wait=min(5.0, config["OUTBOX_PUBLISH_TIMEOUT"]),
    )


@dataclass
class BatchResult:
    claimed: int = 0
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    held_back: int = 0
    unavailable: TransportUnavailable | None = None


@dataclass
class OutboxSettings:
    enabled: bool
    transport: str
    batch_size: int
    workers: int
    interval: float
    min_interval: float
    max_retry: int
    backoff_base: float
    backoff_max: float
    retention: timedelta
    cleanup_batch_size: int
    cleanup_interval: float
    max_lag: float

    @classmethod
    def from_config(cls, config) -> OutboxSettings:
        transport = config.get("OUTBOX_TRANSPORT", "in_process")
        if transport not in TRANSPORTS:
            raise ValueError(f"OUTBOX_TRANSPORT must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if transport == "rabbitmq" and importlib.util.find_spec("common_utils.outbox.rabbitmq") is None:
            raise ValueError("OUTBOX_TRANSPORT=rabbitmq: this project was generated without the RabbitMQ transport")
        return cls(
            enabled=config.get("OUTBOX_ENABLED", True),
            transport=transport,
            batch_size=max(1, config.get("OUTBOX_BATCH_SIZE", 500)),
            workers=max(1, config.get("OUTBOX_RELAY_WORKERS", 2)),
            interval=max(0.01, config.get("OUTBOX_PROCESSING_INTERVAL", 1.0)),
            min_interval=max(0.001, config.get("OUTBOX_MIN_POLL_INTERVAL", 0.05)),
            max_retry=max(1, config.get("OUTBOX_MAX_RETRY", 5)),
            backoff_base=config.get("OUTBOX_BACKOFF_BASE", 1.0),
            backoff_max=config.get("OUTBOX_BACKOFF_MAX", 300.0),
            retention=timedelta(hours=config.get("OUTBOX_RETENTION_HOURS", 168)),
            cleanup_batch_size=max(1, config.get("OUTBOX_CLEANUP_BATCH_SIZE", 1000)),
            cleanup_interval=config.get("OUTBOX_CLEANUP_INTERVAL", 300.0),
            max_lag=config.get("OUTBOX_MAX_LAG", 60.0),
        )


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2**(attempt-1))."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not secrecy


@dataclass
class OutboxState:
    """Everything the outbox keeps for one app."""

    app: Flask
    processor: Any
    settings: OutboxSettings
    metrics: Any = None
    tracer: Any = None
    _transport: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _thread_pid: int | None = None
    _relay: Relay | None = None

    @property
    def db(self):
        return self.processor.db

    @property
    def table(self):
        return self.processor.model.__table__

    @property
    def transport_name(self) -> str:
        return self.settings.transport

    @property
    def transport(self):
        with self._lock:
            if self._transport is None:
                self._transport = make_transport(self)
            return self._transport

    @property
    def engine(self) -> Engine:
        with self.app.app_context():  # this app's engine, whichever app is current
            return self.db.engine

    def locks_rows(self) -> bool:
        return self.engine.dialect.name in ("postgresql", "mysql", "mariadb")

    # -- one batch ---------------------------------------------------------

    def process_batch(self, limit: int | None = None) -> int:
        """Claim, publish and mark one batch; the number of events processed."""
        result = self.run_batch(limit)
        if result.unavailable is not None:
            raise result.unavailable
        return result.processed

    def run_batch(self, limit: int | None = None) -> BatchResult:
        limit = limit or self.settings.batch_size
        if self.locks_rows():
            # READ COMMITTED: the order guard must see other relays' latest commits
            # (MySQL's default REPEATABLE READ would show it an old snapshot).
            connection = self.engine.connect().execution_options(isolation_level="READ COMMITTED")
            with connection, connection.begin():
                rows = self.claim(connection, limit, lock=True)
                return self.publish_and_mark(connection, rows)
        with self.engine.connect() as connection:
            with connection.begin():
                rows = self.claim(connection, limit, lock=False)
            with connection.begin():
                return self.publish_and_mark(connection, rows)

    def claim(self, connection: Connection, limit: int, *, lock: bool) -> tuple[list, int]:
        t = self.table
        statement = (
            select(
                t.c.position,
                t.c.id,
                t.c.event_type,
                t.c.aggregate_type,
                t.c.aggregate_id,
                t.c.ordering_key,
                t.c.payload,
                t.c.headers,
                t.c.created_at,
                t.c.retry_count,
            )
            .where(t.c.status == PENDING, t.c.next_attempt_at <= utcnow())
            .order_by(t.c.position)
            .limit(limit)
        )
        if lock:
            statement = statement.with_for_update(skip_locked=True)
        rows = connection.execute(statement).all()
        if not rows:
            return [], 0
        kept = self.keep_in_order(connection, rows)
        return kept, len(rows)

    def keep_in_order(self, connection: Connection, rows: list) -> list:
        """Drop events that an earlier pending event of the same key, outside the batch, must precede."""
        t = self.table
        positions = [row.position for row in rows]
        last = max(positions)
        # The common case first: no pending event below the batch's last
        # position except the batch's own (one short index range scan).
        earlier = connection.scalar(
            select(func.count()).select_from(t).where(t.c.status == PENDING, t.c.position <= last)
        )
        if earlier == len(rows):
            return rows
        blockers = dict(
            connection.execute(
                select(t.c.ordering_key, func.min(t.c.position))
                .where(
                    t.c.status == PENDING,
                    self.among(t.c.ordering_key, {row.ordering_key for row in rows}),
                    t.c.position < last,
                    ~self.among(t.c.position, positions),
                )
                .group_by(t.c.ordering_key)
            ).all()
        )
        if not blockers:
            return rows
        return [row for row in rows if row.position < blockers.get(row.ordering_key, row.position + 1)]

    def among(self, column, values):
        """`column IN values`; on PostgreSQL as `= ANY(array)`, one parameter instead of hundreds."""
        values = list(values)
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import ARRAY

            return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
        return column.in_(values)

    def publish_and_mark(self, connection: Connection, claimed: tuple[list, int]) -> BatchResult:
        rows, claimed_count = claimed
        outcome = BatchResult(claimed=claimed_count, held_back=claimed_count - len(rows))
        if not rows:
            return outcome
        try:
            results = self.transport.publish(rows)
        except TransportUnavailable as error:
            outcome.unavailable = error
            return outcome
        now = utcnow()
        done = [row for row, result in zip(rows, results, strict=True) if result is None]
        if done:
            t = self.table
            connection.execute(
                update(t)
                .where(self.among(t.c.position, [row.position for row in done]))
                .values(status=PROCESSED, processed_at=now, error=None)
            )
            outcome.processed = len(done)
        failures = []
        for row, result in zip(rows, results, strict=True):
            if result is None or result is SKIPPED:
                continue
            if isinstance(result, TransportUnavailable):
                outcome.unavailable = result
                continue
            attempts = row.retry_count + 1
            dead = attempts >= self.settings.max_retry
            failures.append(
                {
                    "p": row.position,
                    "s": FAILED if dead else PENDING,
                    "r": attempts,
                    "n": now + timedelta(seconds=backoff_delay(attempts, self.settings.backoff_base, self.settings.backoff_max)),
                    "e": format_error(result),
                }
            )
            if dead:
                outcome.dead_lettered += 1
                if self.metrics is not None:
                    self.metrics.dead_lettered(row.event_type)
                logger.error("outbox event %s (%s) dead-lettered after %d attempts: %r", row.id, row.event_type, attempts, result)
            else:
                outcome.retried += 1
        if failures:
            self.record_failures(connection, failures)
        if self.metrics is not None:
            self.metrics.count(rows, results)
        return outcome

    def record_failures(self, connection: Connection, failures: list[dict]) -> None:
        t = self.table
        connection.execute(
            update(t)
            .where(t.c.position == bindparam("p"))
            .values(
                status=bindparam("s"),
                retry_count=bindparam("r"),
                next_attempt_at=bindparam("n"),
                error=bindparam("e"),
            ),
            failures,
        )

    # -- operations --------------------------------------------------------

    def requeue(self, event_ids: list[str] | None = None, event_type: str | None = None) -> int:
        """Put dead-lettered events back in the queue, with a fresh retry budget."""
        t = self.table
        conditions = [t.c.status == FAILED]
        if event_ids:
            conditions.append(t.c.id.in_(event_ids))
        if event_type:
            conditions.append(t.c.event_type == event_type)
        with self.engine.begin() as connection:
            count = connection.execute(
                update(t).where(and_(*conditions)).values(status=PENDING, retry_count=0, next_attempt_at=utcnow())
            ).rowcount
        self.wake()
        return count

    def cleanup(self, max_batches: int = 100) -> int:
        """Delete processed events and processed-message marks past retention, in small batches."""
        cutoff = utcnow() - self.settings.retention
        t = self.table
        marks = ProcessedMessage.__table__
        deleted = 0
        for _ in range(max_batches):
            with self.engine.begin() as connection:
                positions = connection.scalars(
                    select(t.c.position)
                    .where(t.c.status == PROCESSED, t.c.processed_at < cutoff)
                    .order_by(t.c.position)
                    .limit(self.settings.cleanup_batch_size)
                ).all()
                if positions:
                    deleted += connection.execute(delete(t).where(t.c.position.in_(positions))).rowcount
            if len(positions) < self.settings.cleanup_batch_size:
                break
        for _ in range(max_batches):
            with self.engine.begin() as connection:
                keys = connection.execute(
                    select(marks.c.consumer, marks.c.message_id)
                    .where(marks.c.processed_at < cutoff)
                    .limit(self.settings.cleanup_batch_size)
                ).all()
                for consumer in {key.consumer for key in keys}:
                    ids = [key.message_id for key in keys if key.consumer == consumer]
                    connection.execute(
                        delete(marks).where(marks.c.consumer == consumer, marks.c.message_id.in_(ids))
                    )
            if len(keys) < self.settings.cleanup_batch_size:
                break
        return deleted

    def stats(self) -> dict:
        """Pending and dead-lettered counts, and the age of the oldest pending event."""
        t = self.table
        with self.engine.connect() as connection:
            counts = dict(
                connection.execute(
                    select(t.c.status, func.count()).where(t.c.status.in_([PENDING, FAILED])).group_by(t.c.status)
                ).all()
            )
            oldest = connection.scalar(
                select(t.c.created_at).where(t.c.status == PENDING).order_by(t.c.position).limit(1)
            )
        lag = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
        stats = {"pending": counts.get(PENDING, 0), "failed": counts.get(FAILED, 0), "lag_seconds": round(lag, 3)}
        if self.metrics is not None:
            self.metrics.observe(stats)
        return stats

    # -- the relay ---------------------------------------------------------

    def relay(self, workers: int | None = None) -> Relay:
        return Relay(self, workers)

    def wake(self) -> None:
        if self._relay is not None:
            self._relay.wake()

    def start_thread(self, *, on_first_request: bool = False) -> None:
        """Start the relay in a daemon thread, once per process (again in a forked child)."""
        if not self.settings.enabled or not self.app.config.get("OUTBOX_RELAY_IN_APP", True):
            return
        if on_first_request:
            self.app.before_request(self._start_for_request)
            return
        with self._lock:
            if self._thread is not None and self._thread_pid == os.getpid() and self._thread.is_alive():
                return
            relay = Relay(self)
            self._relay = relay
            self._thread = threading.Thread(target=relay.run, name="outbox-relay", daemon=True)
            self._thread_pid = os.getpid()
            self._thread.start()

    def _start_for_request(self) -> None:
        if self._thread is None or self._thread_pid != os.getpid():
            self.start_thread()

    def stop_thread(self, timeout: float = 5.0) -> None:
        relay, thread = self._relay, self._thread
        if relay is not None:
            relay.stop()
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        self._relay = None

    def close(self) -> None:
        self.stop_thread()
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()


def format_error(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text[:MAX_ERROR_LENGTH]


class Relay:
    """The relay loop: batches while there is work, waits for a wake-up or a poll when idle.

    It runs OUTBOX_RELAY_WORKERS loops (threads, one database connection
    each; one on SQLite) sharing the transport, so one batch is claimed
    while the previous one waits for its confirms. They coordinate like
    separate relays: SKIP LOCKED and the order guard.
    """

    def __init__(self, state: OutboxState, workers: int | None = None):
        self.state = state
        self.stopping = threading.Event()
        self.heartbeat_file: Path | None = None
        self.url = state.engine.url
        self.workers = 1 if not state.locks_rows() else max(1, workers or state.settings.workers)
        self.wake_ups = [threading.Event() for _ in range(self.workers)]

    def wake(self, url=None) -> None:
        if url is None or url == self.url:
            for event in self.wake_ups:
                event.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wake()

    def run(self, *, once: bool = False) -> int:
        """Relay until stopped (or, with `once`, until nothing is due); the number processed."""
        state = self.state
        state._relay = self
        register_waker(self)
        with state.app.app_context(), single_relay_lock(state) as acquired:
            if not acquired:
                logger.warning("another relay holds this SQLite database; standing by")
                if once:
                    return 0
                while not self.stopping.wait(state.settings.interval):
                    pass
                return 0
            listener = PostgresListener(self) if state.engine.dialect.name == "postgresql" and not once else None
            if listener:
                listener.start()
            totals = [0] * self.workers
            helpers = [
                threading.Thread(target=self._worker, args=(index, once, totals), name=f"outbox-relay-{index}", daemon=True)
                for index in range(1, self.workers)
            ]
            try:
                for helper in helpers:
                    helper.start()
                self._worker(0, once, totals)
                for helper in helpers:
                    helper.join()
            finally:
                self.stop()  # on an error in this thread, the helpers stop too
                if listener:
                    listener.stop()
                state._relay = None if state._relay is self else state._relay
        return sum(totals)

    def _worker(self, index: int, once: bool, totals: list[int]) -> None:
        with self.state.app.app_context():
            totals[index] = self._loop(once, self.wake_ups[index])

    def _loop(self, once: bool, wake_up: threading.Event) -> int:
        state, settings = self.state, self.state.settings
        total = 0
        idle_wait = settings.min_interval
        failure_wait = 0.0
        next_cleanup = time.monotonic() + min(5.0, settings.cleanup_interval)
        next_stats = 0.0
        while not self.stopping.is_set():
            wake_up.clear()
            if self.heartbeat_file is not None:
                self.heartbeat_file.touch()
            try:
                outcome = state.run_batch()
            except SQLAlchemyError as error:
                failure_wait = min(30.0, max(0.5, failure_wait * 2))
                logger.warning("outbox relay: database error, retrying in %.1fs: %s", failure_wait, error)
                if once:
                    raise
                self.stopping.wait(failure_wait)
                continue
            total += outcome.processed
            if outcome.unavailable is not None:
                failure_wait = min(30.0, max(0.5, failure_wait * 2))
                logger.warning("outbox relay: broker unavailable, retrying in %.1fs: %s", failure_wait, outcome.unavailable)
                if once:
                    raise outcome.unavailable
                self.stopping.wait(failure_wait)
                continue
            failure_wait = 0.0
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + 5.0
                with contextlib.suppress(SQLAlchemyError):
                    state.stats()
            if now >= next_cleanup and not once:
                next_cleanup = now + settings.cleanup_interval
                with contextlib.suppress(SQLAlchemyError):
                    state.cleanup()
            if outcome.claimed >= settings.batch_size and outcome.processed:
                idle_wait = settings.min_interval
                continue  # a full batch: more is waiting
            if once and outcome.processed == 0:
                break
            if outcome.processed:
                idle_wait = settings.min_interval
            else:
                idle_wait = min(settings.interval, idle_wait * 2)
            wake_up.wait(idle_wait)
        return total


@contextlib.contextmanager
def single_relay_lock(state: OutboxState):
    """On SQLite, only one relay per database file: hold an exclusive file lock."""
    url = state.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        yield True
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path = Path(url.database).with_name(Path(url.database).name + ".outbox-relay.lock")
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PostgresListener:
    """LISTEN on the outbox channel in a thread; a notification wakes the relay."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.thread = threading.Thread(target=self.run, name="outbox-listen", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.join(2.0)

    def run(self) -> None:
        import psycopg

        url = self.relay.state.engine.url.set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        wait = 0.5
        while not self.relay.stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    wait = 0.5
                    self.relay.wake()  # catch up on what came in while not listening
                    while not self.relay.stopping.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            self.relay.wake()
            except Exception as error:  # keep listening through database restarts
                logger.warning("outbox LISTEN connection lost, reconnecting in %.1fs: %s", wait, error)
                self.relay.stopping.wait(wait)
                wait = min(wait * 2, 30.0)


class OutboxMetrics:
    """Prometheus series on the app's own registry."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        self.pending = Gauge(
            "outbox_events_pending", "Events waiting to be published", registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.dead = Gauge(
            "outbox_events_dead_lettered", "Events in the dead letter state (failed)", registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.lag = Gauge(
            "outbox_relay_lag_seconds", "Age of the oldest pending event", registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.published = Counter(
            "outbox_events_published", "Events published (confirmed by the broker or run in process)",
            ["event_type"], registry=registry,
        )
        self.failed = Counter(
            "outbox_events_failed", "Events dead-lettered after OUTBOX_MAX_RETRY attempts",
            ["event_type"], registry=registry,
        )
        self.errors = Counter(
            "outbox_publish_errors", "Failed publish attempts (each is retried with backoff)",
            ["event_type"], registry=registry,
        )

    def count(self, rows: list, results: list) -> None:
        for row, result in zip(rows, results, strict=True):
            if result is None:
                self.published.labels(row.event_type).inc()
            elif result is not SKIPPED and not isinstance(result, TransportUnavailable):
                self.errors.labels(row.event_type).inc()

    def dead_lettered(self, event_type: str) -> None:
        self.failed.labels(event_type).inc()

    def observe(self, stats: dict) -> None:
        self.pending.set(stats["pending"])
        self.dead.set(stats["failed"])
        self.lag.set(stats["lag_seconds"])


def init_outbox(app: Flask, processor) -> OutboxState:
    """Bind the outbox to `app`: settings, metrics, readiness checks and the `flask outbox` commands."""
    settings = OutboxSettings.from_config(app.config)
    tracer = None
    with contextlib.suppress(ImportError):
        from opentelemetry import trace

        tracer = trace.get_tracer("common_utils.outbox")
    state = OutboxState(app=app, processor=processor, settings=settings, tracer=tracer)
    app.extensions[EXTENSION_KEY] = state

    exporter = app.extensions.get("metrics")
    if exporter is not None:
        state.metrics = OutboxMetrics(exporter.registry)
        metrics_path = getattr(exporter, "path", "/metrics")

        @app.before_request
        def refresh_outbox_gauges():
            """Scrapes see current DB-derived gauges, whichever process relays."""
            if request.path == metrics_path:
                with contextlib.suppress(SQLAlchemyError):
                    state.stats()

    add_readiness_check(app, "outbox", lambda: check_relay_lag(state), critical=False)
    if settings.transport == "rabbitmq":
        add_readiness_check(app, "broker", lambda: state.transport.status(), critical=False)
    app.cli.add_command(outbox_cli)
    return state


def check_relay_lag(state: OutboxState) -> dict:
    stats = state.stats()
    if stats["lag_seconds"] > state.settings.max_lag:
        raise RuntimeError(
            f"the oldest pending event is {stats['lag_seconds']:.0f}s old "
            f"(OUTBOX_MAX_LAG={state.settings.max_lag:g}); pending={stats['pending']}"
        )
    return {**stats, "transport": state.transport_name}


outbox_cli = AppGroup("outbox", help="Publish, inspect and repair the transactional outbox.")


def current_state() -> OutboxState:
    from flask import current_app

    return current_app.extensions[EXTENSION_KEY]


@outbox_cli.command("relay")
@click.option("--once", is_flag=True, help="Publish everything due, then exit.")
@click.option("--heartbeat-file", type=click.Path(dir_okay=False, path_type=Path), help="Touched after every loop (for container health checks).")
def relay_command(once: bool, heartbeat_file: Path | None) -> None:
    """Run the relay in the foreground (compose runs it as the outbox-relay service)."""
    import signal

    state = current_state()
    if not state.settings.enabled:
        raise click.ClickException("OUTBOX_ENABLED is false")
    relay = state.relay()
    relay.heartbeat_file = heartbeat_file
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: relay.stop())
    logger.info("outbox relay started (transport %s)", state.transport_name)
    try:
        total = relay.run(once=once)
    finally:
        state.close()
    click.echo(f"published {total} event(s)")


@outbox_cli.command("requeue")
@click.option("--id", "event_ids", multiple=True, help="A dead-lettered event's id (repeatable).")
@click.option("--event-type", help="Only events of this type.")
@click.option("--all", "everything", is_flag=True, help="Every dead-lettered event.")
def requeue_command(event_ids: tuple[str, ...], event_type: str | None, everything: bool) -> None:
    """Put dead-lettered (failed) events back in the queue."""
    if not (event_ids or event_type or everything):
        raise click.UsageError("say which events: --id, --event-type or --all")
    count = current_state().requeue(list(event_ids), event_type)
    click.echo(f"requeued {count} event(s)")


@outbox_cli.command("status")
def status_command() -> None:
    """Pending and dead-lettered counts, and the relay lag."""
    click.echo(json.dumps(current_state().stats()))


@outbox_cli.command("cleanup")
def cleanup_command() -> None:
    """Delete processed events older than OUTBOX_RETENTION_HOURS now."""
    click.echo(f"deleted {current_state().cleanup()} processed event(s)")

"""The outbox relay: claims due events under a lease, publishes them, marks the outcome.

How it stays correct with several relays, failures and crashes:

- Short transactions (claim.py). A batch is claimed in one short
  transaction that leases its rows (OUTBOX_LEASE_SECONDS, database clock)
  and commits; the transport publishes with no transaction open; a second
  short transaction marks the outcome on the rows the lease still holds. A
  relay that dies mid-batch leaves its rows leased until the lease ends;
  then they are published again (at least once: the only duplicates are
  those of the batch in flight).
- Order per ordering key (the aggregate). An event is taken only when
  nothing earlier of its key is unfinished outside its batch. A failed
  event holds back its key while it waits to retry; a dead-lettered event
  parks its key until an operator runs `flask outbox requeue` or `flask
  outbox skip`. The claim skips blocked keys instead of filling the batch
  with their rows, so one stuck aggregate never slows the others.
- Retries. Attempt n waits OUTBOX_BACKOFF_BASE * 2**(n-1) seconds (at most
  OUTBOX_BACKOFF_MAX, with jitter), on the database's clock; after
  OUTBOX_MAX_RETRY attempts the event is dead-lettered (`failed`). The
  defaults retry for about 7 to 13 minutes. A broker that is down is not
  the events' fault: they go back untouched and the relay backs off.
- Supervision. Any exception in a round is logged, recorded in the relay's
  heartbeat row, and the loop starts again after a capped backoff. The
  heartbeat (heartbeat.py) shows a dead or stuck relay in /health/ready
  and /metrics of every process.
- Wake-up (wakeup.py). Commits in this process wake the relay at once;
  other processes' commits through a debounced NOTIFY on PostgreSQL; it
  also polls, quickly after finding work and up to
  OUTBOX_PROCESSING_INTERVAL apart when idle.
- Retention. Finished events past OUTBOX_RETENTION_HOURS are deleted by
  primary-key ranges (claim.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, request
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from common_utils.health import add_readiness_check
from common_utils.outbox.claim import OutboxStore
from common_utils.outbox.commands import outbox_cli
from common_utils.outbox.consumer import ProcessedMessage
from common_utils.outbox.heartbeat import Heartbeat, forget_dead_relays, relay_health
from common_utils.outbox.in_process import InProcessTransport
from common_utils.outbox.metrics import OutboxMetrics
from common_utils.outbox.model import FAILED, PENDING, register_waker
from common_utils.outbox.transport import SKIPPED, TransportUnavailable
from common_utils.outbox.wakeup import Notifier, PostgresListener

logger = logging.getLogger(__name__)

EXTENSION_KEY = "outbox"
TRANSPORTS = ("rabbitmq", "in_process")
MAX_ERROR_LENGTH = 2000
#: The longest pause of a relay loop after an error, before it starts again.
MAX_RESTART_WAIT = 30.0


def make_transport(state: OutboxState):
    if state.transport_name == "in_process":
        return InProcessTransport(state.processor, state.app, tracer=state.tracer)
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
    lease: float
    retention_hours: float
    cleanup_batch_size: int
    cleanup_interval: float
    max_lag: float
    stale_after: float
    notify_interval: float

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
            max_retry=max(1, config.get("OUTBOX_MAX_RETRY", 10)),
            backoff_base=config.get("OUTBOX_BACKOFF_BASE", 2.0),
            backoff_max=config.get("OUTBOX_BACKOFF_MAX", 300.0),
            lease=max(0.1, config.get("OUTBOX_LEASE_SECONDS", 30.0)),
            retention_hours=config.get("OUTBOX_RETENTION_HOURS", 168.0),
            cleanup_batch_size=max(1, config.get("OUTBOX_CLEANUP_BATCH_SIZE", 10000)),
            cleanup_interval=config.get("OUTBOX_CLEANUP_INTERVAL", 60.0),
            max_lag=config.get("OUTBOX_MAX_LAG", 60.0),
            stale_after=max(0.05, config.get("OUTBOX_RELAY_STALE_AFTER", 60.0)),
            notify_interval=max(0.0, config.get("OUTBOX_NOTIFY_INTERVAL", 0.02)),
        )

    def retry_window(self) -> tuple[float, float]:
        """The shortest and longest time from an event's first failure to its dead letter."""
        ceilings = [min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) for attempt in range(1, self.max_retry)]
        return sum(ceilings) / 2, sum(ceilings)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2**(attempt-1))."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not secrecy


def format_error(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text[:MAX_ERROR_LENGTH]


@dataclass
class OutboxState:
    """Everything the outbox keeps for one app."""

    app: Flask
    processor: Any
    settings: OutboxSettings
    metrics: OutboxMetrics | None = None
    tracer: Any = None
    notifier: Notifier | None = None
    _transport: Any = None
    _store: OutboxStore | None = None
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

    @property
    def store(self) -> OutboxStore:
        engine = self.engine
        store = self._store
        if store is None or store.engine is not engine:
            store = self._store = OutboxStore(engine, self.table)
        return store

    def locks_rows(self) -> bool:
        return self.store.locks_rows

    # -- one batch ---------------------------------------------------------

    def process_batch(self, limit: int | None = None) -> int:
        """Claim, publish and mark one batch; the number of events processed."""
        result = self.run_batch(limit)
        if result.unavailable is not None:
            raise result.unavailable
        return result.processed

    def run_batch(self, limit: int | None = None) -> BatchResult:
        """One round: claim (a short transaction), publish (none), mark (a short transaction)."""
        settings, store = self.settings, self.store
        claim = store.claim(limit or settings.batch_size, settings.lease)
        outcome = BatchResult(claimed=claim.selected, held_back=claim.selected - len(claim.rows))
        if not claim.rows:
            return outcome
        try:
            results = self.transport.publish(claim.rows)
        except TransportUnavailable as error:
            store.release(claim, claim.rows)
            outcome.unavailable = error
            return outcome
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):
                store.release(claim, claim.rows)
            raise
        done, failures, released = [], [], []
        for row, result in zip(claim.rows, results, strict=True):
            if result is None:
                done.append(row)
            elif result is SKIPPED:
                released.append(row)
            elif isinstance(result, TransportUnavailable):
                outcome.unavailable = result
                released.append(row)
            else:
                failures.append(self.failure(row, result, outcome))
        outcome.processed = store.mark(claim, done, failures, released)
        if self.metrics is not None:
            self.metrics.count(claim.rows, results)
        return outcome

    def failure(self, row, error: BaseException, outcome: BatchResult) -> dict:
        """The row's new state after a failed attempt: retry later, or dead letter (parking its key)."""
        attempts = row.retry_count + 1
        dead = attempts >= self.settings.max_retry
        if dead:
            outcome.dead_lettered += 1
            if self.metrics is not None:
                self.metrics.dead_lettered(row.event_type)
            logger.error(
                "outbox event %s (%s) dead-lettered after %d attempts, parking key %s until "
                "`flask outbox requeue %s` or `flask outbox skip %s`: %r",
                row.id, row.event_type, attempts, row.ordering_key, row.id, row.id, error,
            )
        else:
            outcome.retried += 1
        delay = backoff_delay(attempts, self.settings.backoff_base, self.settings.backoff_max)
        return {"p": row.position, "s": FAILED if dead else PENDING, "r": attempts, "d": delay, "e": format_error(error)}

    # -- operations --------------------------------------------------------

    def requeue(self, event_ids: list[str] | None = None, event_type: str | None = None) -> int:
        """Put dead-lettered events back, ahead of the later events of their keys."""
        count = self.store.requeue(event_ids, event_type)
        self.wake()
        return count

    def skip(self, event_ids: list[str]) -> int:
        """Give up on dead-lettered events: the later events of their keys go on without them."""
        count = self.store.skip(event_ids)
        self.wake()
        return count

    def cleanup(self, max_batches: int = 100) -> int:
        """Delete finished events and processed-message marks past retention; the events deleted."""
        retention = self.settings.retention_hours * 3600
        size = self.settings.cleanup_batch_size
        deleted = self.store.delete_finished(retention, size, max_batches)
        self.store.delete_marks(ProcessedMessage.__table__, retention, size, max_batches)
        forget_dead_relays(self.store)
        return deleted

    def stats(self) -> dict:
        """Pending and dead-lettered counts, and the age of the oldest pending event."""
        stats = self.store.stats()
        if self.metrics is not None:
            self.metrics.observe(stats)
        return stats

    def relay_health(self) -> dict:
        health = relay_health(self.store, self.settings.stale_after)
        if self.metrics is not None:
            self.metrics.observe_relays(health)
        return health

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
        if self._thread is None or self._thread_pid != os.getpid() or not self._thread.is_alive():
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


class Relay:
    """The relay loop: batches while there is work, waits for a wake-up or a poll when idle.

    It runs OUTBOX_RELAY_WORKERS loops (threads, one database connection
    each; one on SQLite) sharing the transport. The first loop answers
    wake-ups and polls; the others wait until a loop claims a full batch
    (a backlog), then claim beside it, so one batch is claimed while the
    previous one is being published, and go back to waiting when their
    batch is not full. At a trickle one loop is enough, and two woken for
    every commit only fought over the interpreter lock: a loop holding its
    claim's row locks waited for the other to finish encoding a batch, and
    commit-to-confirm at 1,000 events/s had a p99 near a second. The loops
    coordinate like separate relays: leases and the order guard.
    """

    def __init__(self, state: OutboxState, workers: int | None = None):
        self.state = state
        self.stopping = threading.Event()
        self.heartbeat_file: Path | None = None
        self.url = state.engine.url
        self.workers = 1 if not state.locks_rows() else max(1, workers or state.settings.workers)
        self.wake_ups = [threading.Event() for _ in range(self.workers)]

    def wake(self, url=None) -> None:
        """Events were committed: wake the first loop (the others join if it finds a backlog)."""
        if url is None or url == self.url:
            self.wake_ups[0].set()

    def wake_all(self) -> None:
        for event in self.wake_ups:
            event.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wake_all()

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
        heartbeat = Heartbeat(self.state.store, index)
        try:
            with self.state.app.app_context(), self.state.store.holding_connection():
                totals[index] = self._loop(index, once, heartbeat)
        finally:
            with contextlib.suppress(Exception):
                heartbeat.stop()

    def _loop(self, index: int, once: bool, heartbeat: Heartbeat) -> int:
        """Rounds until stopped; any exception is logged and the loop goes on after a capped backoff."""
        state, settings = self.state, self.state.settings
        wake_up = self.wake_ups[index]
        total = 0
        idle_wait = settings.min_interval
        failure_wait = 0.0
        beat_every = min(1.0, settings.stale_after / 4)
        last_beat = float("-inf")
        next_cleanup = time.monotonic() + min(5.0, settings.cleanup_interval)
        next_stats = 0.0
        helper = index > 0 and not once
        if helper:
            self._wait_for_backlog(wake_up, heartbeat, beat_every)
        while not self.stopping.is_set():
            wake_up.clear()
            if self.heartbeat_file is not None:
                self.heartbeat_file.touch()
            try:
                now = time.monotonic()
                if now - last_beat >= beat_every:
                    heartbeat.beat()
                    last_beat = now
                outcome = state.run_batch()
                if index == 0 and now >= next_stats:
                    next_stats = now + 5.0
                    state.stats()
                if index == 0 and now >= next_cleanup and not once:
                    next_cleanup = now + settings.cleanup_interval
                    state.cleanup()
            except Exception as error:
                if once:
                    raise
                failure_wait = min(MAX_RESTART_WAIT, max(0.5, failure_wait * 2))
                logger.exception("outbox relay: round failed, starting again in %.1fs", failure_wait)
                heartbeat.error = format_error(error)
                if state.metrics is not None:
                    state.metrics.restarts.inc()
                self.stopping.wait(failure_wait)
                continue
            heartbeat.error = None
            total += outcome.processed
            if outcome.unavailable is not None:
                failure_wait = min(MAX_RESTART_WAIT, max(0.5, failure_wait * 2))
                logger.warning("outbox relay: broker unavailable, retrying in %.1fs: %s", failure_wait, outcome.unavailable)
                if once:
                    raise outcome.unavailable
                self.stopping.wait(failure_wait)
                continue
            failure_wait = 0.0
            if outcome.claimed >= settings.batch_size and outcome.processed:
                idle_wait = settings.min_interval
                self.wake_all()  # a full batch: more is waiting, for every loop
                continue
            if once and outcome.processed == 0:
                break
            if outcome.processed:
                idle_wait = settings.min_interval
            else:
                idle_wait = min(settings.interval, idle_wait * 2)
            if helper:
                self._wait_for_backlog(wake_up, heartbeat, beat_every)
            else:
                wake_up.wait(idle_wait)
        return total

    def _wait_for_backlog(self, wake_up: threading.Event, heartbeat: Heartbeat, beat_every: float) -> None:
        """A helper loop between backlogs: wait for a full batch's wake-up, beating so health sees it alive."""
        while not self.stopping.is_set():
            with contextlib.suppress(SQLAlchemyError):  # the first loop reports a database that is down
                heartbeat.beat()
            if wake_up.wait(beat_every):
                return


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


_notifiers: dict[tuple, Notifier] = {}
_notifiers_lock = threading.Lock()


def notifier_for(url, interval: float) -> Notifier:
    """One notifier (one connection) per PostgreSQL database and process, whatever the number of apps."""
    key = (url.host, url.port, url.database, url.username)
    with _notifiers_lock:
        notifier = _notifiers.get(key)
        if notifier is None:
            notifier = _notifiers[key] = Notifier(url, interval)
            register_waker(notifier)
        return notifier


def init_outbox(app: Flask, processor) -> OutboxState:
    """Bind the outbox to `app`: settings, metrics, readiness checks and the `flask outbox` commands."""
    from sqlalchemy.engine import make_url

    settings = OutboxSettings.from_config(app.config)
    tracer = None
    with contextlib.suppress(ImportError):
        from opentelemetry import trace

        tracer = trace.get_tracer("common_utils.outbox")
    state = OutboxState(app=app, processor=processor, settings=settings, tracer=tracer)
    app.extensions[EXTENSION_KEY] = state
    url = make_url(app.config["SQLALCHEMY_DATABASE_URI"])
    if settings.enabled and url.get_backend_name() == "postgresql":
        state.notifier = notifier_for(url, settings.notify_interval)

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
                    state.relay_health()

    add_readiness_check(app, "outbox", lambda: check_relay_lag(state), critical=False)
    add_readiness_check(app, "outbox_relay", lambda: check_relays(state), critical=False)
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


def check_relays(state: OutboxState) -> dict:
    """Up while relay loops beat and none has gone silent (dead or stuck) for OUTBOX_RELAY_STALE_AFTER."""
    health = state.relay_health()
    limit = f"OUTBOX_RELAY_STALE_AFTER={state.settings.stale_after:g}"
    if health["stale"]:
        silent = ", ".join(
            f"{relay['name']} ({relay['silent_seconds']:.0f}s"
            + (f", last error: {relay['last_error'].splitlines()[-1]}" if relay["last_error"] else "")
            + ")"
            for relay in health["stale_relays"]
        )
        raise RuntimeError(f"{health['stale']} relay loop(s) dead or stuck ({limit}): {silent}")
    if not health["live"]:
        raise RuntimeError(
            "no relay is running: start `flask outbox relay`, or serve a request to start the in-app relay"
        )
    return health

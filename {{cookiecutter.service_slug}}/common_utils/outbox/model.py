"""The transactional outbox: events written in the same transaction as the data.

A service that changes a row and then publishes "it changed" to a broker
can crash between the two, or publish for a transaction that then rolls
back. Here the event is a row of `outbox_events`, inserted by the same
database transaction as the change, so it exists exactly when the change
was committed. A relay (common_utils/outbox/relay.py) then publishes the
rows and marks them processed only once the broker has confirmed them.

The names are the migration guide's: `OutboxEvent` (with
`OutboxEvent.create_event(session, ...)`) and `OutboxMixin` with
`__outbox_enabled__ = True`; `OutboxProcessor(db, OutboxEvent)` with
`register_handler` and `process_pending_events(limit=...)` is in
common_utils/outbox/processor.py.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from flask import current_app, has_app_context, has_request_context, request
from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, Mapper, Session, mapped_column

from common_utils.database import db
from common_utils.outbox.payload import as_written, primary_key_clause

try:  # the OpenTelemetry API is there when tracing is on; the outbox works without it
    from opentelemetry import propagate as otel_propagate
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - depends on the render
    otel_propagate = None
    otel_trace = None

logger = logging.getLogger(__name__)

PENDING = "pending"
PROCESSED = "processed"
FAILED = "failed"
#: Set by `flask outbox skip`: a dead-lettered event the operator gave up on.
SKIPPED_BY_OPERATOR = "skipped"
STATUSES = (PENDING, PROCESSED, FAILED, SKIPPED_BY_OPERATOR)

#: PostgreSQL channel that wakes relays in other processes. It is notified
#: after commit, at most once per OUTBOX_NOTIFY_INTERVAL per process, by the
#: relay side (common_utils/outbox/wakeup.py), never inside a writer's transaction.
NOTIFY_CHANNEL = "outbox_events"
#: W3C trace context headers (https://www.w3.org/TR/trace-context/).
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_TRACESTATE_LENGTH = 512
#: Headers every event carries (stored with it, so every transport sends them):
#: the aggregate's version after the change (see OutboxMixin) and the ordering key.
VERSION_HEADER = "aggregate-version"
ORDERING_KEY_HEADER = "ordering-key"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCTimestamp(TypeDecorator):
    """A timezone-aware UTC timestamp on every database (naive UTC where there is no zone).

    On MySQL it is DATETIME(6): the default DATETIME keeps whole seconds,
    too coarse for retry times and relay lag.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def result_processor(self, dialect, coltype):
        # psycopg already returns timestamptz as aware datetimes: no call per row
        # (the relay reads hundreds of rows per batch).
        if dialect.name == "postgresql":
            return None
        return super().result_processor(dialect, coltype)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# 64 KiB TEXT is too small for some payloads on MySQL; the others have no limit.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# SQLite only auto-increments a column declared INTEGER PRIMARY KEY.
Position = BigInteger().with_variant(Integer(), "sqlite")


def event_values(
    event_type: str,
    aggregate_type: str,
    aggregate_id: Any,
    payload: Any,
    headers: dict[str, str] | None = None,
    ordering_key: str | None = None,
) -> dict:
    """A new event's column values, with the trace context of the code writing it."""
    now = utcnow()
    aggregate_id = str(aggregate_id)
    ordering_key = ordering_key or f"{aggregate_type}:{aggregate_id}"
    all_headers = {**capture_trace_headers(), **(headers or {}), ORDERING_KEY_HEADER: ordering_key}
    return {
        "id": str(uuid.uuid4()),
        "event_type": event_type,
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "ordering_key": ordering_key,
        "payload": json.dumps(payload, default=str, separators=(",", ":")),
        "headers": json.dumps(all_headers, separators=(",", ":")),
        "status": PENDING,
        "created_at": now,
        "next_attempt_at": now,
        "retry_count": 0,
    }


def capture_trace_headers() -> dict[str, str]:
    """The W3C trace context of the current span, or of the request being served.

    With OpenTelemetry active, the current span's context is injected, so a
    consumer's span continues the request's trace. Without it, a valid
    `traceparent` the caller sent is passed through unchanged.
    """
    carrier: dict[str, str] = {}
    # Injecting costs more than the rest of an event's values: only when there is a span to carry.
    if otel_propagate is not None and otel_trace.get_current_span().get_span_context().is_valid:
        otel_propagate.inject(carrier)
    if "traceparent" not in carrier and has_request_context():
        traceparent = request.headers.get("traceparent", "").strip().lower()
        if TRACEPARENT.match(traceparent) and not traceparent.startswith("ff"):
            carrier["traceparent"] = traceparent
            tracestate = request.headers.get("tracestate", "").strip()
            if tracestate and len(tracestate) <= MAX_TRACESTATE_LENGTH:
                carrier["tracestate"] = tracestate
    return {key: value for key, value in carrier.items() if key in ("traceparent", "tracestate")}


@contextmanager
def continue_trace(headers: dict | None, name: str, tracer=None, **attributes) -> Iterator[Any]:
    """Run a consumer's work in a span that is a child of the context in `headers`.

    `headers` are an event's headers or an AMQP message's; without
    OpenTelemetry this yields None and does nothing.
    """
    if otel_trace is None or otel_propagate is None:
        yield None
        return
    carrier = {key: value for key, value in (headers or {}).items() if isinstance(value, str)}
    parent = otel_propagate.extract(carrier)
    tracer = tracer or otel_trace.get_tracer(__name__)
    with tracer.start_as_current_span(
        name, context=parent, kind=otel_trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


@functools.cache
def snake_case(name: str) -> str:
    """`LineItem` -> `line_item` (once per class: it is asked for every event)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@functools.cache
def version_key(mapper: Mapper) -> str | None:
    """The attribute holding the mapper's version_id_col, or None without one."""
    if mapper.version_id_col is None:
        return None
    return mapper.get_property_by_column(mapper.version_id_col).key


class OutboxMixin:
    """Give a model events: inserting, updating or deleting it writes
    `<aggregate>.created`, `.updated` or `.deleted` with `to_dict()` as payload,
    in the same transaction. Set `__outbox_enabled__ = False` to silence a subclass.

    The payload of `.created` and `.updated` is the row as this transaction
    wrote it, which is what commits (the INSERT or UPDATE holds the row's
    lock), including columns another transaction changed meanwhile:
    `outbox_payload()` runs on a columns-only copy of that row (load
    anything else it needs itself), taken from memory when the row provably
    holds what the object does, else read back (common_utils/outbox/payload.py).
    A model with a `version_id_col` (optimistic concurrency) gets its
    version in every event's `aggregate-version` header, and its updates
    need no read-back: every writer of its table must bump the version.
    """

    __outbox_enabled__ = True
    #: Defaults to the class name in snake_case (`LineItem` -> `line_item`).
    __outbox_aggregate_type__: str | None = None

    @classmethod
    def outbox_aggregate_type(cls) -> str:
        return cls.__outbox_aggregate_type__ or snake_case(cls.__name__)

    def outbox_aggregate_id(self) -> str:
        return str(self.id)

    def outbox_payload(self) -> dict:
        return self.to_dict()

    def outbox_version(self) -> int | None:
        """The aggregate's version (its mapper's version_id_col), or None without one."""
        key = version_key(inspect(type(self)))
        return None if key is None else getattr(self, key)

    def outbox_event_values(self, action: str) -> dict:
        aggregate_type = self.outbox_aggregate_type()
        version = self.outbox_version()
        return event_values(
            f"{aggregate_type}.{action}",
            aggregate_type,
            self.outbox_aggregate_id(),
            self.outbox_payload(),
            headers={VERSION_HEADER: str(version)} if version is not None else None,
        )


def events_enabled() -> bool:
    """OUTBOX_ENABLED of the current app (True outside an app, e.g. in scripts)."""
    return not has_app_context() or current_app.config.get("OUTBOX_ENABLED", True)


def wants_events(obj: Any) -> bool:
    return isinstance(obj, OutboxMixin) and obj.__outbox_enabled__


PENDING_DELETES = "outbox_pending_deletes"
WROTE_EVENTS = "outbox_wrote_events"


@event.listens_for(Session, "before_flush")
def _snapshot_deletes(session: Session, flush_context, instances) -> None:
    """Take the payload of deleted rows while they can still be loaded."""
    if not events_enabled():
        return
    deleted = [obj.outbox_event_values("deleted") for obj in session.deleted if wants_events(obj)]
    if deleted:
        session.info.setdefault(PENDING_DELETES, []).extend(deleted)


@functools.cache
def insert_events() -> Any:
    """The INSERT of event rows, built once (OutboxEvent is declared below).

    Inline: nothing reads the new positions back (no RETURNING to fetch).
    """
    return OutboxEvent.__table__.insert().inline()


@event.listens_for(Session, "after_flush")
def _write_events(session: Session, flush_context) -> None:
    """Insert the events of this flush on the flush's own connection (same transaction)."""
    rows = session.info.pop(PENDING_DELETES, [])
    if events_enabled():
        written = [(obj, "created") for obj in session.new if wants_events(obj)]
        written += [
            (obj, "updated")
            for obj in session.dirty
            if wants_events(obj) and session.is_modified(obj, include_collections=False)
        ]
        for obj, action in written:
            connection = session.connection(bind_arguments={"mapper": inspect(obj).mapper})
            rows.append(as_written(connection, obj, inserted=action == "created").outbox_event_values(action))
    wrote = bool(rows) or any(isinstance(obj, OutboxEvent) for obj in session.new)
    if not wrote:
        return
    connection = session.connection(bind_arguments={"mapper": OutboxEvent.__mapper__})
    if rows:
        connection.execute(insert_events(), rows)
    session.info[WROTE_EVENTS] = connection.engine.url


@event.listens_for(Session, "after_commit")
def _wake_local_relays(session: Session) -> None:
    url = session.info.pop(WROTE_EVENTS, None)
    if url is not None:
        wake_relays(url)


@event.listens_for(Session, "after_rollback")
def _forget_events(session: Session) -> None:
    session.info.pop(WROTE_EVENTS, None)
    session.info.pop(PENDING_DELETES, None)


_local_wakers: weakref.WeakSet = weakref.WeakSet()
_wakers_lock = threading.Lock()


def register_waker(waker: Any) -> None:
    """Be told of every commit that wrote events in this process (`waker.wake(url)`).

    Relays in this process and the cross-process notifier register here;
    the set is weak, so the caller keeps the waker alive.
    """
    with _wakers_lock:
        _local_wakers.add(waker)


def wake_relays(url: Any) -> None:
    with _wakers_lock:
        wakers = list(_local_wakers)
    for waker in wakers:
        waker.wake(url)


class OutboxEvent(db.Model):
    """One event waiting to be published (or published, until retention removes it).

    `position` is the commit-ordered key the relay publishes by: a writer
    changing an aggregate holds that aggregate's row lock, so a later
    event of the same aggregate always gets a higher position.
    `ordering_key` groups the events whose order matters (the aggregate by
    default); a failing event holds back later events of its key only.
    """

    __tablename__ = "outbox_events"
    __table_args__ = (
        # Two small indexes besides the keys. On PostgreSQL and SQLite they
        # hold unfinished rows only (partial), so they stay as small as the
        # backlog, and lease and retry updates touch no indexed column (HOT
        # updates). MySQL/MariaDB have no partial index: there they are full
        # indexes that lead with the status (and the key), which keeps the
        # same lookups to short ranges.
        # The claim: pending events in position order.
        Index(
            "ix_outbox_events_pending",
            "status",
            "position",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # Order per key: an earlier unfinished (pending or parked) event of the same key.
        Index(
            "ix_outbox_events_unfinished",
            "ordering_key",
            "status",
            "position",
            postgresql_where=text("status IN ('pending', 'failed')"),
            sqlite_where=text("status IN ('pending', 'failed')"),
        ),
    )

    position: Mapped[int] = mapped_column(Position, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, default=lambda: str(uuid.uuid4()))
    event_type: Mapped[str] = mapped_column(String(200))
    aggregate_type: Mapped[str] = mapped_column(String(100))
    aggregate_id: Mapped[str] = mapped_column(String(100))
    ordering_key: Mapped[str] = mapped_column(String(255))
    payload: Mapped[str] = mapped_column(LongText)
    headers: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default=PENDING)
    created_at: Mapped[datetime] = mapped_column(UTCTimestamp, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCTimestamp, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UTCTimestamp)
    error: Mapped[str | None] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(default=0)
    # The lease of the relay batch that holds the event (database clock): while
    # it runs, no other relay takes the event or a later one of its key.
    claimed_until: Mapped[datetime | None] = mapped_column(UTCTimestamp)
    claimed_by: Mapped[str | None] = mapped_column(String(36))

    @classmethod
    def create_event(
        cls,
        session: Session,
        event_type: str,
        aggregate_type: str,
        aggregate_id: Any,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        ordering_key: str | None = None,
        lock: Any = None,
    ) -> OutboxEvent:
        """Add an event to `session`; it is written, or not, with the session's transaction.

        Its position is taken under the aggregate's row lock, so the events of
        one aggregate are numbered in the order their transactions commit:
        this flushes the session (a pending change of the aggregate takes the
        lock as OutboxMixin's events do) and locks the aggregate's row with
        SELECT ... FOR UPDATE before the event is added. The aggregate is the
        OutboxMixin model whose type is `aggregate_type`, found by its id; its
        version goes into the `aggregate-version` header. Pass `lock` (a
        mapped object) when that cannot find it, and with a custom
        `ordering_key`: the row that owns the key, which every writer of that
        key must lock the same way.
        """
        version = lock_aggregate(session, lock, aggregate_type, aggregate_id)
        if version is not None:
            headers = {VERSION_HEADER: str(version), **(headers or {})}
        event = cls(**event_values(event_type, aggregate_type, aggregate_id, payload, headers, ordering_key))
        session.add(event)
        return event

    @property
    def data(self) -> Any:
        """The payload, decoded."""
        return json.loads(self.payload)

    @property
    def header_map(self) -> dict[str, str]:
        """The headers (trace context first of all), decoded."""
        return json.loads(self.headers) if self.headers else {}

    def __repr__(self) -> str:
        return f"<OutboxEvent {self.id} {self.event_type} {self.status}>"


def aggregate_mapper(aggregate_type: str) -> Mapper | None:
    """The mapper of the OutboxMixin model (the topmost, with inheritance) of `aggregate_type`."""
    for mapper in db.Model.registry.mappers:
        model = mapper.class_
        if (
            issubclass(model, OutboxMixin)
            and mapper.inherits is None
            and model.outbox_aggregate_type() == aggregate_type
            and model.outbox_aggregate_id is OutboxMixin.outbox_aggregate_id
        ):
            return mapper
    return None


def lock_aggregate(session: Session, lock: Any, aggregate_type: str, aggregate_id: Any) -> int | None:
    """Flush, then lock the row of `lock` (or of the aggregate) until commit; its version, if any.

    Writers of one aggregate then take their events' positions one after the
    other, in commit order. Without a row to lock (no model of this
    aggregate type) it neither flushes nor locks. Returns None then, when
    there is no such row, when the row has no version, and when `lock` is
    another row than the aggregate's.
    """
    if lock is not None:
        session.flush()  # a new `lock` gets its primary key, a changed one its UPDATE
        mapper = inspect(lock).mapper
        identity = tuple(mapper.primary_key_from_instance(lock))
        is_aggregate = (
            isinstance(lock, OutboxMixin)
            and lock.outbox_aggregate_type() == aggregate_type
            and lock.outbox_aggregate_id() == str(aggregate_id)
        )
    else:
        mapper = aggregate_mapper(aggregate_type)
        if mapper is None or len(mapper.primary_key) != 1:
            return None
        try:
            identity = (mapper.primary_key[0].type.python_type(aggregate_id),)
        except (NotImplementedError, TypeError, ValueError):
            return None
        session.flush()  # a pending change of the aggregate takes the lock, and gets its event, first
        is_aggregate = True
    version_column = mapper.version_id_col
    columns = [*mapper.primary_key, *([version_column] if version_column is not None else [])]
    row = session.execute(
        select(*columns)
        .select_from(mapper.persist_selectable)
        .where(primary_key_clause(mapper, identity))
        .with_for_update(),
        bind_arguments={"mapper": mapper},
    ).first()
    if row is None or version_column is None or not is_aggregate:
        return None
    return row[-1]

"""Idempotent consumers: a redelivered message (same id) runs its handler once.

The outbox publishes at least once: after a crash the batch in flight is
published again, and a broker redelivers what a consumer did not
acknowledge. A consumer decorated with `idempotent_consumer` records each
message id in `processed_messages` in the same transaction as the
handler's own database writes, so the handler's effects happen exactly
once: a duplicate finds the mark and is skipped; a handler that raises
rolls the mark back and the message can be retried.

Redelivery is not the only surprise: a message can also arrive after a
newer one of its aggregate (a requeued dead letter) or after a gap (events
written while the outbox was off). Every event carries its aggregate's
version in the `aggregate-version` header; `check_version` compares it with
the last version the consumer applied.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import String, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from common_utils.database import db
from common_utils.outbox.model import ORDERING_KEY_HEADER, VERSION_HEADER, UTCTimestamp, utcnow

logger = logging.getLogger(__name__)


class ProcessedMessage(db.Model):
    """A message a consumer has handled; the primary key makes a second run impossible."""

    __tablename__ = "processed_messages"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(UTCTimestamp, default=utcnow, index=True)


def default_message_id(*args: Any, **kwargs: Any) -> str:
    """The id of the message a handler was called with.

    Understands the outbox handler signature `(aggregate_id, payload, event)`
    (the event's id), pika's `(channel, method, properties, body)` (the AMQP
    message id) and a `message_id=` keyword argument.
    """
    if "message_id" in kwargs:
        return str(kwargs["message_id"])
    for arg in args:
        message_id = getattr(arg, "message_id", None)
        if isinstance(message_id, str) and message_id:
            return message_id
    for arg in args:
        if hasattr(arg, "event_type") and getattr(arg, "id", None):
            return str(arg.id)
    raise ValueError("cannot tell the message id: pass message_id=... or a `message_id` callable")


def already_processed(consumer: str, message_id: str) -> bool:
    return db.session.get(ProcessedMessage, (consumer, message_id)) is not None


#: Unique-violation codes: PostgreSQL's SQLSTATE, MySQL's and MariaDB's error number.
UNIQUE_VIOLATION_SQLSTATE = "23505"
MYSQL_DUPLICATE_ENTRY = 1062


def is_duplicate_mark(error: IntegrityError) -> bool:
    """Whether inserting a processed mark failed because the same mark exists.

    Only the mark's own INSERT runs when this is asked, so a unique
    violation can only be its primary key; any other integrity error (a NULL,
    a check, a trigger) is not a duplicate.
    """
    original = error.orig
    arguments = getattr(original, "args", ())
    if arguments and isinstance(arguments[0], int):  # MySQL drivers: (error number, message)
        return arguments[0] == MYSQL_DUPLICATE_ENTRY
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate == UNIQUE_VIOLATION_SQLSTATE
    # SQLite reports no code through the DB-API: "UNIQUE constraint failed: processed_messages.consumer, ..."
    return str(original).startswith(f"UNIQUE constraint failed: {ProcessedMessage.__tablename__}.")


def insert_mark(session: Any, consumer: str, message_id: str) -> None:
    """Insert the processed mark so that its failure undoes the mark only."""
    statement = insert(ProcessedMessage).values(consumer=consumer, message_id=message_id, processed_at=utcnow())
    if session.get_bind(ProcessedMessage).dialect.name == "sqlite":
        # SQLite undoes just the failed statement; a savepoint taken before any
        # write would even commit on release (the driver begins transactions late).
        session.execute(statement)
        return
    with session.begin_nested():  # PostgreSQL aborts the whole transaction on an error
        session.execute(statement)


def idempotent_consumer(
    consumer: str, message_id: Callable[..., str] = default_message_id
) -> Callable[[Callable], Callable]:
    """Decorator: run the handler at most once per message id for `consumer`.

    The wrapped call commits `db.session`: the processed mark and whatever
    the handler wrote are one transaction. It returns the handler's result,
    or None for a duplicate (logged at INFO).

    Only a duplicate mark counts as a duplicate. The caller's pending
    changes are flushed first, outside the mark's savepoint, so their
    integrity errors propagate; a duplicate rolls back the savepoint only
    and leaves the caller's work in the session, neither dropped nor
    committed. Any other error while writing the mark propagates too.
    """

    def decorator(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = message_id(*args, **kwargs)
            session = db.session
            session.flush()  # the caller's own pending work: its errors are its own
            try:
                insert_mark(session, consumer, key)  # waits on a duplicate still in flight, then fails
            except IntegrityError as error:
                if not is_duplicate_mark(error):
                    raise
                logger.info("skipping duplicate message %s for %s", key, consumer)
                return None
            try:
                result = handler(*args, **kwargs)
                session.commit()
            except BaseException:
                session.rollback()
                raise
            return result

        return wrapper

    return decorator


class VersionOrder(enum.Enum):
    """Where a message's aggregate version stands against the last one a consumer applied."""

    FIRST = "first"  #: nothing applied yet for this aggregate
    NEXT = "next"  #: exactly one after the last: apply it
    SAME = "same"  #: the version already applied (a deleted event, a custom event, a redelivery)
    GAP = "gap"  #: newer, but versions were skipped: fetch the state, or wait for the missing ones
    STALE = "stale"  #: older than what was applied: a late or requeued event; do not apply its state


class VersionCheck(NamedTuple):
    order: VersionOrder
    version: int | None
    ordering_key: str | None


def check_version(last_applied: int | None, headers: Mapping[str, Any] | None) -> VersionCheck:
    """Compare a message's `aggregate-version` header with the last version applied.

    `headers` are an outbox event's `header_map` or an AMQP message's
    headers. The consumer keeps `last_applied` per ordering key (the
    `ordering-key` header), for example in its own copy of the aggregate,
    in the same transaction as the handler's writes. A message without a
    version (an aggregate without one) is FIRST when nothing was applied,
    otherwise SAME: there is nothing to compare.

    Each change of a versioned aggregate adds one to its version, so NEXT is
    the normal case and GAP means events are missing (written while the
    outbox was switched off, or parked as dead letters).
    """
    headers = headers or {}
    ordering_key = headers.get(ORDERING_KEY_HEADER)
    raw = headers.get(VERSION_HEADER)
    try:
        version = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        version = None
    if last_applied is None:
        order = VersionOrder.FIRST
    elif version is None or version == last_applied:
        order = VersionOrder.SAME
    elif version == last_applied + 1:
        order = VersionOrder.NEXT
    elif version > last_applied:
        order = VersionOrder.GAP
    else:
        order = VersionOrder.STALE
    return VersionCheck(order, version, ordering_key)

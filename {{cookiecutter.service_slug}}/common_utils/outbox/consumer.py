"""Idempotent consumers: a redelivered message (same id) runs its handler once.

The outbox publishes at least once: after a crash the batch in flight is
published again, and a broker redelivers what a consumer did not
acknowledge. A consumer decorated with `idempotent_consumer` records each
message id in `processed_messages` in the same transaction as the
handler's own database writes, so the handler's effects happen exactly
once: a duplicate finds the mark and is skipped; a handler that raises
rolls the mark back and the message can be retried.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from common_utils.database import db
from common_utils.outbox.model import UTCTimestamp, utcnow

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


def idempotent_consumer(
    consumer: str, message_id: Callable[..., str] = default_message_id
) -> Callable[[Callable], Callable]:
    """Decorator: run the handler at most once per message id for `consumer`.

    The wrapped call commits `db.session`: the processed mark and whatever
    the handler wrote are one transaction. It returns the handler's result,
    or None for a duplicate (logged at INFO).
    """

    def decorator(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = message_id(*args, **kwargs)
            session = db.session
            session.add(ProcessedMessage(consumer=consumer, message_id=key))
            try:
                session.flush()  # waits on a concurrent duplicate, then fails
            except IntegrityError:
                session.rollback()
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

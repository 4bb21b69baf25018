"""Relay heartbeats in the database: a dead or stuck relay shows wherever it ran.

Each relay loop (a thread of `flask outbox relay`, or of a serving
process) keeps a row in `outbox_relays` and stamps it with the database's
clock as it goes round. Any process of the service, not only the one that
relays, can then tell from the table whether relaying is alive: the
`outbox_relay` readiness check and the `outbox_relays` gauge read it. A
relay stopped cleanly deletes its row; the row of one that died or hangs
goes stale after OUTBOX_RELAY_STALE_AFTER seconds, and is forgotten after
an hour.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime

from sqlalchemy import String, Text, delete, func, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column

from common_utils.database import db
from common_utils.outbox.claim import OutboxStore, db_now, db_now_plus
from common_utils.outbox.model import UTCTimestamp

FORGET_AFTER_SECONDS = 3600.0
MAX_ERROR_LENGTH = 2000


class OutboxRelay(db.Model):
    """One running relay loop and the last time it went round (database clock)."""

    __tablename__ = "outbox_relays"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(UTCTimestamp)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCTimestamp)
    last_error: Mapped[str | None] = mapped_column(Text)


class Heartbeat:
    """The row of one relay loop: `beat()` as it goes round, `stop()` when it ends."""

    def __init__(self, store: OutboxStore, worker: int):
        self.store = store
        self.host = socket.gethostname()[:255]
        self.name = f"{self.host[:50]}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{worker}"
        self.error: str | None = None

    def beat(self) -> None:
        table = OutboxRelay.__table__
        with self.store.begin() as connection:
            updated = connection.execute(
                update(table)
                .where(table.c.name == self.name)
                .values(heartbeat_at=db_now(), last_error=self.error)
            ).rowcount
            if not updated:  # first beat, or the row was forgotten while this loop hung
                connection.execute(
                    insert(table).values(
                        name=self.name,
                        host=self.host,
                        pid=os.getpid(),
                        started_at=db_now(),
                        heartbeat_at=db_now(),
                        last_error=self.error,
                    )
                )

    def stop(self) -> None:
        table = OutboxRelay.__table__
        with self.store.begin() as connection:
            connection.execute(delete(table).where(table.c.name == self.name))


def relay_health(store: OutboxStore, stale_after: float) -> dict:
    """Live and stale relay loops, and the age of the freshest heartbeat (database clock)."""
    table = OutboxRelay.__table__
    with store.engine.connect() as connection:
        now, newest = connection.execute(select(db_now(), func.max(table.c.heartbeat_at))).one()
        stale = connection.execute(
            select(table.c.name, table.c.heartbeat_at, table.c.last_error)
            .where(table.c.heartbeat_at < db_now_plus(-stale_after))
            .order_by(table.c.heartbeat_at)
        ).all()
        total = connection.scalar(select(func.count()).select_from(table))
    return {
        "live": total - len(stale),
        "stale": len(stale),
        "stale_relays": [
            {"name": row.name, "silent_seconds": round((now - row.heartbeat_at).total_seconds(), 1), "last_error": row.last_error}
            for row in stale[:5]
        ],
        "heartbeat_age_seconds": round((now - newest).total_seconds(), 3) if newest is not None else None,
    }


def forget_dead_relays(store: OutboxStore) -> int:
    table = OutboxRelay.__table__
    with store.begin() as connection:
        return connection.execute(
            delete(table).where(table.c.heartbeat_at < db_now_plus(-FORGET_AFTER_SECONDS))
        ).rowcount

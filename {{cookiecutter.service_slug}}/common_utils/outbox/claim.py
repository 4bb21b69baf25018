"""The relay's SQL: claim a batch under a lease, mark the outcome, park, requeue, retain.

Every statement here is one short transaction; none stays open while a
batch is published:

1. claim: take the due events no earlier event of their key holds back
   and lease them (`claimed_until`, `claimed_by`), commit;
2. publish (the transport, outside any transaction);
3. mark: record each event's outcome, only on the rows this lease still
   holds (a relay that outlived its lease marks nothing), commit.

Times that decide scheduling (due, lease, retry, retention) are the
database's clock (`db_now()`), never this process's: writers, relays and
the database may disagree about the time.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter

from sqlalchemy import (
    Float,
    Integer,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from common_utils.outbox.model import FAILED, PENDING, PROCESSED, SKIPPED_BY_OPERATOR, UTCTimestamp

# Status literals are written into the SQL, not bound: PostgreSQL uses a
# partial index only when it can prove the query's predicate implies the
# index's, which a bound parameter of a generic (prepared) plan defeats.
PENDING_SQL = literal_column(f"'{PENDING}'")
FAILED_SQL = literal_column(f"'{FAILED}'")
PROCESSED_SQL = literal_column(f"'{PROCESSED}'")
SKIPPED_SQL = literal_column(f"'{SKIPPED_BY_OPERATOR}'")


#: How PostgreSQL must plan a claim, for the claim's transaction only (SET
#: LOCAL: nothing stays on the connection, which a transaction-mode pooler
#: would hand to other clients). Sorting off: the claim must walk the pending
#: index in position order and stop after `limit` rows; with statistics that
#: lag a sudden backlog, PostgreSQL otherwise plans to check and sort every
#: pending row on each claim. Custom plans only: psycopg prepares a statement
#: on its fifth run, and the generic plan PostgreSQL may then keep knows
#: neither the LIMIT nor the values; measured at 1,000 events/s it made claims
#: of a hundred rows take up to 17 s on a connection held by a relay.
CLAIM_PLANNING = "SET LOCAL enable_sort = off; SET LOCAL plan_cache_mode = force_custom_plan"


class db_now(FunctionElement):
    """The database's current UTC time, in the format UTCTimestamp stores."""

    type = UTCTimestamp()
    inherit_cache = True


class db_now_plus(FunctionElement):
    """The database's current UTC time plus a number of seconds (a float, may be negative)."""

    type = UTCTimestamp()
    inherit_cache = True


@compiles(db_now)
def _now_default(element, compiler, **kw):
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "postgresql")
def _now_postgresql(element, compiler, **kw):
    return "statement_timestamp()"


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _now_mysql(element, compiler, **kw):
    return "UTC_TIMESTAMP(6)"


@compiles(db_now, "sqlite")
def _now_sqlite(element, compiler, **kw):
    # Microseconds, as SQLAlchemy stores them on SQLite, so text comparisons hold.
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


@compiles(db_now_plus, "postgresql")
def _plus_postgresql(element, compiler, **kw):
    return f"(statement_timestamp() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(db_now_plus, "mysql")
@compiles(db_now_plus, "mariadb")
def _plus_mysql(element, compiler, **kw):
    return f"DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ROUND(({compiler.process(element.clauses, **kw)}) * 1000000) MICROSECOND)"


@compiles(db_now_plus, "sqlite")
def _plus_sqlite(element, compiler, **kw):
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.3f seconds', {seconds}))"


@dataclass
class Claim:
    """A leased batch: the rows to publish and the token that marks them."""

    token: str
    rows: list
    #: Rows the claim selected before the order guard dropped some (a full
    #: selection tells the relay more is waiting). On PostgreSQL, where the
    #: guard runs inside the claim's statement, the rows kept.
    selected: int


class Statements:
    """The relay's per-batch statements, built once per store.

    A relay runs them for every batch; building the claim's expression
    (aliases, a CTE, an EXISTS) each time cost more Python than executing
    it. Everything that varies is a named parameter: `limit`, `lease`
    (seconds), `token` (the lease's owner), `positions` and `keys` (lists).
    """

    def __init__(self, store: OutboxStore):
        t = store.table
        now = db_now()
        earlier = t.alias("earlier")
        held_back = exists().where(
            earlier.c.ordering_key == t.c.ordering_key,
            earlier.c.status.in_([PENDING_SQL, FAILED_SQL]),
            earlier.c.position < t.c.position,
            or_(
                earlier.c.status == FAILED_SQL,
                and_(earlier.c.retry_count > 0, earlier.c.next_attempt_at > now),
                earlier.c.claimed_until > now,
            ),
        )
        candidates = (
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
            .where(
                t.c.status == PENDING_SQL,
                # Never attempted: due now, whatever clock the writer had.
                or_(t.c.retry_count == 0, t.c.next_attempt_at <= now),
                or_(t.c.claimed_until.is_(None), t.c.claimed_until <= now),
                ~held_back,
            )
            .order_by(t.c.position)
            .limit(bindparam("limit", type_=Integer))
        )
        if store.locks_rows:
            candidates = candidates.with_for_update(skip_locked=True, of=t)
        self.candidates = candidates
        leased = {"claimed_until": db_now_plus(bindparam("lease", type_=Float)), "claimed_by": bindparam("token")}
        self.claim = self.claim_in_one_statement(t, candidates, leased)
        self.lease = update(t).where(store.among(t.c.position, "positions")).values(**leased)
        self.blockers = (
            select(t.c.ordering_key, func.min(t.c.position))
            .where(
                t.c.status.in_([PENDING_SQL, FAILED_SQL]),
                store.among(t.c.ordering_key, "keys"),
                t.c.position < bindparam("top"),
                ~store.among(t.c.position, "positions"),
            )
            .group_by(t.c.ordering_key)
        )
        held = t.c.claimed_by == bindparam("token")
        self.done = (
            update(t)
            .where(store.among(t.c.position, "positions"), held)
            .values(status=PROCESSED_SQL, processed_at=db_now(), error=None, claimed_until=None, claimed_by=None)
        )
        self.failed = (
            update(t)
            .where(t.c.position == bindparam("p"), held)
            .values(
                status=bindparam("s"),
                retry_count=bindparam("r"),
                next_attempt_at=db_now_plus(bindparam("d")),
                error=bindparam("e"),
                claimed_until=None,
                claimed_by=None,
            )
        )
        self.release = (
            update(t).where(store.among(t.c.position, "positions"), held).values(claimed_until=None, claimed_by=None)
        )

    @staticmethod
    def claim_in_one_statement(t, candidates, leased: dict):
        """PostgreSQL: select, order guard and lease in one `UPDATE ... RETURNING`, one round trip.

        The statement's single snapshot is enough for the guard: an earlier
        event of the key that another relay is claiming at this instant is
        still unfinished in it, so it holds ours back just as a second
        statement would. It runs after CLAIM_PLANNING in its transaction
        (`OutboxStore.relay_statements`).
        """
        batch = candidates.cte("batch").prefix_with("MATERIALIZED")
        earlier = t.alias("blocker")
        blocked = exists().where(
            earlier.c.ordering_key == batch.c.ordering_key,
            earlier.c.status.in_([PENDING_SQL, FAILED_SQL]),
            earlier.c.position < batch.c.position,
            earlier.c.position.not_in(select(batch.c.position).scalar_subquery()),
        )
        return (
            update(t)
            .where(t.c.position == batch.c.position, ~blocked)
            .values(**leased)
            .returning(*(t.c[column.name] for column in candidates.selected_columns))
        )


class OutboxStore:
    """The relay's statements on one engine and one outbox table."""

    def __init__(self, engine: Engine, table):
        self.engine = engine
        self.table = table
        self.dialect = engine.dialect.name
        self.held = threading.local()

    @property
    def locks_rows(self) -> bool:
        return self.dialect in ("postgresql", "mysql", "mariadb")

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A short transaction; READ COMMITTED where relays lock rows (each statement sees the latest commits)."""
        with self.engine.connect() as connection:
            if self.locks_rows:
                # MySQL's default REPEATABLE READ would show the order guard an old snapshot.
                connection.execution_options(isolation_level="READ COMMITTED")
            with connection.begin():
                yield connection

    @contextmanager
    def holding_connection(self) -> Iterator[None]:
        """Within this block, this thread's claims and marks share one connection, held between batches.

        A relay loop claims and marks every batch. Through the pool each was
        a transaction on a checked-out connection: a ping, BEGIN, the
        statement (after CLAIM_PLANNING for a claim) and COMMIT, five round
        trips for a claim and four for a mark, which under load set the pace
        of a batch more than the statements did. On PostgreSQL the loop
        instead holds one connection in autocommit: a claim is three round
        trips (BEGIN with CLAIM_PLANNING, the statement, COMMIT) and a mark
        one statement, its own transaction (only the lease's owner changes
        its rows, so it needs no isolation of its own). The connection is
        detached from the pool, so the app's pool keeps its full size.
        Elsewhere (MySQL's claim takes several statements) this changes nothing.
        """
        if self.dialect != "postgresql":
            yield
            return
        self.held.slot = slot = {"connection": None}
        try:
            yield
        finally:
            del self.held.slot
            if slot["connection"] is not None:
                with suppress(Exception):
                    slot["connection"].close()

    @contextmanager
    def relay_statements(self, *, claim: bool = False) -> Iterator[Connection]:
        """Where a claim or a mark runs: on the held connection if there is one, else in a pooled transaction."""
        slot = getattr(self.held, "slot", None)
        if slot is None:
            with self.begin() as connection:
                if claim and self.dialect == "postgresql":
                    connection.exec_driver_sql(CLAIM_PLANNING)
                yield connection
            return
        if slot["connection"] is None:
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            connection.detach()  # the pool opens another for the app if it needs one
            slot["connection"] = connection
        connection = slot["connection"]
        try:
            if claim:
                connection.exec_driver_sql(f"BEGIN ISOLATION LEVEL READ COMMITTED; {CLAIM_PLANNING}")
            yield connection
            if claim:
                connection.exec_driver_sql("COMMIT")
        except BaseException:
            slot["connection"] = None  # closing it rolls back; the next statement connects again
            with suppress(Exception):
                connection.close()
            raise

    def among(self, column, name: str):
        """`column IN :name`, a list given at execution; on PostgreSQL `= ANY(:name)`, one array parameter."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import ARRAY

            return column == any_(bindparam(name, type_=ARRAY(column.type)))
        return column.in_(bindparam(name, expanding=True))

    # -- claim -------------------------------------------------------------

    def claim(self, limit: int, lease_seconds: float) -> Claim:
        """Lease up to `limit` due events that nothing earlier of their key holds back.

        An event is held back by an earlier event of its key that is parked
        (dead-lettered), waiting to retry, or leased by another batch. The
        statement skips such keys instead of filling the batch with their
        rows, so one blocked key never slows the others. Rows another relay
        is claiming at this instant are skipped (SKIP LOCKED); the guard
        afterwards drops any event whose earlier event of the key is
        unfinished and not in this batch (a claim racing with ours).
        """
        token = str(uuid.uuid4())
        parameters = {"limit": limit, "lease": lease_seconds, "token": token}
        if self.dialect == "postgresql":
            with self.relay_statements(claim=True) as connection:
                rows = connection.execute(self.statements.claim, parameters).all()
            rows.sort(key=attrgetter("position"))
            return Claim(token=token, rows=rows, selected=len(rows))
        with self.begin() as connection:
            rows = connection.execute(self.statements.candidates, parameters).all()
            kept = self.keep_in_order(connection, rows) if rows else []
            if kept:
                connection.execute(self.statements.lease, {**parameters, "positions": [row.position for row in kept]})
        return Claim(token=token, rows=kept, selected=len(rows))

    @cached_property
    def statements(self) -> Statements:
        return Statements(self)

    def keep_in_order(self, connection: Connection, rows: list) -> list:
        """Drop events that an earlier unfinished event of the same key, outside the batch, must precede."""
        positions = [row.position for row in rows]
        blockers = dict(
            connection.execute(
                self.statements.blockers,
                {"keys": list({row.ordering_key for row in rows}), "top": max(positions), "positions": positions},
            ).all()
        )
        if not blockers:
            return rows
        return [row for row in rows if row.position < blockers.get(row.ordering_key, row.position + 1)]

    # -- mark --------------------------------------------------------------

    def mark(self, claim: Claim, done: list, failures: list[dict], released: list) -> int:
        """Record a batch's outcome on the rows its lease still holds; the number marked processed.

        `failures` are dicts with the position `p`, new status `s`, attempt
        count `r`, retry delay in seconds `d` and error text `e`.
        """
        processed = 0
        with self.relay_statements() as connection:
            if done:
                processed = connection.execute(
                    self.statements.done, {"positions": [row.position for row in done], "token": claim.token}
                ).rowcount
            if failures:
                connection.execute(self.statements.failed, [{**failure, "token": claim.token} for failure in failures])
            if released:
                self.release_rows(connection, claim, released)
        return processed

    def release(self, claim: Claim, rows: list) -> None:
        """Give rows back untouched (not attempted, or the broker was unreachable)."""
        if rows:
            with self.relay_statements() as connection:
                self.release_rows(connection, claim, rows)

    def release_rows(self, connection: Connection, claim: Claim, rows: list) -> None:
        connection.execute(self.statements.release, {"positions": [row.position for row in rows], "token": claim.token})

    # -- operator commands -------------------------------------------------

    def requeue(self, event_ids: list[str] | None = None, event_type: str | None = None) -> int:
        """Put dead-lettered events back, due now with a fresh retry budget, ahead of their key's later events."""
        t = self.table
        conditions = [t.c.status == FAILED_SQL]
        if event_ids:
            conditions.append(t.c.id.in_(event_ids))
        if event_type:
            conditions.append(t.c.event_type == event_type)
        with self.begin() as connection:
            return connection.execute(
                update(t)
                .where(and_(*conditions))
                .values(status=PENDING_SQL, retry_count=0, next_attempt_at=db_now(), error=None)
            ).rowcount

    def skip(self, event_ids: list[str]) -> int:
        """Give up on dead-lettered events: their keys' later events go on without them."""
        t = self.table
        with self.begin() as connection:
            return connection.execute(
                update(t)
                .where(t.c.status == FAILED_SQL, t.c.id.in_(event_ids))
                .values(status=SKIPPED_SQL, processed_at=db_now())
            ).rowcount

    # -- retention ---------------------------------------------------------

    def delete_finished(self, retention_seconds: float, chunk: int, max_chunks: int) -> int:
        """Delete processed and skipped events older than the retention, by primary-key ranges.

        Each chunk is one `DELETE ... WHERE position >= lo AND position < hi`
        (a range of the primary key, no sort, no id list) in its own
        transaction. It stops at the first range that still holds a finished
        event younger than the retention: positions grow with time, so what
        lies beyond is younger still. Unfinished (pending, parked) events
        are left where they are and do not stop it.
        """
        t = self.table
        cutoff = db_now_plus(bindparam("age", -retention_seconds))
        finished = t.c.status.in_([PROCESSED_SQL, SKIPPED_SQL])
        deleted = 0
        with self.engine.connect() as connection:
            low = connection.scalar(select(func.min(t.c.position)))
            top = connection.scalar(select(func.max(t.c.position)))
        if low is None:
            return 0
        for _ in range(max_chunks):
            high = low + chunk
            in_range = and_(t.c.position >= low, t.c.position < high)
            with self.begin() as connection:
                deleted += connection.execute(delete(t).where(in_range, finished, t.c.processed_at < cutoff)).rowcount
                younger = connection.scalar(select(t.c.position).where(in_range, finished).limit(1))
                if younger is not None or high > top:
                    break
                low = connection.scalar(select(func.min(t.c.position)).where(t.c.position >= high))
            if low is None:
                break
        return deleted

    def delete_marks(self, marks, retention_seconds: float, chunk: int, max_chunks: int) -> int:
        """Delete idempotent consumers' processed-message marks older than the retention, in chunks."""
        cutoff = db_now_plus(bindparam("age", -retention_seconds))
        deleted = 0
        for _ in range(max_chunks):
            with self.begin() as connection:
                keys = connection.execute(
                    select(marks.c.consumer, marks.c.message_id).where(marks.c.processed_at < cutoff).limit(chunk)
                ).all()
                for consumer in {key.consumer for key in keys}:
                    ids = [key.message_id for key in keys if key.consumer == consumer]
                    connection.execute(delete(marks).where(marks.c.consumer == consumer, marks.c.message_id.in_(ids)))
            deleted += len(keys)
            if len(keys) < chunk:
                break
        return deleted

    # -- observation ---------------------------------------------------------

    def stats(self) -> dict:
        """Pending and dead-lettered counts, and the age of the oldest pending event (database clock)."""
        t = self.table
        with self.engine.connect() as connection:
            counts = dict(
                connection.execute(
                    select(t.c.status, func.count())
                    .where(t.c.status.in_([PENDING_SQL, FAILED_SQL]))
                    .group_by(t.c.status)
                ).all()
            )
            now, oldest = connection.execute(
                select(
                    db_now(),
                    select(t.c.created_at)
                    .where(t.c.status == PENDING_SQL)
                    .order_by(t.c.position)
                    .limit(1)
                    .scalar_subquery(),
                )
            ).one()
        lag = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        return {"pending": counts.get(PENDING, 0), "failed": counts.get(FAILED, 0), "lag_seconds": round(lag, 3)}

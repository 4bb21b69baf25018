"""The relay under adversity: blocked keys, parked keys, skewed clocks, open transactions, crashes in its loop.

Each test tries to break one guarantee of common_utils/outbox/relay.py on
the database the suite runs against (TEST_DATABASE_URL).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import pytest
{%- if cookiecutter.use_metrics %}
from prometheus_client.parser import text_string_to_metric_families
{%- endif %}
from sqlalchemy import event{% if cookiecutter.database != "sqlite" %}, text{% endif %}

from app.events import processor
from app.extensions import db
from common_utils.outbox import FAILED, PENDING, PROCESSED, OutboxEvent, event_values, utcnow
from common_utils.outbox.relay import OutboxSettings
{%- if cookiecutter.database != "sqlite" %}
from tests.conftest import skip_or_fail
{%- endif %}
from tests.outbox_support import (
    outbox_app_with,
    registered_handler,
    run_relay,
    statuses,
    stop_relay,
    wait_until,
    write,
)


@pytest.fixture
def relay_app(app, make_app):
    """An in-process relay with retries slow enough that a failing key stays blocked."""
    with outbox_app_with(
        make_app,
        OUTBOX_TRANSPORT="in_process",
        OUTBOX_BACKOFF_BASE=30.0,
        OUTBOX_BACKOFF_MAX=60.0,
        OUTBOX_MIN_POLL_INTERVAL=0.01,
        OUTBOX_PROCESSING_INTERVAL=0.1,
        OUTBOX_RELAY_STALE_AFTER=5.0,
    ) as built:
        yield built


def drain(app, rounds: int = 20) -> int:
    total = 0
    with app.app_context():
        for _ in range(rounds):
            processed = processor.process_pending_events()
            total += processed
            if not processed:
                break
    return total


# -- item 7: no head-of-line blocking --------------------------------------------------


def test_a_blocked_key_does_not_stall_the_other_keys(relay_app):
    """600 events on a failing key, written first, do not hold back 50 events of other keys."""
    delivered = []

    def handler(aggregate_id, payload, event):
        if aggregate_id == "stuck":
            raise RuntimeError("this aggregate's consumer is down")
        delivered.append(aggregate_id)

    write(relay_app, [("stuck", seq) for seq in range(600)])
    write(relay_app, [(f"free-{index}", 0) for index in range(50)])
    with registered_handler("test.happened", handler):
        relay, thread = run_relay(relay_app, workers=1)  # one loop: nothing to take what it skips
        try:
            wait_until(lambda: len(delivered) == 50, timeout=10, what="the 50 events of the other keys")
        finally:
            stop_relay(relay, thread)
    assert sorted(delivered) == sorted(f"free-{index}" for index in range(50))
    assert list(statuses(relay_app).values()).count(PENDING) == 600


# -- item 8: a dead letter parks its key ------------------------------------------------


def test_a_dead_letter_parks_its_key_until_requeued_then_publishes_in_order(app, make_app):
    """After the dead letter the key's later events wait; `requeue <id>` publishes it first."""
    built = make_app(OUTBOX_TRANSPORT="in_process", OUTBOX_MAX_RETRY=2, OUTBOX_BACKOFF_BASE=0.01, OUTBOX_BACKOFF_MAX=0.02)
    delivered = []
    broken = {"on": True}

    def handler(aggregate_id, payload, event):
        if broken["on"] and (aggregate_id, payload["seq"]) == ("a", 0):
            raise RuntimeError("poison")
        delivered.append((aggregate_id, payload["seq"]))

    first, *_ = write(built, [("a", 0), ("a", 1), ("a", 2)])
    state = built.extensions["outbox"]
    try:
        with registered_handler("test.happened", handler), built.app_context():
            wait_until(lambda: state.run_batch().dead_lettered, timeout=5, what="the dead letter")
            write(built, [("b", 0)])  # another key, to show the relay does run
            drain(built)
            assert delivered == [("b", 0)]  # a/1 and a/2 wait behind the parked a/0
            assert statuses(built)[first] == FAILED
            broken["on"] = False
            result = built.test_cli_runner().invoke(args=["outbox", "requeue", first])
            assert result.exit_code == 0, result.output
            assert "requeued 1 event(s)" in result.output
            drain(built)
        assert delivered == [("b", 0), ("a", 0), ("a", 1), ("a", 2)]
        assert set(statuses(built).values()) == {PROCESSED}
    finally:
        state.close()


def test_skip_gives_up_on_a_dead_letter_and_releases_its_key(app, make_app):
    """`flask outbox skip <id>`: the parked event is never published, the key's later events go on."""
    built = make_app(OUTBOX_TRANSPORT="in_process", OUTBOX_MAX_RETRY=1)
    delivered = []

    def handler(aggregate_id, payload, event):
        if payload["seq"] == 0:
            raise RuntimeError("poison")
        delivered.append(payload["seq"])

    first, *_ = write(built, [("a", 0), ("a", 1), ("a", 2)])
    state = built.extensions["outbox"]
    try:
        with registered_handler("test.happened", handler), built.app_context():
            assert state.run_batch().dead_lettered == 1
            drain(built)
            assert delivered == []
            result = built.test_cli_runner().invoke(args=["outbox", "skip", first])
            assert result.exit_code == 0, result.output
            assert "skipped 1 event(s)" in result.output
            drain(built)
        assert delivered == [1, 2]
        assert statuses(built)[first] == "skipped"
    finally:
        state.close()


def test_default_retries_span_minutes_before_the_dead_letter():
    """With the shipped defaults an event is retried for at least 5 minutes (a realistic outage)."""
    from config import Config

    config = Config()
    settings = OutboxSettings.from_config({key: getattr(config, key) for key in dir(config) if key.startswith("OUTBOX_")})
    # Attempt n (of OUTBOX_MAX_RETRY) waits between half and all of BASE * 2**(n-1), capped.
    ceilings = [min(settings.backoff_max, settings.backoff_base * 2 ** (n - 1)) for n in range(1, settings.max_retry)]
    shortest, longest = sum(ceilings) / 2, sum(ceilings)
    assert shortest >= 300, f"dead-lettered after {shortest:.0f}s of failures"
    assert longest <= 3600


# -- item 10: the database's clock ------------------------------------------------------


def skew_clock(monkeypatch, offset: timedelta) -> None:
    """This process's clock, as the outbox code reads it, is `offset` off."""
    from common_utils.outbox import model, relay

    real = model.utcnow

    def skewed():
        return real() + offset

    monkeypatch.setattr(model, "utcnow", skewed)
    monkeypatch.setattr(relay, "utcnow", skewed, raising=False)


def test_a_relay_with_a_skewed_clock_schedules_by_the_database_clock(app, make_app, monkeypatch):
    """A relay an hour behind publishes new events, and retries on time what a relay ahead failed."""
    built = make_app(OUTBOX_TRANSPORT="in_process", OUTBOX_BACKOFF_BASE=0.2, OUTBOX_BACKOFF_MAX=0.2)
    state = built.extensions["outbox"]
    delivered = []
    fail = {"once": True}

    def handler(aggregate_id, payload, event):
        if aggregate_id == "retry" and fail["once"]:
            fail["once"] = False
            raise RuntimeError("transient")
        delivered.append(aggregate_id)

    write(built, [("new", 0), ("retry", 0)])
    try:
        with registered_handler("test.happened", handler), built.app_context():
            skew_clock(monkeypatch, timedelta(hours=1))  # a relay ahead fails "retry" once
            state.run_batch()
            assert delivered == ["new"]
            monkeypatch.undo()
            skew_clock(monkeypatch, -timedelta(hours=1))  # a relay behind picks the retry up
            wait_until(lambda: state.run_batch().processed, timeout=5, what="the retry")
        assert delivered == ["new", "retry"]
    finally:
        state.close()


def test_events_are_due_at_once_whatever_the_writers_clock(relay_app, monkeypatch):
    """A writer whose clock is an hour ahead does not delay its events."""
    skew_clock(monkeypatch, timedelta(hours=1))
    write(relay_app, [("a", 0)])
    monkeypatch.undo()
    with relay_app.app_context():
        assert processor.process_pending_events() == 1


{%- if cookiecutter.database != "sqlite" %}


# -- item 11: no transaction open while publishing --------------------------------------


def open_transactions(app) -> int:
    """Transactions open in the database, other than this query's."""
    with app.app_context():
        dialect = db.engine.dialect.name
        if dialect == "postgresql":
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
            )
        else:
            query = "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id <> connection_id()"
        with db.engine.connect() as connection:
            return connection.scalar(text(query))


def test_no_transaction_stays_open_while_a_batch_is_published(relay_app):
    """While a handler (or a broker round trip) blocks, the relay holds no transaction and no row lock."""
    state = relay_app.extensions["outbox"]
    if not state.locks_rows():
        skip_or_fail("SQLite: a single writer and no server to ask (set TEST_DATABASE_URL)")
    publishing, release = threading.Event(), threading.Event()

    def blocking(aggregate_id, payload, event):
        publishing.set()
        release.wait(10)

    def one_batch():
        with relay_app.app_context():
            state.run_batch()

    write(relay_app, [("a", 0), ("b", 0)])
    with registered_handler("test.happened", blocking):
        batch = threading.Thread(target=one_batch)
        batch.start()
        try:
            assert publishing.wait(5)
            assert open_transactions(relay_app) == 0
        finally:
            release.set()
            batch.join(10)
    assert set(statuses(relay_app).values()) == {PROCESSED}
{%- endif %}


# -- item 14: a supervised relay --------------------------------------------------------


class FlakyTransport:
    """Raises a non-database exception from publish() twice (once per relay worker), then accepts everything."""

    name = "flaky"

    def __init__(self):
        self.calls = 0
        self.published = []

    def publish(self, rows):
        self.calls += 1
        if self.calls <= 2:
            raise ValueError("a bug in a transport, or a malformed AMQP_URL")
        self.published.extend(row.id for row in rows)
        return [None] * len(rows)

    def status(self):
        return {}

    def close(self):
        pass


def test_the_relay_loop_survives_any_exception(relay_app):
    """An exception from the transport is logged and the loop goes on after a backoff."""
    state = relay_app.extensions["outbox"]
    transport = state._transport = FlakyTransport()
    ids = write(relay_app, [("a", 0), ("a", 1)])
    relay, thread = run_relay(relay_app)
    try:
        wait_until(lambda: len(transport.published) == 2, timeout=5, what="the events after the error")
        assert thread.is_alive()
    finally:
        stop_relay(relay, thread)
    assert transport.published == ids
{%- if cookiecutter.outbox == "rabbitmq" %}


def test_a_malformed_amqp_url_is_logged_and_retried_not_fatal(app, make_app):
    """The RabbitMQ transport cannot even be built: the loop records the error and keeps going."""
    from sqlalchemy import select

    from common_utils.outbox.heartbeat import OutboxRelay

    built = make_app(OUTBOX_TRANSPORT="rabbitmq", AMQP_URL="amqp://guest:guest@127.0.0.1:notaport/%2F")
    state = built.extensions["outbox"]
    write(built, [("a", 0)])
    relay, thread = run_relay(built, workers=1)
    try:

        def recorded_error():
            with built.app_context():
                errors = db.session.scalars(select(OutboxRelay.last_error)).all()
                db.session.remove()
            return any("Port could not be cast" in (error or "") for error in errors)

        wait_until(recorded_error, timeout=5, what="the error in the relay's heartbeat")
        assert thread.is_alive()
    finally:
        stop_relay(relay, thread)
        state.close()
    assert set(statuses(built).values()) == {PENDING}
{%- endif %}


def readiness(app) -> tuple[int, dict]:
    response = app.test_client().get("/health/ready")
    return response.status_code, response.json["checks"]["outbox_relay"]


def test_a_stuck_relay_shows_in_readiness_without_making_the_service_unready(app, make_app, caplog):
    """A relay whose publish hangs stops beating: outbox_relay goes down (non-critical), the reason in the log."""
    caplog.set_level(logging.DEBUG, logger="common_utils.health")
    built = make_app(OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_STALE_AFTER=0.5, OUTBOX_PROCESSING_INTERVAL=0.05)
    state = built.extensions["outbox"]
    hang, release = threading.Event(), threading.Event()

    def hanging(aggregate_id, payload, event):
        hang.set()
        release.wait(10)

    with registered_handler("test.happened", hanging):
        relay, thread = run_relay(built)
        try:
            wait_until(lambda: readiness(built)[1]["status"] == "up", timeout=5, what="the first heartbeat")
            write(built, [("a", 0)])
            assert hang.wait(5)
            wait_until(lambda: readiness(built)[1]["status"] == "down", timeout=5, what="the stale heartbeat")
            code, check = readiness(built)
            assert code == 200
            assert check["critical"] is False
            assert check["error"] == "check_failed"
            assert "dead or stuck" in caplog.text
{%- if cookiecutter.use_metrics %}
            scraped = built.test_client().get("/metrics").get_data(as_text=True)
            stale = [
                sample.value
                for family in text_string_to_metric_families(scraped)
                for sample in family.samples
                if sample.name == "outbox_relays" and sample.labels == {"state": "stale"}
            ]
            assert stale == [1.0]
{%- endif %}
        finally:
            release.set()
            stop_relay(relay, thread)
            state.close()
    caplog.clear()
    code, check = readiness(built)
    assert check["status"] == "down"
    assert "no relay is running" in caplog.text


# -- item 12: wake-ups without commit contention ----------------------------------------


def test_a_writing_transaction_sends_no_notify(relay_app):
    """The writer's transaction has no pg_notify (PostgreSQL's global lock at commit)."""
    statements = []
    with relay_app.app_context():
        engine = db.engine

        def record(conn, cursor, statement, parameters, context, executemany):
            statements.append(statement.lower())

        event.listen(engine, "before_cursor_execute", record)
        try:
            OutboxEvent.create_event(db.session, "test.happened", "test", "a", {"seq": 0})
            db.session.commit()
        finally:
            event.remove(engine, "before_cursor_execute", record)
            db.session.remove()
    assert any("insert into outbox_events" in statement for statement in statements)
    assert not [statement for statement in statements if "notify" in statement]
{%- if cookiecutter.database == "postgresql" %}


def listen(app):
    """A LISTEN connection on the outbox channel (PostgreSQL only)."""
    import psycopg

    from common_utils.outbox.model import NOTIFY_CHANNEL
    from common_utils.outbox.wakeup import libpq_conninfo

    with app.app_context():
        if db.engine.dialect.name != "postgresql":
            skip_or_fail("LISTEN/NOTIFY needs the PostgreSQL server (set TEST_DATABASE_URL)")
        connection = psycopg.connect(libpq_conninfo(db.engine.url), autocommit=True)
    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return connection


def test_a_commit_that_wrote_events_is_followed_by_a_notify(relay_app):
    """On PostgreSQL relays in other processes hear of the commit (NOTIFY from outside its transaction)."""
    with listen(relay_app) as listener, relay_app.app_context():
        OutboxEvent.create_event(db.session, "test.happened", "test", "a", {"seq": 0})
        db.session.commit()
        db.session.remove()
        assert list(listener.notifies(timeout=5, stop_after=1))


def test_the_notifier_sends_one_notify_per_interval_however_many_commits(relay_app):
    """Wake-ups are coalesced: 50 commits within the interval cost one NOTIFY."""
    from common_utils.outbox.wakeup import Notifier

    with relay_app.app_context():
        url = db.engine.url
    with listen(relay_app) as listener:
        notifier = Notifier(url, interval=30.0)
        for _ in range(50):
            notifier.wake(url)
        first = list(listener.notifies(timeout=5, stop_after=1))
        more = list(listener.notifies(timeout=0.5))
    assert (len(first), len(more)) == (1, 0)
{%- endif %}


# -- item 13: retention and indexes -----------------------------------------------------


def test_retention_deletes_finished_events_by_key_ranges_past_parked_ones(relay_app):
    """Old processed and skipped rows go in primary-key ranges; a parked row neither goes nor stops it."""
    old = utcnow() - timedelta(days=30)
    with relay_app.app_context():
        rows = [event_values("test.happened", "test", "a", {"seq": seq}) for seq in range(25)]
        for index, row in enumerate(rows):
            row.update(status=PROCESSED, processed_at=old)
            if index == 3:
                row.update(status=FAILED, processed_at=None)  # parked, in the middle of old rows
            if index == 4:
                row.update(status="skipped")
        rows[-1].update(processed_at=utcnow())  # young: retention stops here
        db.session.execute(OutboxEvent.__table__.insert(), rows)
        db.session.commit()
        db.session.remove()
    state = relay_app.extensions["outbox"]
    state.settings.cleanup_batch_size = 4
    assert state.cleanup() == 23
    assert sorted(statuses(relay_app).values()) == [FAILED, PROCESSED]
{%- if cookiecutter.database == "postgresql" %}


def test_the_pending_index_is_partial_on_postgresql(relay_app):
    """Two secondary indexes besides the keys; on PostgreSQL they hold unfinished rows only."""
    with relay_app.app_context():
        if db.engine.dialect.name != "postgresql":
            skip_or_fail("partial indexes need the PostgreSQL server (set TEST_DATABASE_URL)")
        with db.engine.connect() as connection:
            definitions = dict(
                connection.execute(
                    text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'outbox_events'")
                ).all()
            )
    secondary = {name: definition for name, definition in definitions.items() if name.startswith("ix_")}
    assert sorted(secondary) == ["ix_outbox_events_pending", "ix_outbox_events_unfinished"]
    assert all(" WHERE " in definition for definition in secondary.values())
    assert len(definitions) == 4  # with the primary key and the unique event id


def test_a_sudden_backlog_is_claimed_in_index_order_not_sorted_whole(relay_app):
    """Statistics taken on an empty table, then a backlog: the claim still walks the pending index."""
    with relay_app.app_context():
        if db.engine.dialect.name != "postgresql":
            skip_or_fail("query plans need the PostgreSQL server (set TEST_DATABASE_URL)")
        engine = db.engine
        with engine.begin() as connection:
            connection.execute(text("ANALYZE outbox_events"))
    write(relay_app, [(f"agg-{index % 100}", index // 100) for index in range(5000)])
    plans = []

    def explain_the_claim(connection, cursor, statement, parameters, context, executemany):
        if "FOR UPDATE" in statement:
            cursor.execute(f"EXPLAIN {statement}", parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))

    event.listen(engine, "before_cursor_execute", explain_the_claim)
    try:
        claim = relay_app.extensions["outbox"].store.claim(50, 30.0)
    finally:
        event.remove(engine, "before_cursor_execute", explain_the_claim)
    assert [row.position for row in claim.rows] == sorted(row.position for row in claim.rows)
    assert len(claim.rows) == 50
    [plan] = plans
    assert "Sort" not in plan, f"the claim sorts every pending row to take 50:\n{plan}"
{%- endif %}

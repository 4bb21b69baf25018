"""A relay loop's own connection on PostgreSQL: claims planned right, nothing left behind, replaced when it breaks.

A relay loop claims and marks on one connection it holds between batches,
in autocommit (common_utils/outbox/claim.py, `OutboxStore.holding_connection`).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from sqlalchemy import text

from app.extensions import db
from common_utils.outbox import PROCESSED
from tests.outbox_support import outbox_app_with, run_relay, statuses, stop_relay, wait_until, write

#: What a claim sets for itself (common_utils.outbox.claim.CLAIM_PLANNING) and must not leave behind.
SETTINGS = (
    "SELECT current_setting('enable_sort'), current_setting('plan_cache_mode'), current_setting('transaction_isolation')"
)


@pytest.mark.parametrize("held", [True, False], ids=["relay loop's connection", "pooled transaction"])
def test_claims_are_planned_for_their_values_every_time(app, make_app, held):
    """Past psycopg's prepare threshold a claim is still planned for its LIMIT: a generic plan made claims take seconds."""
    with outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process") as built:
        write(built, [(f"agg-{index}", 0) for index in range(200)])
        store = built.extensions["outbox"].store
        with built.app_context(), store.holding_connection() if held else nullcontext():
            for _ in range(20):  # prepared on the 6th run; PostgreSQL weighs a generic plan after 5 more
                claim = store.claim(5, 30.0)
                assert len(claim.rows) == 5
                store.release(claim, claim.rows)
            # Unheld, every claim took the pool's one idle connection: the one asked here.
            with store.relay_statements() as connection:
                plans = connection.execute(
                    text(
                        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                        "WHERE statement LIKE 'WITH batch%'"
                    )
                ).one()
    assert plans.generic_plans == 0, plans
    assert plans.custom_plans >= 10, plans


def test_a_claim_leaves_nothing_on_its_connection(app, make_app):
    """Between batches the relay's connection has the server's settings and no open transaction: a pooler may lend it out."""
    with outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process") as built:
        write(built, [(f"agg-{index}", 0) for index in range(3)])
        store = built.extensions["outbox"].store
        with built.app_context():
            defaults = db.session.execute(text(SETTINGS)).one()
            db.session.remove()
            with store.holding_connection():
                claim = store.claim(2, 30.0)
                store.mark(claim, claim.rows[:1], [], claim.rows[1:])
                with store.relay_statements() as connection:
                    between_batches = connection.execute(text(SETTINGS)).one()
                    in_transaction = connection.connection.dbapi_connection.info.transaction_status
    assert len(claim.rows) == 2
    assert tuple(between_batches) == tuple(defaults)
    assert in_transaction == 0  # psycopg.pq.TransactionStatus.IDLE


def test_a_relay_goes_on_after_its_connection_is_killed(app, make_app):
    """The database ends the relay's connection between batches: the next round connects again and relays."""
    with outbox_app_with(
        make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_PROCESSING_INTERVAL=0.1, OUTBOX_MIN_POLL_INTERVAL=0.01
    ) as built:
        [first] = write(built, [("agg", 0)])
        relay, thread = run_relay(built, workers=1)
        try:
            wait_until(lambda: statuses(built)[first] == PROCESSED, timeout=10, what="the first event relayed")
            with built.app_context():
                ended = db.session.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    )
                )
                db.session.remove()
            assert ended >= 2  # at least the relay's own connection and its LISTEN connection
            [second] = write(built, [("agg", 1)])
            wait_until(lambda: statuses(built)[second] == PROCESSED, timeout=15, what="the event after the kill")
        finally:
            stop_relay(relay, thread)

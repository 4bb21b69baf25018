"""A relay's loops: one relays a trickle alone, a backlog brings the others in, an idle one stays healthy.

PostgreSQL and MySQL only: on SQLite a relay runs one loop.
"""

from __future__ import annotations

import threading

from app.extensions import db
from common_utils.outbox import PROCESSED, OutboxEvent
from tests.outbox_support import (
    holds_for,
    outbox_app_with,
    registered_handler,
    run_relay,
    statuses,
    stop_relay,
    wait_until,
    write,
)


def commit_event(app, aggregate_id: str) -> None:
    """Commit one event through the session, as the service does: its commit wakes the relays."""
    with app.app_context():
        OutboxEvent.create_event(db.session, "test.happened", "test", aggregate_id, {"seq": 0})
        db.session.commit()
        db.session.remove()


def test_a_trickle_is_relayed_by_the_first_loop_alone(app, make_app):
    """A commit wakes the first loop only: while that loop is busy, the second leaves a new event to it."""
    first_started, release_first = threading.Event(), threading.Event()
    handled_by: dict[str, str] = {}

    def handler(aggregate_id, payload, event):
        if aggregate_id == "first":
            first_started.set()
            release_first.wait(10)
        handled_by[aggregate_id] = threading.current_thread().name

    def second_waits() -> None:
        assert "second" not in handled_by, "another loop took the event the first loop was woken for"

    with (
        registered_handler("test.happened", handler),
        outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process") as built,
    ):
        relay, thread = run_relay(built, workers=2)
        try:
            commit_event(built, "first")
            wait_until(first_started.is_set, timeout=10, what="the first event's handler")
            commit_event(built, "second")
            holds_for(second_waits, 1.0)  # a second loop woken by the commit takes it within milliseconds
            release_first.set()
            wait_until(lambda: len(handled_by) == 2, timeout=10, what="both events")
        finally:
            release_first.set()
            stop_relay(relay, thread)
    assert handled_by == {"first": thread.name, "second": thread.name}


def test_a_loop_waiting_for_a_backlog_is_not_reported_stuck(app, make_app):
    """The second loop, idle while one loop is enough, keeps beating: health counts both loops live throughout."""
    stale_after = 2.0
    with outbox_app_with(
        make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_STALE_AFTER=stale_after, OUTBOX_PROCESSING_INTERVAL=0.1
    ) as built:
        state = built.extensions["outbox"]
        relay, thread = run_relay(built, workers=2)
        try:
            wait_until(lambda: state.relay_health()["live"] == 2, timeout=10, what="both loops' first heartbeat")

            def both_live() -> None:
                health = state.relay_health()
                assert (health["live"], health["stale"]) == (2, 0), health

            holds_for(both_live, 1.5 * stale_after)  # a loop that stopped beating shows within stale_after
        finally:
            stop_relay(relay, thread)


def test_a_full_batch_brings_the_other_loops_in(app, make_app):
    """With a backlog, a second loop claims a batch while the first is still publishing its own."""
    helper_handled = threading.Event()
    first_loop_events, waited = [], []

    def handler(aggregate_id, payload, event):
        if threading.current_thread().name != relay_thread.name:
            helper_handled.set()
            return
        first_loop_events.append(aggregate_id)
        if len(first_loop_events) == 11:  # the first event of its second batch: held until a helper publishes
            waited.append(helper_handled.wait(10))

    with outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_BATCH_SIZE=10) as built:
        ids = write(built, [(f"backlog-{index}", 0) for index in range(60)])
        with registered_handler("test.happened", handler):
            relay, relay_thread = run_relay(built, workers=2)
            try:
                wait_until(lambda: set(statuses(built).values()) == {PROCESSED}, timeout=30, what="the backlog")
            finally:
                stop_relay(relay, relay_thread)
        assert set(statuses(built)) == set(ids)
    assert waited == [True]

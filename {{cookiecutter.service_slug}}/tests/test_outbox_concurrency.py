"""Several relays at once: every event published exactly once, each aggregate in commit order.

On PostgreSQL or MySQL/MariaDB (TEST_DATABASE_URL) four relays share the
work through row locks. SQLite has a single writer and allows one relay
per database file, so there the same check runs smaller, with one relay.
"""

from __future__ import annotations

import threading

import pytest

from tests.outbox_support import (
    Recorder,
    check_once_and_in_order,
    count_pending,
    outbox_app_with,
    registered_handler,
    wait_until,
    write_streams,
)


@pytest.fixture
def relay_app(app, make_app):
    with outbox_app_with(
        make_app,
        OUTBOX_TRANSPORT="in_process",
        OUTBOX_BATCH_SIZE=50,
        OUTBOX_BACKOFF_BASE=0.01,
        OUTBOX_BACKOFF_MAX=0.05,
        OUTBOX_MIN_POLL_INTERVAL=0.01,
        OUTBOX_PROCESSING_INTERVAL=0.2,
    ) as built:
        yield built


def test_four_relays_publish_each_event_once_in_aggregate_order(relay_app):
    """4 relays over 40 aggregates x 25 events, written while they run, with transient failures."""
    state = relay_app.extensions["outbox"]
    if state.locks_rows():
        relay_count, writers, aggregates_count, per_aggregate = 4, 4, 40, 25
    else:  # SQLite: one relay and one writer, a smaller run
        relay_count, writers, aggregates_count, per_aggregate = 1, 1, 20, 25
    recorder = Recorder(fail_once_every=17)
    relays = [state.relay(workers=1) for _ in range(relay_count)]
    threads = [threading.Thread(target=relay.run) for relay in relays]
    with registered_handler("test.happened", recorder):
        for thread in threads:
            thread.start()
        try:
            aggregates = write_streams(relay_app, aggregates_count, per_aggregate, writers=writers, per_transaction=25)
            wait_until(lambda: count_pending(relay_app) == 0, timeout=60, what="the backlog to drain")
        finally:
            for relay in relays:
                relay.stop()
            for thread in threads:
                thread.join(10)
    assert recorder.failed  # the transient failures did happen, and were retried
    check_once_and_in_order(recorder.calls, aggregates, per_aggregate)

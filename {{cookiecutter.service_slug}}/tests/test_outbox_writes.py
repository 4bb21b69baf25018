"""The write side of the outbox: events are the committed truth, in commit order, and consumers can tell.

- An event's payload is the row as its transaction wrote it, even when
  another transaction changed the row in between (item 1).
- Every event carries its aggregate's version and ordering key in its
  headers; `check_version` tells a consumer about gaps and reordering.
- The idempotent consumer skips a duplicate message id only: any other
  integrity error propagates and the caller's work is kept (item 5).
- `OutboxEvent.create_event` takes its position under the aggregate's lock,
  so two writers' events are numbered in their commit order (item 9).

The races of items 1 and 9 need a server database's row locks: they are in
test_outbox_races.py, which SQLite projects do not have.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from common_utils.outbox import VersionOrder, check_version
from common_utils.outbox.consumer import ProcessedMessage, idempotent_consumer
from tests.outbox_support import create_item, events_of, outbox_app_with, stored_row

AGGREGATE = "{{ cookiecutter.resource_name }}"


@pytest.fixture
def outbox_app(app, make_app):
    with outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_IN_APP=False) as built:
        yield built


# -- item 1: the payload is the row as written ---------------------------------------


def test_the_payload_is_the_row_as_written_including_a_concurrent_change(outbox_app, collection_url, new_item):
    """A column changed by another transaction (a script, no version bump) between the request's read
    and its write is in the event: the payload is read back from the row, not from memory."""
    client = outbox_app.test_client()
    item_id = create_item(outbox_app, client, collection_url, new_item)
    done = []

    def write_elsewhere(session, flush_context, instances):
        if not done:
            done.append(True)
            with db.engine.begin() as connection:
                connection.execute(
                    text("UPDATE {{ cookiecutter.resource_plural }} SET description = 'by a script' WHERE id = :id"),
                    {"id": item_id},
                )

    event.listen(Session, "before_flush", write_elsewhere)
    try:
        response = client.patch(f"{collection_url}/{item_id}", json={"quantity": 7})
    finally:
        event.remove(Session, "before_flush", write_elsewhere)
    assert (done, response.status_code) == ([True], 200)
    row = stored_row(outbox_app, item_id)
    assert (row["description"], row["quantity"]) == ("by a script", 7)
    assert events_of(outbox_app, item_id)[-1].data == row


# -- versions and ordering keys in the headers ---------------------------------------------


def test_every_event_carries_its_aggregate_version_and_ordering_key(outbox_app, collection_url, new_item):
    """created is version 1, each update one more, deleted the last version; the key is the aggregate's."""
    client = outbox_app.test_client()
    item_id = create_item(outbox_app, client, collection_url, new_item)
    client.patch(f"{collection_url}/{item_id}", json={"quantity": 5})
    client.patch(f"{collection_url}/{item_id}", json={"quantity": 6})
    client.delete(f"{collection_url}/{item_id}")
    events = events_of(outbox_app, item_id)
    assert [(e.event_type.rsplit(".", 1)[1], e.header_map["aggregate-version"]) for e in events] == [
        ("created", "1"),
        ("updated", "2"),
        ("updated", "3"),
        ("deleted", "3"),
    ]
    assert {e.header_map["ordering-key"] for e in events} == {f"{AGGREGATE}:{item_id}"}


def test_check_version_tells_next_same_gap_and_stale():
    """A consumer comparing with the last version it applied sees each case for what it is."""
    headers = {"aggregate-version": "4", "ordering-key": f"{AGGREGATE}:1"}
    assert check_version(None, headers) == (VersionOrder.FIRST, 4, f"{AGGREGATE}:1")
    assert check_version(3, headers).order is VersionOrder.NEXT
    assert check_version(4, headers).order is VersionOrder.SAME
    assert check_version(2, headers).order is VersionOrder.GAP
    assert check_version(5, headers).order is VersionOrder.STALE
    assert check_version(5, {}).order is VersionOrder.SAME  # no version: nothing to compare


def test_a_requeued_old_event_is_seen_as_stale_by_the_consumer(outbox_app, collection_url, new_item):
    """Delivered after a newer one (as a requeued dead letter is), an update is recognisably stale."""
    client = outbox_app.test_client()
    item_id = create_item(outbox_app, client, collection_url, new_item)
    client.patch(f"{collection_url}/{item_id}", json={"quantity": 5})
    client.patch(f"{collection_url}/{item_id}", json={"quantity": 6})
    created, first, second = events_of(outbox_app, item_id)
    applied = None
    seen = []
    for delivered in (created, second, first):  # `first` arrives late
        check = check_version(applied, delivered.header_map)
        seen.append(check.order)
        if check.order in (VersionOrder.FIRST, VersionOrder.NEXT, VersionOrder.GAP):
            applied = check.version
    assert seen == [VersionOrder.FIRST, VersionOrder.GAP, VersionOrder.STALE]


# -- item 5: only a duplicate message id is a duplicate ----------------------------------


def test_a_duplicate_is_skipped_and_the_callers_pending_work_is_kept(outbox_app, new_item):
    """A redelivered message is skipped without throwing away what the caller had pending."""
    runs = []

    @idempotent_consumer("audit")
    def handle(message_id):
        runs.append(message_id)

    with outbox_app.app_context():
        handle(message_id="m-1")
        db.session.add({{ cookiecutter.__resource_class }}(**{**new_item, "name": "pending work"}))
        assert handle(message_id="m-1") is None
        db.session.commit()
        names = db.session.scalars(select({{ cookiecutter.__resource_class }}.name)).all()
    assert (runs, names) == (["m-1"], ["pending work"])


def test_the_callers_integrity_error_is_not_taken_for_a_duplicate(outbox_app, new_item):
    """Pending work that breaks another constraint (a taken name) raises; the message is not skipped."""
    runs = []

    @idempotent_consumer("audit")
    def handle(message_id):
        runs.append(message_id)

    with outbox_app.app_context():
        db.session.add({{ cookiecutter.__resource_class }}(**{**new_item, "name": "taken"}))
        db.session.commit()
        db.session.add({{ cookiecutter.__resource_class }}(**{**new_item, "name": "taken"}))
        with pytest.raises(IntegrityError):
            handle(message_id="m-2")
        db.session.rollback()
        handle(message_id="m-2")
        marks = db.session.scalars(select(ProcessedMessage.message_id)).all()
    assert (runs, marks) == (["m-2"], ["m-2"])


def test_another_integrity_error_on_the_mark_itself_propagates(outbox_app):
    """A mark the database refuses for another reason (a NULL consumer) is an error, not a duplicate."""

    @idempotent_consumer(None)
    def handle(message_id):
        return "ran"

    with outbox_app.app_context(), pytest.raises(IntegrityError):
        handle(message_id="m-3")

"""The write side of the outbox: events are the committed truth, in commit order, and consumers can tell.

- An event's payload is the row as its transaction wrote it, even when
  another transaction changed the row in between (item 1): read back, or
  taken from memory where the version check proves the row (payload.py).
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

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest
from sqlalchemy import String, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from common_utils.outbox import OutboxEvent, OutboxMixin, VersionOrder, check_version
from common_utils.outbox.consumer import ProcessedMessage, idempotent_consumer
from tests.outbox_support import create_item, events_of, outbox_app_with, stored_row

AGGREGATE = "{{ cookiecutter.resource_name }}"


@pytest.fixture
def outbox_app(app, make_app):
    with outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_IN_APP=False) as built:
        yield built


# -- item 1: the payload is the row as written ---------------------------------------


class NoteBase(DeclarativeBase):
    """A registry of its own: the unversioned model below is not part of the service's migrations."""


class Note(OutboxMixin, NoteBase):
    """An aggregate without a version column: its updates prove nothing about the rest of the row."""

    __tablename__ = "outbox_test_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(String(50))

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "body": self.body}


@pytest.fixture
def notes(outbox_app):
    with outbox_app.app_context():
        NoteBase.metadata.create_all(db.engine)
    yield
    with outbox_app.app_context():
        NoteBase.metadata.drop_all(db.engine)


@contextmanager
def changed_elsewhere_before_the_flush(statement: str, **params) -> Iterator[list]:
    """Run `statement` in its own committed transaction right before the next flush (once);
    yields a list that holds True once it ran."""
    done = []

    def write_elsewhere(session, flush_context, instances):
        if not done:
            done.append(True)
            with db.engine.begin() as connection:
                connection.execute(text(statement), params)

    event.listen(Session, "before_flush", write_elsewhere)
    try:
        yield done
    finally:
        event.remove(Session, "before_flush", write_elsewhere)


def statements_of_a_patch(app, url: str) -> list[str]:
    """The SQL statements a PATCH of `url` sends to the database."""
    sent = []

    def record(connection, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    client = app.test_client()
    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert client.patch(url, json={"quantity": 7}).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


def read_back_in(sent: list[str]) -> bool:
    """Whether a statement came between the UPDATE and the event's INSERT (the read-back)."""
    update = next(index for index, statement in enumerate(sent) if statement.startswith("UPDATE"))
    insert = next(index for index, statement in enumerate(sent) if statement.startswith("INSERT INTO outbox_events"))
    return insert - update > 1


def test_an_unversioned_payload_is_read_back_with_a_concurrent_change(outbox_app, notes):
    """A column a script changed between the read and the write of a model without a version is
    in the event: the payload is read back from the row, not taken from memory."""
    with outbox_app.app_context():
        db.session.add(Note(id=1, title="first", body="original"))
        db.session.commit()
        note = db.session.get(Note, 1)
        note.title = "second"
        with changed_elsewhere_before_the_flush("UPDATE outbox_test_notes SET body = 'by a script'") as done:
            db.session.commit()
        payload = db.session.scalars(
            select(OutboxEvent.payload).where(OutboxEvent.aggregate_type == "note").order_by(OutboxEvent.position)
        ).all()[-1]
    assert (done, json.loads(payload)) == ([True], {"id": 1, "title": "second", "body": "by a script"})


def test_a_write_over_a_concurrent_versioned_change_is_refused_without_an_event(outbox_app, collection_url, new_item):
    """A script that changes a versioned row bumps its version (every writer must): the request that
    read the old version gets 409 and writes no event, so no event can miss the script's change."""
    client = outbox_app.test_client()
    item_id = create_item(outbox_app, client, collection_url, new_item)
    with changed_elsewhere_before_the_flush(
        "UPDATE {{ cookiecutter.resource_plural }} SET description = 'by a script', version = version + 1 WHERE id = :id",
        id=item_id,
    ) as done:
        response = client.patch(f"{collection_url}/{item_id}", json={"quantity": 7})
    assert (done, response.status_code) == ([True], 409)
    assert [e.event_type for e in events_of(outbox_app, item_id)] == [f"{AGGREGATE}.created"]
    assert stored_row(outbox_app, item_id)["description"] == "by a script"


def test_a_value_the_database_rounds_is_in_the_event_as_stored(outbox_app, new_item):
    """A price with more decimals than its column keeps is rounded by the database; the event says
    what was stored, not what was held in memory."""
    with outbox_app.app_context():
        item = {{ cookiecutter.__resource_class }}(**{**new_item, "unit_price": Decimal("1.005")})
        db.session.add(item)
        db.session.commit()
        item_id = item.id
    as_created = stored_row(outbox_app, item_id)
    with outbox_app.app_context():
        item = db.session.get({{ cookiecutter.__resource_class }}, item_id)
        item.unit_price = Decimal("2.675")
        db.session.commit()
    created, updated = events_of(outbox_app, item_id)
    assert (created.data, updated.data) == (as_created, stored_row(outbox_app, item_id))
    assert as_created["unit_price"] != "1.005"  # the database did round it


def test_a_versioned_update_of_exact_values_is_not_read_back(outbox_app, collection_url, new_item):
    """A PATCH of the example resource builds its event from memory on PostgreSQL and MySQL: the
    version check proves the row. SQLite keeps decimals as floats, so there it is read back."""
    item_id = create_item(outbox_app, outbox_app.test_client(), collection_url, new_item)
    sent = statements_of_a_patch(outbox_app, f"{collection_url}/{item_id}")
    with outbox_app.app_context():
        read_back_expected = db.engine.dialect.name == "sqlite"
    assert read_back_in(sent) is read_back_expected, sent
    assert events_of(outbox_app, item_id)[-1].data == stored_row(outbox_app, item_id)


def test_a_versioned_update_is_read_back_where_the_driver_cannot_count_rows(
    outbox_app, collection_url, new_item, monkeypatch
):
    """Without an updated-row count SQLAlchemy cannot check the version, which then proves nothing:
    the row is read back."""
    item_id = create_item(outbox_app, outbox_app.test_client(), collection_url, new_item)
    with outbox_app.app_context():
        monkeypatch.setattr(db.engine.dialect, "supports_sane_rowcount", False)
    with pytest.warns(match="versioning cannot be verified"):
        sent = statements_of_a_patch(outbox_app, f"{collection_url}/{item_id}")
    assert read_back_in(sent), sent
    assert events_of(outbox_app, item_id)[-1].data == stored_row(outbox_app, item_id)


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

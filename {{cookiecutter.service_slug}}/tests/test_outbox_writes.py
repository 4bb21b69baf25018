"""The write side of the outbox: events are the committed truth, in commit order, and consumers can tell.

- An event's payload is the row as its transaction wrote it, even when
  another transaction changed the row in between (item 1).
- Every event carries its aggregate's version and ordering key in its
  headers; `check_version` tells a consumer about gaps and reordering.
- The idempotent consumer skips a duplicate message id only: any other
  integrity error propagates and the caller's work is kept (item 5).
- `OutboxEvent.create_event` takes its position under the aggregate's lock,
  so two writers' events are numbered in their commit order (item 9).

The races run on two real connections of the project's server database;
SQLite (one writer at a time, no row locks) has no such race.
"""

from __future__ import annotations
{%- if cookiecutter.database != "sqlite" %}

import threading
{%- endif %}

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from common_utils.outbox import OutboxEvent, VersionOrder, check_version
from common_utils.outbox.consumer import ProcessedMessage, idempotent_consumer
{%- if cookiecutter.database != "sqlite" %}
from tests.conftest import skip_or_fail
from tests.outbox_support import wait_until
{%- endif %}

AGGREGATE = "{{ cookiecutter.resource_name }}"
{%- if cookiecutter.database != "sqlite" %}
#: Sessions waiting for a row lock held by another transaction, per database. InnoDB
#: refreshes innodb_trx only when it was last read over 0.1 s ago: poll slower than that.
LOCK_WAIT_POLL = 0.2
LOCK_WAITS = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
    "mysql": "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'",
}
{%- endif %}


@pytest.fixture
def outbox_app(app, make_app):
    built = make_app(OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_IN_APP=False)
    yield built
    built.extensions["outbox"].close()
    with built.app_context():
        db.engine.dispose()


{%- if cookiecutter.database != "sqlite" %}


@pytest.fixture
def row_locks(outbox_app) -> str:
    """The query counting lock waits on this database."""
    with outbox_app.app_context():
        name = db.engine.dialect.name
    if name not in LOCK_WAITS:
        skip_or_fail("needs row locks and concurrent writers: the server database (set TEST_DATABASE_URL)")
    return LOCK_WAITS[name]
{%- endif %}


def events_of(app, aggregate_id) -> list[OutboxEvent]:
    with app.app_context():
        events = db.session.scalars(
            select(OutboxEvent).where(OutboxEvent.aggregate_id == str(aggregate_id)).order_by(OutboxEvent.position)
        ).all()
        db.session.expunge_all()
        return events


def stored_row(app, item_id: int) -> dict:
    """The row as the database has it now, in the payload's shape."""
    with app.app_context(), Session(db.engine) as session:
        return session.get({{ cookiecutter.__resource_class }}, item_id).to_dict()
{%- if cookiecutter.database != "sqlite" %}


def lock_waits(app, query: str) -> int:
    with app.app_context(), db.engine.connect() as connection:
        return connection.execute(text(query)).scalar()


def wait_for_lock_wait(app, query: str, writer: threading.Thread) -> None:
    """Return once another transaction waits on a row lock (or the writer has finished: nothing blocked it)."""
    wait_until(
        lambda: not writer.is_alive() or lock_waits(app, query) > 0,
        timeout=10,
        what="the second writer to wait for the row lock or finish",
        interval=LOCK_WAIT_POLL,
    )
{%- endif %}


def create_item(app, client, collection_url, new_item) -> int:
    response = client.post(collection_url, json=new_item)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


# -- item 1: the payload is the row as written ---------------------------------------
{%- if cookiecutter.database != "sqlite" %}


def test_concurrent_patches_of_different_fields_leave_the_newest_event_equal_to_the_row(
    outbox_app, row_locks, collection_url, new_item
):
    """Writer A renames and holds the row; a PATCH of the quantity waits, then loses: 409, and the
    newest event's payload is exactly the row in the database."""
    client = outbox_app.test_client()
    item_id = create_item(outbox_app, client, collection_url, new_item)
    answers = []
    with outbox_app.app_context():
        item = db.session.get({{ cookiecutter.__resource_class }}, item_id)
        item.name = "renamed by A"
        db.session.flush()  # A's UPDATE holds the row lock until its commit
        patch = threading.Thread(
            target=lambda: answers.append(client.patch(f"{collection_url}/{item_id}", json={"quantity": 42}))
        )
        patch.start()
        wait_for_lock_wait(outbox_app, row_locks, patch)
        db.session.commit()
    patch.join(timeout=30)
    [answer] = answers
    row = stored_row(outbox_app, item_id)
    newest = events_of(outbox_app, item_id)[-1]
    assert newest.data == row
    assert newest.header_map["aggregate-version"] == str(row["version"])
    assert answer.status_code == 409, answer.get_json()
    assert (row["name"], row["quantity"]) == ("renamed by A", new_item["quantity"])
{%- endif %}


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
{%- if cookiecutter.database != "sqlite" %}


# -- item 9: create_event under the aggregate's lock ----------------------------------------


def test_create_event_positions_follow_the_commit_order_of_two_writers(outbox_app, row_locks, collection_url, new_item):
    """The README's recipe from two writers on one aggregate: the first holds its transaction open,
    the second commits as soon as it can; the outbox positions are the commit order."""
    item_id = create_item(outbox_app, outbox_app.test_client(), collection_url, new_item)
    commits, committing = [], threading.Lock()

    def recipe(writer: str) -> None:
        """The README's, word for word but the payload."""
        item = db.session.get({{ cookiecutter.__resource_class }}, item_id)
        OutboxEvent.create_event(db.session, "{{ cookiecutter.resource_name }}.shipped", "{{ cookiecutter.resource_name }}", item.id, {"writer": writer})

    def second_writer():
        with outbox_app.app_context():
            recipe("second")
            db.session.commit()
            with committing:
                commits.append("second")

    with outbox_app.app_context():
        recipe("first")
        db.session.flush()  # the first writer's event has its position
        writer = threading.Thread(target=second_writer)
        writer.start()
        wait_for_lock_wait(outbox_app, row_locks, writer)
        with committing:  # noted before a writer this commit releases can note itself
            db.session.commit()
            commits.append("first")
    writer.join(timeout=30)
    shipped = [e.data["writer"] for e in events_of(outbox_app, item_id) if e.event_type.endswith(".shipped")]
    assert shipped == commits


def test_create_event_with_a_custom_ordering_key_locks_the_row_it_is_given(
    outbox_app, row_locks, collection_url, new_item
):
    """Events of several aggregates share a key (one owner row): `lock=` numbers them in commit order.

    The first writer holds the owner's lock until the second one waits for it.
    """
    owner_id = create_item(outbox_app, outbox_app.test_client(), collection_url, new_item)
    commits, committing = [], threading.Lock()
    locked, release = threading.Event(), threading.Event()

    def add_line(writer: str) -> None:
        owner = db.session.get({{ cookiecutter.__resource_class }}, owner_id)
        OutboxEvent.create_event(
            db.session, "line.added", "line", writer, {"writer": writer}, ordering_key="owner", lock=owner
        )

    def first_writer() -> None:
        with outbox_app.app_context():
            add_line("first")
            db.session.flush()
            locked.set()
            release.wait(timeout=30)
            with committing:  # noted before the writer this commit releases can note itself
                db.session.commit()
                commits.append("first")

    def release_once_the_second_waits() -> None:
        try:
            wait_until(
                lambda: lock_waits(outbox_app, row_locks) > 0,
                timeout=10,
                what="the second writer to wait",
                interval=LOCK_WAIT_POLL,
            )
        finally:
            release.set()

    first = threading.Thread(target=first_writer)
    first.start()
    assert locked.wait(timeout=10)
    releaser = threading.Thread(target=release_once_the_second_waits)
    releaser.start()
    with outbox_app.app_context():
        add_line("second")
        db.session.commit()
        with committing:
            commits.append("second")
    first.join(timeout=30)
    releaser.join(timeout=30)
    with outbox_app.app_context():
        keyed = db.session.scalars(
            select(OutboxEvent).where(OutboxEvent.ordering_key == "owner").order_by(OutboxEvent.position)
        ).all()
        assert [e.data["writer"] for e in keyed] == commits == ["first", "second"]
        assert "aggregate-version" not in keyed[0].header_map  # the owner's version is not the line's
{%- endif %}

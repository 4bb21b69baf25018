"""Races on one aggregate, on two real connections of the server database.

- Two concurrent PATCHes of different fields: the newest event's payload is
  the row as committed, with both changes (item 1).
- `OutboxEvent.create_event` takes its position under the aggregate's lock,
  so two writers' events are numbered in their commit order, also with a
  custom ordering key (item 9).

SQLite has one writer at a time and no row locks, so projects on it do not
have these races nor this file. Run offline on SQLite, the tests skip
(TEST_REQUIRE_SERVICES makes that a failure).
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, text

from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from common_utils.outbox import OutboxEvent
from tests.conftest import skip_or_fail
from tests.outbox_support import create_item, events_of, outbox_app_with, stored_row, wait_until

AGGREGATE = "{{ cookiecutter.resource_name }}"
#: Sessions waiting for a row lock held by another transaction, per database. InnoDB
#: refreshes innodb_trx only when it was last read over 0.1 s ago: poll slower than that.
LOCK_WAIT_POLL = 0.2
LOCK_WAITS = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
    "mysql": "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'",
}


@pytest.fixture
def outbox_app(app, make_app):
    with outbox_app_with(make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_IN_APP=False) as built:
        yield built


@pytest.fixture
def row_locks(outbox_app) -> str:
    """The query counting lock waits on this database."""
    with outbox_app.app_context():
        name = db.engine.dialect.name
    if name not in LOCK_WAITS:
        skip_or_fail("needs row locks and concurrent writers: the server database (set TEST_DATABASE_URL)")
    return LOCK_WAITS[name]


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


# -- item 1: the payload is the row as written ---------------------------------------


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

"""What the database keeps: ids are never reused, timestamps keep their microseconds.

These run on the session database, so with TEST_DATABASE_URL they check the
real PostgreSQL or MySQL/MariaDB server, and SQLite otherwise.
"""

from datetime import UTC, datetime

from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}


def test_a_deleted_id_is_never_given_again(client, collection_url, new_item):
    """Events and caches name items by id: after a delete, new items get new ids, even the highest one's."""
    first = client.post(collection_url, json=new_item).get_json()["id"]
    second = client.post(collection_url, json={**new_item, "name": "Second"}).get_json()["id"]
    assert client.delete(f"{collection_url}/{second}").status_code == 204
    third = client.post(collection_url, json={**new_item, "name": "Third"}).get_json()["id"]
    assert third > second > first
    for item_id in (first, third):
        assert client.delete(f"{collection_url}/{item_id}").status_code == 204
    fourth = client.post(collection_url, json={**new_item, "name": "Fourth"}).get_json()["id"]
    assert fourth > third


def test_timestamps_keep_their_microseconds(app):
    """A timestamp is read back to the microsecond (MySQL's plain DATETIME would drop the fraction)."""
    moment = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    later = datetime(2030, 1, 2, 3, 4, 5, 999999, tzinfo=UTC)
    with app.app_context():
        item = {{ cookiecutter.__resource_class }}(name="Timed", quantity=1, unit_price="1.00")
        item.created_at = moment
        db.session.add(item)
        db.session.commit()
        item_id = item.id
        # An UPDATE sets updated_at itself; store a known value in a second step.
        db.session.execute(
            db.update({{ cookiecutter.__resource_class }})
            .where({{ cookiecutter.__resource_class }}.id == item_id)
            .values(updated_at=later)
        )
        db.session.commit()
        db.session.expunge_all()
        stored = db.session.get({{ cookiecutter.__resource_class }}, item_id)
        assert (stored.created_at, stored.updated_at) == (moment, later)


def test_the_api_shows_the_stored_timestamps(client, collection_url, new_item):
    """What a write answers is what a later read shows, to the microsecond."""
    created = client.post(collection_url, json=new_item).get_json()
    patched = client.patch(f"{collection_url}/{created['id']}", json={"quantity": 5}).get_json()
    fetched = client.get(f"{collection_url}/{created['id']}").get_json()
    assert (fetched["created_at"], fetched["updated_at"]) == (created["created_at"], patched["updated_at"])
    assert datetime.fromisoformat(patched["updated_at"]) >= datetime.fromisoformat(created["updated_at"])

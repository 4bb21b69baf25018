"""The {{ cookiecutter.resource_plural.replace('_', ' ') }} API: every CRUD path."""

from contextlib import contextmanager
from datetime import datetime

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}


def create(client, url, body):
    response = client.post(url, json=body)
    assert response.status_code == 201, response.get_json()
    return response


def test_create_returns_the_item_and_its_location(client, collection_url, new_item):
    """POST creates, answers 201 with the stored item and a Location header to it."""
    response = create(client, collection_url, new_item)
    body = response.get_json()
    assert body["id"] > 0
    assert body["name"] == "First"
    assert body["quantity"] == 3
    assert body["unit_price"] == "9.99"
    assert body["status"] == "draft"
    assert response.headers["Location"].endswith(f"{collection_url}/{body['id']}")
    assert datetime.fromisoformat(body["created_at"]).utcoffset().total_seconds() == 0


def test_get_returns_what_was_created(client, collection_url, new_item):
    """GET by id returns the same representation POST returned."""
    created = create(client, collection_url, new_item).get_json()
    response = client.get(f"{collection_url}/{created['id']}")
    assert response.status_code == 200
    assert response.get_json() == created


def test_list_is_paginated_newest_first(client, collection_url, new_item):
    """GET on the collection pages through items, newest first, with totals."""
    for number in range(25):
        create(client, collection_url, {**new_item, "name": f"item {number:02d}"})
    response = client.get(f"{collection_url}?page=2&page_size=10")
    body = response.get_json()
    assert response.status_code == 200
    assert (body["page"], body["page_size"], body["total"], body["pages"]) == (2, 10, 25, 3)
    assert [item["name"] for item in body["items"]] == [f"item {n:02d}" for n in range(14, 4, -1)]


def test_list_defaults_and_empty_collection(client, collection_url):
    """An empty collection is a 200 with no items and zero pages."""
    body = client.get(collection_url).get_json()
    assert body == {"items": [], "page": 1, "page_size": 20, "total": 0, "pages": 0}


def test_put_replaces_the_item(client, collection_url, new_item):
    """PUT replaces every field; an omitted optional field is reset."""
    created = create(client, collection_url, new_item).get_json()
    replacement = {"name": "Renamed", "quantity": 7, "unit_price": "1.50", "status": "active"}
    response = client.put(f"{collection_url}/{created['id']}", json=replacement)
    body = response.get_json()
    assert response.status_code == 200
    assert body["name"] == "Renamed"
    assert body["description"] is None
    assert (body["quantity"], body["unit_price"], body["status"]) == (7, "1.50", "active")
    assert body["updated_at"] >= created["updated_at"]


def test_patch_changes_only_the_given_fields(client, collection_url, new_item):
    """PATCH updates the fields sent and keeps the others."""
    created = create(client, collection_url, new_item).get_json()
    response = client.patch(f"{collection_url}/{created['id']}", json={"quantity": 11})
    body = response.get_json()
    assert response.status_code == 200
    assert body["quantity"] == 11
    assert body["name"] == created["name"]
    assert body["description"] == created["description"]


def test_delete_removes_the_item(client, collection_url, new_item):
    """DELETE answers 204 with no body, and the item is gone afterwards."""
    created = create(client, collection_url, new_item).get_json()
    response = client.delete(f"{collection_url}/{created['id']}")
    assert response.status_code == 204
    assert response.data == b""
    assert client.get(f"{collection_url}/{created['id']}").status_code == 404


def test_get_answers_the_version_as_etag_and_every_write_bumps_it(client, collection_url, new_item):
    """The ETag is the version (also in the body); POST, PUT and PATCH answer the new one."""
    created = create(client, collection_url, new_item)
    item_url = f"{collection_url}/{created.get_json()['id']}"
    assert (created.headers["ETag"], created.get_json()["version"]) == ('"1"', 1)
    fetched = client.get(item_url)
    assert (fetched.headers["ETag"], fetched.get_json()["version"]) == ('"1"', 1)
    patched = client.patch(item_url, json={"quantity": 4})
    assert (patched.headers["ETag"], patched.get_json()["version"]) == ('"2"', 2)
    replaced = client.put(item_url, json={**new_item, "quantity": 5})
    assert (replaced.headers["ETag"], replaced.get_json()["version"]) == ('"3"', 3)
    assert client.get(item_url).headers["ETag"] == '"3"'


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_a_write_with_a_stale_if_match_is_refused_with_412(client, collection_url, new_item, method):
    """If-Match naming an older version (or a weak tag) changes nothing: 412 precondition_failed."""
    item_url = f"{collection_url}/{create(client, collection_url, new_item).get_json()['id']}"
    old_etag = client.get(item_url).headers["ETag"]
    client.patch(item_url, json={"quantity": 4})  # someone else's change
    body = {**new_item, "quantity": 9} if method != "delete" else None
    for if_match in (old_etag, f"W/{client.get(item_url).headers['ETag']}", '"nonsense", "0"'):
        response = getattr(client, method)(item_url, json=body, headers={"If-Match": if_match})
        assert response.status_code == 412, (if_match, response.get_json())
        assert response.get_json()["error"]["code"] == "precondition_failed"
    after = client.get(item_url)
    assert (after.status_code, after.get_json()["quantity"], after.headers["ETag"]) == (200, 4, '"2"')


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_a_write_with_the_current_if_match_or_a_star_goes_ahead(client, collection_url, new_item, method):
    """If-Match with the current ETag (or `*`, or a list holding it) lets the write through."""
    for if_match in ('"1"', "*", '"7", "1"'):
        item_url = f"{collection_url}/{create(client, collection_url, new_item).get_json()['id']}"
        body = {**new_item, "quantity": 9} if method != "delete" else None
        response = getattr(client, method)(item_url, json=body, headers={"If-Match": if_match})
        assert response.status_code == (204 if method == "delete" else 200), response.get_json()
        client.delete(item_url)


@contextmanager
def a_concurrent_write_commits_first(item_id: int, **changes):
    """Just before the request's changes are flushed, another session commits `changes` to the row.

    The request has read the row already, so it writes on stale state: the
    race two simultaneous requests run, made deterministic.
    """
    done = []

    def write_elsewhere(session, flush_context, instances):
        if not done:
            done.append(True)
            with Session(db.engine) as other:
                item = other.get({{ cookiecutter.__resource_class }}, item_id)
                for field, value in changes.items():
                    setattr(item, field, value)
                other.commit()

    event.listen(Session, "before_flush", write_elsewhere)
    try:
        yield done
    finally:
        event.remove(Session, "before_flush", write_elsewhere)


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_a_write_that_loses_a_race_is_a_409_not_a_silent_overwrite(client, collection_url, new_item, method):
    """A write on state another request changed meanwhile is refused (409), the other change kept."""
    item_id = create(client, collection_url, new_item).get_json()["id"]
    item_url = f"{collection_url}/{item_id}"
    body = {**new_item, "quantity": 9} if method != "delete" else None
    with a_concurrent_write_commits_first(item_id, description="theirs") as raced:
        response = getattr(client, method)(item_url, json=body)
    assert raced
    assert response.status_code == 409, response.get_json()
    assert response.get_json()["error"]["code"] == "conflict"
    assert response.get_json()["error"]["details"] == {"id": item_id}
    after = client.get(item_url).get_json()
    assert (after["description"], after["quantity"], after["version"]) == ("theirs", 3, 2)


def test_a_lost_race_with_if_match_is_a_412(client, collection_url, new_item):
    """A request that sent If-Match and then loses the race is told its precondition failed."""
    item_id = create(client, collection_url, new_item).get_json()["id"]
    with a_concurrent_write_commits_first(item_id, description="theirs"):
        response = client.patch(f"{collection_url}/{item_id}", json={"quantity": 9}, headers={"If-Match": '"1"'})
    assert response.status_code == 412, response.get_json()
    assert response.get_json()["error"]["code"] == "precondition_failed"


def test_openapi_document_describes_the_api(client, collection_url):
    """The OpenAPI 3 document is generated from the code and served under /api."""
    response = client.get("/api/openapi.json")
    spec = response.get_json()
    assert response.status_code == 200
    assert spec["openapi"].startswith("3.")
    item_path = collection_url + "/{item_id}"
    assert set(spec["paths"][collection_url]) >= {"get", "post"}
    assert set(spec["paths"][item_path]) >= {"get", "put", "patch", "delete"}
    assert "{{ cookiecutter.__resource_class }}" in spec["components"]["schemas"]


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("12", "12.00"),
        ("12.3", "12.30"),
        ("12.30", "12.30"),
        ("0.5", "0.50"),
        ("0", "0.00"),
        ("0.01", "0.01"),
        ("99999999.99", "99999999.99"),
    ],
)
def test_money_is_stored_exactly_as_sent(client, collection_url, new_item, sent, stored):
    """An amount the contract allows is kept to the cent: written, read back and listed unchanged."""
    created = create(client, collection_url, {**new_item, "unit_price": sent}).get_json()
    assert created["unit_price"] == stored
    assert client.get(f"{collection_url}/{created['id']}").get_json()["unit_price"] == stored
    assert client.get(collection_url).get_json()["items"][0]["unit_price"] == stored
    patched = client.patch(f"{collection_url}/{created['id']}", json={"unit_price": sent})
    assert patched.get_json()["unit_price"] == stored

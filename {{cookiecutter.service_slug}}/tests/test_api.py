"""The {{ cookiecutter.resource_plural.replace('_', ' ') }} API: every CRUD path."""

from datetime import datetime

import pytest


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

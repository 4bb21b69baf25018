"""Every error is JSON {"error": {"code", "message", "details"}}, and bad input is never a 500."""

import logging

import pytest
from flask import abort
from werkzeug.exceptions import BadGateway, ServiceUnavailable

from app.extensions import db
from app.request_logging import RequestContextFilter

# What a failed discovery or dependency knows, and no caller may see.
INTERNALS = "consul-agent.internal:8500 is unreachable: HTTPConnectionPool(host='consul-agent.internal', port=8500): Max retries exceeded (Caused by NewConnectionError: [Errno 111] Connection refused)"


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.data
    assert response.content_type == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def test_malformed_json_is_400(client, collection_url):
    """A body that is not JSON is a 400 malformed_json."""
    response = client.post(collection_url, data="{not json", content_type="application/json")
    error_of(response, 400, "malformed_json")


def test_wrong_content_type_is_415(client, collection_url):
    """A write with a non-JSON content type is a 415 naming the type received."""
    response = client.post(collection_url, data="name=x", content_type="application/x-www-form-urlencoded")
    error = error_of(response, 415, "unsupported_media_type")
    assert error["details"]["content_type"] == "application/x-www-form-urlencoded"


def test_missing_body_is_415(client, collection_url):
    """A write without any body or content type is a 415, not a 500."""
    error_of(client.post(collection_url), 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"quantity": 1, "unit_price": "1.00"}, "name"),
        ({"name": "", "quantity": 1, "unit_price": "1.00"}, "name"),
        ({"name": "x", "quantity": -1, "unit_price": "1.00"}, "quantity"),
        ({"name": "x", "quantity": "3", "unit_price": "1.00"}, "quantity"),
        ({"name": "x", "quantity": 1, "unit_price": "NaN"}, "unit_price"),
        ({"name": "x", "quantity": 1, "unit_price": "1.00", "status": "lost"}, "status"),
        ({"name": "x", "quantity": 1, "unit_price": "1.00", "surprise": True}, "surprise"),
    ],
)
def test_validation_failure_is_422_with_field_details(client, collection_url, body, field):
    """Each invalid field is reported under details.json.<field>."""
    error = error_of(client.post(collection_url, json=body), 422, "validation_error")
    assert field in error["details"]["json"]


#: Amounts the contract forbids: more than two decimals, exponents, JSON numbers,
#: spaces, signs, leading zeros, more than eight integer digits, not a number.
FORBIDDEN_AMOUNTS = [
    "12.345",
    "1.999",
    "0.005",
    "1e2",
    "1E2",
    100,
    12.5,
    True,
    None,
    " 1.00",
    "1.00 ",
    "12\n",
    "-1",
    "+1",
    "01.50",
    "1,00",
    "12.",
    ".5",
    "123456789",
    "NaN",
    "Infinity",
    "",
    "\u0661\u0662",  # Arabic-Indic digits
]


@pytest.mark.parametrize("amount", FORBIDDEN_AMOUNTS, ids=repr)
def test_money_the_contract_forbids_is_422_and_nothing_changes(client, collection_url, new_item, amount):
    """A forbidden amount is refused naming unit_price, on create, replace and patch; nothing is rounded and stored."""
    error = error_of(client.post(collection_url, json={**new_item, "unit_price": amount}), 422, "validation_error")
    assert list(error["details"]["json"]) == ["unit_price"]
    created = client.post(collection_url, json=new_item).get_json()
    item_url = f"{collection_url}/{created['id']}"
    error_of(client.patch(item_url, json={"unit_price": amount}), 422, "validation_error")
    error_of(client.put(item_url, json={**new_item, "unit_price": amount}), 422, "validation_error")
    assert client.get(item_url).get_json() == created
    assert client.get(collection_url).get_json()["total"] == 1


@pytest.mark.parametrize("field", ["name", "description"])
@pytest.mark.parametrize("text", ["a\x00b", "a\ud800", "\udfff"], ids=["nul", "lone-high-surrogate", "lone-low-surrogate"])
def test_text_no_database_can_store_is_422_not_500(client, collection_url, new_item, field, text):
    """NUL (PostgreSQL's text refuses it) and lone surrogates (not UTF-8) are refused naming the field, on every database."""
    error = error_of(client.post(collection_url, json={**new_item, field: text}), 422, "validation_error")
    assert list(error["details"]["json"]) == [field]
    created = client.post(collection_url, json=new_item).get_json()
    item_url = f"{collection_url}/{created['id']}"
    error_of(client.patch(item_url, json={field: text}), 422, "validation_error")
    error_of(client.put(item_url, json={**new_item, field: text}), 422, "validation_error")
    assert client.get(item_url).get_json() == created


def test_json_that_is_not_an_object_is_422(client, collection_url):
    """A JSON list or string where an object is expected is a validation error."""
    error_of(client.post(collection_url, json=["a"]), 422, "validation_error")


def test_bad_pagination_is_422(client, collection_url):
    """page_size out of range and non-numeric pages are validation errors."""
    error_of(client.get(f"{collection_url}?page_size=1000"), 422, "validation_error")
    error_of(client.get(f"{collection_url}?page=abc"), 422, "validation_error")


def test_unknown_id_is_404(client, collection_url):
    """An id that does not exist is a 404 naming the id."""
    error = error_of(client.get(f"{collection_url}/424242"), 404, "not_found")
    assert error["details"] == {"id": 424242}


def test_id_beyond_integer_range_is_404(client, collection_url):
    """An id too big for the database column is a 404, not a database error."""
    error_of(client.get(f"{collection_url}/99999999999999999999"), 404, "not_found")


def test_unknown_url_is_json_404(client):
    """Any unknown path is a JSON 404, never an HTML page."""
    error_of(client.get("/no/such/page"), 404, "not_found")


def test_method_not_allowed_is_405_with_allow_header(client, collection_url):
    """A wrong method is a 405 that still lists the allowed methods."""
    response = client.delete(collection_url)
    error_of(response, 405, "method_not_allowed")
    assert {"GET", "POST"} <= set(response.headers["Allow"].split(", "))


def test_body_too_large_is_413(client, collection_url, app):
    """A body over MAX_CONTENT_LENGTH is a 413."""
    oversized = "x" * (app.config["MAX_CONTENT_LENGTH"] + 1)
    response = client.post(collection_url, data=oversized, content_type="application/json")
    error_of(response, 413, "payload_too_large")


def test_duplicate_name_is_409(client, collection_url, new_item):
    """Creating or renaming onto a name in use is a 409 conflict."""
    assert client.post(collection_url, json=new_item).status_code == 201
    error = error_of(client.post(collection_url, json=new_item), 409, "conflict")
    assert "name" in error["details"]
    other = client.post(collection_url, json={**new_item, "name": "Other"}).get_json()
    patch = client.patch(f"{collection_url}/{other['id']}", json={"name": new_item["name"]})
    error_of(patch, 409, "conflict")


def test_unexpected_exception_is_json_500_and_logged(make_app, caplog):
    """A bug gives a generic JSON 500 and its traceback in the log, never an HTML page."""
    app = make_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    response = app.test_client().get("/boom")
    error = error_of(response, 500, "internal_error")
    assert "secret detail" not in error["message"]
    assert any(record.exc_info for record in caplog.records)


class DependencyDown(ServiceUnavailable):
    """Shaped like service_registry.NoHealthyInstanceError: internal details in its description."""

    def __init__(self):
        super().__init__(description=f"No healthy instance of 'payments': the Consul agent at {INTERNALS}")
        self.data = {"code": "dependency_unavailable", "message": self.description, "details": {"service": "payments"}}


@pytest.mark.parametrize(
    ("raise_it", "status", "code"),
    [
        (lambda: (_ for _ in ()).throw(DependencyDown()), 503, "dependency_unavailable"),
        (lambda: abort(503, description=INTERNALS), 503, "service_unavailable"),
        (lambda: (_ for _ in ()).throw(BadGateway(description=INTERNALS)), 502, "bad_gateway"),
    ],
)
def test_server_errors_show_a_code_and_a_generic_message_only(make_app, caplog, raise_it, status, code):
    """A 5xx names no host, address or exception text; those go to the log with the request id."""
    app = make_app()
    app.add_url_rule("/depends", "depends", raise_it)
    caplog.handler.addFilter(RequestContextFilter())  # as the service's own log handler has
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get("/depends", headers={"X-Request-ID": "req-hostile-1"})
    error = error_of(response, status, code)
    body = response.get_data(as_text=True)
    for secret in ("consul-agent.internal", "8500", "HTTPConnectionPool", "Connection refused", "Errno"):
        assert secret not in body, (secret, body)
    assert set(error["details"]) <= {"service"}
    logged = [record for record in caplog.records if "consul-agent.internal" in record.getMessage()]
    assert logged, "the details must reach the log"
    assert {record.request_id for record in logged} == {"req-hostile-1"}


def test_http_errors_raised_by_views_keep_the_shape(make_app):
    """abort() anywhere in the app gives the same JSON shape."""
    app = make_app()

    @app.get("/forbidden")
    def forbidden():
        abort(403)

    error_of(app.test_client().get("/forbidden"), 403, "forbidden")


def test_failed_write_leaves_nothing_behind(client, collection_url, new_item, app):
    """A rejected request does not leave a half-written row."""
    client.post(collection_url, json={**new_item, "quantity": -5})
    with app.app_context():
        from app.models import {{ cookiecutter.__resource_class }}

        assert db.session.query({{ cookiecutter.__resource_class }}).count() == 0

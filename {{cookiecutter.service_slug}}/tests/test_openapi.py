"""The OpenAPI document is a contract a generated, typed client can rely on.

Every operation has a readable operationId named after the resource, every
error status it can answer is documented with the error body's schema, the
document passes openapi-spec-validator, and info.version is the service's
own semantic version (the API version is in the paths).
"""

import re

import pytest
from openapi_spec_validator import validate

PLURAL = "{{ cookiecutter.resource_plural }}"
SINGULAR = "{{ cookiecutter.resource_name }}"
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


@pytest.fixture
def spec(client) -> dict:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    return response.get_json()


@pytest.fixture
def operations(spec, collection_url) -> dict:
    """(method, path) -> operation, for the resource's paths."""
    item_path = collection_url + "/{item_id}"
    return {
        (method, path): operation
        for path in (collection_url, item_path)
        for method, operation in spec["paths"][path].items()
        if method != "parameters"
    }


def response_schema(spec: dict, response: dict) -> dict:
    """The JSON schema of a response, following a $ref to a shared response."""
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response["content"]["application/json"]["schema"]


def expected_errors(app, method: str, is_item: bool) -> set[str]:
    """Every error status the service can answer for an operation."""
    statuses = {"500"}
    if "rate_limiting" in app.extensions:
        statuses.add("429")
    if method in ("post", "put", "patch"):
        statuses |= {"400", "409", "413", "415", "422"}
    if is_item:
        statuses.add("404")
    if is_item and method in ("put", "patch", "delete"):
        statuses |= {"409", "412"}  # a concurrent write; If-Match naming an older version
    if method == "get" and not is_item:
        statuses.add("422")  # a bad page or page_size
    return statuses


def test_the_document_is_valid_openapi(spec):
    """openapi-spec-validator accepts the document as served."""
    validate(spec)


def test_info_version_is_the_services_semantic_version(spec, app):
    """A client package takes its version from info.version: the service's release, not "v1"."""
    assert spec["info"]["version"] == app.config["SERVICE_VERSION"]
    assert SEMVER.match(spec["info"]["version"]), spec["info"]["version"]


def test_another_service_version_is_documented(make_app):
    """SERVICE_VERSION from the environment (a release) reaches the document."""
    spec = make_app(SERVICE_VERSION="2.4.1").test_client().get("/api/openapi.json").get_json()
    assert spec["info"]["version"] == "2.4.1"


def test_operation_ids_are_named_after_the_resource(operations, collection_url):
    """A generated client gets list_{{ cookiecutter.resource_plural }}, create_{{ cookiecutter.resource_name }}, ... instead of names built from URLs."""
    item_path = collection_url + "/{item_id}"
    assert {key: operation.get("operationId") for key, operation in operations.items()} == {
        ("get", collection_url): f"list_{PLURAL}",
        ("post", collection_url): f"create_{SINGULAR}",
        ("get", item_path): f"get_{SINGULAR}",
        ("put", item_path): f"replace_{SINGULAR}",
        ("patch", item_path): f"update_{SINGULAR}",
        ("delete", item_path): f"delete_{SINGULAR}",
    }


def test_every_error_status_is_documented_with_the_error_schema(spec, operations, app, collection_url):
    """Each status an operation can answer is in its responses, with the {"error": ...} body schema."""
    for (method, path), operation in operations.items():
        documented = {status for status in operation["responses"] if status.startswith(("4", "5"))}
        missing = expected_errors(app, method, path != collection_url) - documented
        assert not missing, f"{method.upper()} {path} does not document {sorted(missing)}"
        for status in documented | {"default"}:
            assert response_schema(spec, operation["responses"][status]) == ERROR_SCHEMA, (method, path, status)


def test_documented_statuses_are_the_ones_served(client, collection_url, new_item, spec, operations):
    """The statuses the documentation promises are real: provoke each one and find it documented."""
    item = client.post(collection_url, json=new_item).get_json()
    item_url = f"{collection_url}/{item['id']}"
    item_path = collection_url + "/{item_id}"
    served = {
        ("post", collection_url): client.post(collection_url, json=new_item).status_code,  # name taken
        ("get", item_path): client.get(f"{collection_url}/999999").status_code,
        ("patch", item_path): client.patch(item_url, data="{", content_type="application/json").status_code,
        ("put", item_path): client.put(item_url, data="x", content_type="text/plain").status_code,
        ("delete", item_path): client.delete(f"{collection_url}/999999").status_code,
        ("get", collection_url): client.get(f"{collection_url}?page=0").status_code,
    }
    assert served == {
        ("post", collection_url): 409,
        ("get", item_path): 404,
        ("patch", item_path): 400,
        ("put", item_path): 415,
        ("delete", item_path): 404,
        ("get", collection_url): 422,
    }
    for key, status in served.items():
        assert str(status) in operations[key]["responses"], key
    stale = client.put(item_url, json=new_item, headers={"If-Match": '"0"'}).status_code
    assert stale == 412
    assert "412" in operations[("put", item_path)]["responses"]


def test_conditional_writes_declare_if_match(operations, collection_url):
    """PUT, PATCH and DELETE declare the optional If-Match header, so typed clients can send it."""
    declared = {
        (method, path): [
            (parameter["in"], parameter["name"], parameter["required"])
            for parameter in operation.get("parameters", [])
            if parameter["in"] == "header"
        ]
        for (method, path), operation in operations.items()
    }
    item_path = collection_url + "/{item_id}"
    conditional = {("put", item_path), ("patch", item_path), ("delete", item_path)}
    assert {key for key, headers in declared.items() if headers} == conditional
    for key in conditional:
        assert declared[key] == [("header", "If-Match", False)], key


def test_a_partial_update_documents_no_defaults(spec):
    """PATCH changes only what is sent: its schema has no default a client would send for it."""
    update = spec["components"]["schemas"]["{{ cookiecutter.__resource_class }}Update"]["properties"]
    assert [name for name, field in update.items() if "default" in field] == []


def test_money_is_a_documented_pattern(spec):
    """unit_price is a string with the exact pattern the service enforces."""
    schema = spec["components"]["schemas"]["{{ cookiecutter.__resource_class }}"]["properties"]["unit_price"]
    assert schema["type"] == "string"
    pattern = re.compile(schema["pattern"])
    assert all(pattern.search(value) for value in ("0", "12", "12.3", "12.30", "99999999.99"))
    assert not any(pattern.search(value) for value in ("12.345", "1e2", "-1", " 1", "01", ""))

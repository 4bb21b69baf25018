"""API versioning: versions side by side, redirects to the latest, unknown versions, deprecation."""

from datetime import UTC, datetime

import pytest
from openapi_spec_validator import validate

from app.extensions import versioned_api
from app.routes_versioned import create_api_blueprint

RESOURCE = "{{ cookiecutter.resource_plural.replace('_', '-') }}"


@pytest.fixture
def two_version_app(make_app, app):
    """An app serving v1 (deprecated since 2026-01-15, sunset 2027-06-30) and v2 (latest) side by side."""
    first = app.config["API_VERSION"]
    second = f"v{int(first[1:]) + 1}"
    two = make_app(LATEST_API_VERSION=second, DEPRECATED_API_VERSIONS={first: "2026-01-15/2027-06-30"})
    blueprint = create_api_blueprint(second, operation_suffix=f"_{second}")
    versioned_api.register_version(second, blueprint, app=two)
    return two, first, second


def test_versioned_path_serves_and_names_its_version(client, app):
    """/api/<version>/... answers and says which version served it."""
    version = app.config["API_VERSION"]
    response = client.get(f"/api/{version}/{RESOURCE}")
    assert response.status_code == 200
    assert response.headers["API-Version"] == version


def test_unversioned_get_redirects_to_latest_keeping_query(client, app):
    """GET /api/<path>?q is a 308 to /api/<latest>/<path>?q."""
    response = client.get(f"/api/{RESOURCE}?page=2&page_size=5")
    assert response.status_code == 308
    assert response.headers["Location"] == f"/api/{app.config['LATEST_API_VERSION']}/{RESOURCE}?page=2&page_size=5"


def test_unversioned_post_keeps_method_and_body(client, new_item):
    """A 308 makes the client repeat the POST with its body at the latest version."""
    response = client.post(f"/api/{RESOURCE}", json=new_item, follow_redirects=True)
    assert response.status_code == 201
    assert response.get_json()["name"] == new_item["name"]
    assert len(response.history) == 1


def test_unversioned_item_path_redirects(client, new_item, app):
    """Paths with parameters redirect too."""
    created = client.post(f"/api/{app.config['API_VERSION']}/{RESOURCE}", json=new_item).get_json()
    response = client.get(f"/api/{RESOURCE}/{created['id']}")
    assert response.status_code == 308
    assert response.headers["Location"].endswith(f"/{RESOURCE}/{created['id']}")


def test_unknown_version_is_404_listing_supported_versions(client, app):
    """/api/v999/... is a JSON 404 that lists the versions that exist."""
    response = client.get(f"/api/v999/{RESOURCE}")
    body = response.get_json()
    assert response.status_code == 404
    assert body["error"]["code"] == "unknown_api_version"
    assert body["error"]["details"]["supported_versions"] == [app.config["API_VERSION"]]


def test_unknown_unversioned_path_is_plain_404(client):
    """An unversioned path with no latest endpoint behind it is a normal JSON 404."""
    response = client.get("/api/nothing-here")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_two_versions_side_by_side(two_version_app, new_item):
    """Both versions serve; the unversioned path now goes to the newer one."""
    app, first, second = two_version_app
    client = app.test_client()
    assert client.get(f"/api/{first}/{RESOURCE}").headers["API-Version"] == first
    assert client.get(f"/api/{second}/{RESOURCE}").headers["API-Version"] == second
    assert client.get(f"/api/{RESOURCE}").headers["Location"] == f"/api/{second}/{RESOURCE}"
    body = client.get("/api/v999/x").get_json()
    assert body["error"]["details"]["supported_versions"] == [first, second]


def test_deprecated_version_carries_deprecation_and_sunset(two_version_app):
    """A deprecated version's responses say since when (RFC 9745), until when (RFC 8594) and where to go."""
    app, first, second = two_version_app
    client = app.test_client()
    old = client.get(f"/api/{first}/{RESOURCE}")
    deprecated_on = datetime(2026, 1, 15, tzinfo=UTC)
    assert old.headers["Deprecation"] == f"@{int(deprecated_on.timestamp())}"
    assert old.headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert old.headers.getlist("Link") == [f'</api/{second}/{RESOURCE}>; rel="successor-version"']
    assert client.get(f"/api/{second}/{RESOURCE}").status_code == 200  # the successor link is real
    item = client.get(f"/api/{first}/{RESOURCE}/7?full=1")
    assert item.headers.getlist("Link") == [f'</api/{second}/{RESOURCE}/7>; rel="successor-version"']
    assert "Deprecation" not in client.get(f"/api/{second}/{RESOURCE}").headers


def test_deprecation_keeps_the_responses_own_link_headers(two_version_app):
    """A Link the view already set (pagination, say) stays; the successor link is added beside it."""
    app, first, second = two_version_app

    @app.after_request  # runs before the versioning hook, as a view's own header would
    def paginate(response):
        response.headers["Link"] = f'</api/{first}/{RESOURCE}?page=2>; rel="next"'
        return response

    links = app.test_client().get(f"/api/{first}/{RESOURCE}").headers.getlist("Link")
    assert links == [
        f'</api/{first}/{RESOURCE}?page=2>; rel="next"',
        f'</api/{second}/{RESOURCE}>; rel="successor-version"',
    ]


@pytest.mark.parametrize("value", ["2027-06-30", "someday", "2027-06-30/2026-01-15", "/2027-06-30"])
def test_deprecation_needs_a_valid_deprecation_date(make_app, app, value):
    """The deprecation date is required (the header carries it) and the sunset cannot come before it."""
    with pytest.raises(ValueError, match="DEPRECATED_API_VERSIONS"):
        make_app(DEPRECATED_API_VERSIONS={app.config["API_VERSION"]: value})


def test_deprecation_without_a_sunset_yet(make_app, app):
    """`v1=2026-01-15/`: deprecated, no Sunset header until a date is decided, no successor to link."""
    version = app.config["API_VERSION"]
    response = make_app(DEPRECATED_API_VERSIONS={version: "2026-01-15/"}).test_client().get(f"/api/{version}/{RESOURCE}")
    assert response.headers["Deprecation"] == "@1768435200"
    assert "Sunset" not in response.headers
    assert "Link" not in response.headers


def test_openapi_documents_every_version(two_version_app):
    """The OpenAPI document lists the paths of each registered version, with distinct operationIds."""
    app, first, second = two_version_app
    spec = app.test_client().get("/api/openapi.json").get_json()
    paths = spec["paths"]
    assert f"/api/{first}/{RESOURCE}" in paths
    assert f"/api/{second}/{RESOURCE}" in paths
    assert paths[f"/api/{first}/{RESOURCE}"]["get"]["operationId"] == "list_{{ cookiecutter.resource_plural }}"
    assert paths[f"/api/{second}/{RESOURCE}"]["get"]["operationId"] == f"list_{{ cookiecutter.resource_plural }}_{second}"
    validate(spec)  # openapi-spec-validator also refuses duplicate operationIds


def test_registering_a_version_twice_is_refused(make_app, app):
    """Registering the same version twice is a programming error, caught at start-up."""
    other = make_app()
    version = app.config["API_VERSION"]
    with pytest.raises(ValueError, match="already registered"):
        versioned_api.register_version(version, create_api_blueprint(version), app=other)

"""A typed client generated from a running service's OpenAPI document works.

One project is rendered and served as its README says (`flask run`, SQLite);
openapi-python-client, a tool nobody here wrote, generates a client package
from the document the service serves at /api/openapi.json; and that client
round-trips create, get, list, replace, patch and delete, and gets the 404,
409, 412 (a stale If-Match, a typed argument of the writes) and 422 answers parsed into the typed error model, not None. The
resource is `line_item`, so names made of several words are covered too
(the generated functions are `create_line_item`, not
`post_api_v1_line_items`).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.combinations import defaults
from tests.conftest import bake_or_fail, fail_or_skip
from tests.suites import Unavailable, build_venv, declared_python, find_python

pytestmark = pytest.mark.generated_suite
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
PACKAGE = "line_items_client"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 60) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if server.poll() is not None:
                raise AssertionError(server.stdout.read().decode()) from None
            assert time.monotonic() < deadline, f"{url} did not answer within {seconds} s"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def service(cookies_session, tmp_path_factory):
    """The rendered service in its own virtualenv, migrated and running; yields its base URL."""
    baked = bake_or_fail(cookies_session, {**defaults(), "database": "sqlite", "resource_name": "line_item"})
    try:
        venv = build_venv(baked.path, find_python(declared_python(baked.path)))
    except Unavailable as missing:
        fail_or_skip(str(missing))
    data = tmp_path_factory.mktemp("data")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TEST_", "DATABASE_URL"))}
    env.update(
        DATABASE_URL=f"sqlite:///{data / 'service.db'}",
        ENVIRONMENT="development",  # unset is production, which refuses the local defaults
        FLASK_APP="main.py",
        # No Consul, Jaeger or broker is needed to serve the API: keep the log about the API.
        AUTO_REGISTER_SERVICE="false",
        TRACING_ENABLED="false",
        OUTBOX_RELAY_IN_APP="false",
    )
    flask = str(venv / "bin" / "flask")
    subprocess.run([flask, "db", "upgrade", "heads"], cwd=baked.path, env=env, check=True, capture_output=True)
    server = subprocess.Popen(
        [flask, "run", "--host", "127.0.0.1", "--port", str(port)],
        cwd=baked.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base_url}/health", server)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def client_package(service, tmp_path_factory):
    """The client package openapi-python-client generates from the served document, imported."""
    folder = tmp_path_factory.mktemp("client")
    spec = folder / "openapi.json"
    spec.write_bytes(urllib.request.urlopen(f"{service}/api/openapi.json", timeout=10).read())
    env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ['PATH']}"}  # its ruff step
    result = subprocess.run(
        [str(GENERATOR), "generate", "--path", str(spec), "--meta", "none", "--output-path", str(folder / PACKAGE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def operations(package) -> dict:
    """Every generated operation module, by function name (the operationId)."""
    found = {}
    api = importlib.import_module(f"{package.__name__}.api")
    for tag in pkgutil.iter_modules(api.__path__):
        tag_package = importlib.import_module(f"{api.__name__}.{tag.name}")
        for module in pkgutil.iter_modules(tag_package.__path__):
            found[module.name] = importlib.import_module(f"{tag_package.__name__}.{module.name}")
    return found


def test_the_generated_client_round_trips_every_operation(service, client_package):
    """Create, get, list, replace, patch, delete, and the 404, 409, 412 and 422 errors, all typed."""
    models = importlib.import_module(f"{PACKAGE}.models")
    ops = operations(client_package)
    assert sorted(ops) == sorted(
        ["list_line_items", "create_line_item", "get_line_item", "replace_line_item", "update_line_item", "delete_line_item"]
    )
    client = client_package.Client(base_url=service, raise_on_unexpected_status=True)
    new = models.LineItem(name="Bolt", quantity=3, unit_price="12.30", status=models.LineItemStatus.ACTIVE)

    created = ops["create_line_item"].sync_detailed(client=client, body=new)
    assert created.status_code == 201
    item = created.parsed
    assert isinstance(item, models.LineItem)
    assert (item.name, item.quantity, item.unit_price, item.status) == ("Bolt", 3, "12.30", models.LineItemStatus.ACTIVE)
    assert item.created_at.tzinfo is not None

    fetched = ops["get_line_item"].sync(client=client, item_id=item.id)
    assert isinstance(fetched, models.LineItem)
    assert fetched.to_dict() == item.to_dict()

    page = ops["list_line_items"].sync(client=client, page=1, page_size=10)
    assert isinstance(page, models.LineItemPage)
    assert (page.total, [entry.id for entry in page.items]) == (1, [item.id])

    replaced = ops["replace_line_item"].sync(
        client=client, item_id=item.id, body=models.LineItem(name="Nut", quantity=1, unit_price="0.5")
    )
    assert isinstance(replaced, models.LineItem)
    assert (replaced.name, replaced.unit_price, replaced.status) == ("Nut", "0.50", models.LineItemStatus.DRAFT)

    # A patch sends only what it sets: the status stays as it is.
    ops["update_line_item"].sync(client=client, item_id=item.id, body=models.LineItemUpdate(status=models.LineItemUpdateStatus.ACTIVE))
    patched = ops["update_line_item"].sync(client=client, item_id=item.id, body=models.LineItemUpdate(quantity=7))
    assert isinstance(patched, models.LineItem)
    assert (patched.quantity, patched.status, patched.name) == (7, models.LineItemStatus.ACTIVE, "Nut")

    other = ops["create_line_item"].sync(client=client, body=models.LineItem(name="Washer", quantity=1, unit_price="1"))
    conflict = ops["update_line_item"].sync_detailed(client=client, item_id=other.id, body=models.LineItemUpdate(name="Nut"))
    assert conflict.status_code == 409
    assert isinstance(conflict.parsed, models.ErrorResponse)
    assert conflict.parsed.error.code == "conflict"
    assert "name" in conflict.parsed.error.details.to_dict()

    # A write conditional on an older version (If-Match, from the ETag of a read) is a typed 412.
    stale_etag = created.headers["ETag"]
    assert ops["get_line_item"].sync_detailed(client=client, item_id=item.id).headers["ETag"] != stale_etag
    stale = ops["update_line_item"].sync_detailed(
        client=client, item_id=item.id, body=models.LineItemUpdate(quantity=8), if_match=stale_etag
    )
    assert stale.status_code == 412
    assert isinstance(stale.parsed, models.ErrorResponse)
    assert (stale.parsed.error.code, stale.parsed.error.details.to_dict()["id"]) == ("precondition_failed", item.id)
    assert ops["get_line_item"].sync(client=client, item_id=item.id).quantity == 7

    invalid = ops["create_line_item"].sync_detailed(client=client, body=models.LineItem(name="Pin", quantity=1, unit_price="12.345"))
    assert invalid.status_code == 422
    assert isinstance(invalid.parsed, models.ErrorResponse)
    assert "unit_price" in invalid.parsed.error.details.to_dict()["json"]

    deleted = ops["delete_line_item"].sync_detailed(client=client, item_id=item.id)
    assert deleted.status_code == 204
    missing = ops["get_line_item"].sync_detailed(client=client, item_id=item.id)
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models.ErrorResponse)
    assert (missing.parsed.error.code, missing.parsed.error.details.to_dict()) == ("not_found", {"id": item.id})


def test_the_client_package_takes_the_services_version(service):
    """info.version is the service's semantic version, so the client package is not "v1"."""
    spec = json.loads(urllib.request.urlopen(f"{service}/api/openapi.json", timeout=10).read())
    assert spec["info"]["version"] == "0.1.0"

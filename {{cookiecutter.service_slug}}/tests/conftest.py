"""Shared fixtures. Tests run offline on SQLite unless TEST_DATABASE_URL is set.

TEST_DATABASE_URL must point at a database used only for tests: the suite
drops every table in it before it starts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from contextlib import contextmanager

import pytest
from flask_migrate import upgrade
from sqlalchemy import MetaData, create_engine

from app import create_app
from app.extensions import db
from config import normalise_database_url

# The local defaults (SQLite, a local-only SECRET_KEY, ...) exist for development
# and test only; any other ENVIRONMENT, unset included, is production (config.py).
os.environ["ENVIRONMENT"] = "test"
# Set by CI: a test whose real dependency is missing fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("TEST_REQUIRE_SERVICES", "").lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (TEST_REQUIRE_SERVICES is set, so this is an error)")
    pytest.skip(reason)


def require_executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed")
    return path


@contextmanager
def captured_log_lines():
    """What the service's JSON handler writes meanwhile, as parsed lines (after create_app)."""
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "is_service_handler", False))
    stream = io.StringIO()
    original = handler.setStream(stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        handler.setStream(original)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return normalise_database_url(url)
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


def drop_everything(url: str) -> None:
    engine = create_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def app_config(database_url) -> dict:
    return {
        "TESTING": True,
        "SQLALCHEMY_DATABASE_URI": database_url,
        # Every request of the suite comes from one address: limits high enough
        # never to trip (tests/test_rate_limiting.py sets its own). Ignored
        # when rate limiting is not part of the project.
        "RATELIMIT_DEFAULT": "100000 per minute",
        "RATELIMIT_WRITE": "100000 per minute",
        # Tests look at /health/ready again right after changing a dependency.
        "READINESS_CACHE_TTL": 0,
    }


@pytest.fixture(scope="session")
def app(app_config):
    """One app for the session, its schema built by the real migrations."""
    drop_everything(app_config["SQLALCHEMY_DATABASE_URI"])
    app = create_app(app_config)
    with app.app_context():
        upgrade(revision="heads")  # every branch: features' migrations and the team's
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(autouse=True)
def clean_tables(request):
    """Empty every table after each test that used the database."""
    yield
    if "app" not in request.fixturenames:
        return
    app = request.getfixturevalue("app")
    with app.app_context():
        db.session.rollback()
        for table in reversed(db.metadata.sorted_tables):
            db.session.execute(table.delete())
        db.session.commit()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_app(app_config):
    """Build another app (same database) with extra settings."""

    def build(**overrides):
        return create_app({**app_config, **overrides})

    return build


@pytest.fixture
def collection_url(app) -> str:
    """The resource's collection URL, versioned when API versioning is on."""
    version = app.config.get("API_VERSION")
    prefix = f"/api/{version}" if version else "/api"
    return f"{prefix}/{{ cookiecutter.resource_plural.replace('_', '-') }}"


@pytest.fixture
def new_item() -> dict:
    """A valid request body for creating a {{ cookiecutter.resource_name.replace('_', ' ') }}."""
    return {"name": "First", "description": "A test item", "quantity": 3, "unit_price": "9.99"}

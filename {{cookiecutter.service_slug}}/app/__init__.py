"""The application factory."""

from __future__ import annotations

from collections.abc import Callable
from inspect import iscoroutinefunction
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from flask import Flask
{%- if not cookiecutter.use_api_versioning %}
from flask_smorest import Blueprint
{%- endif %}
from sqlalchemy import text

from app import errors, request_logging, security
{%- if not cookiecutter.use_api_versioning %}
from app.api import register_{{ cookiecutter.resource_name }}_routes
{%- endif %}
{%- if cookiecutter.outbox != "none" %}
from app.events import processor as outbox_processor
{%- endif %}
from app.extensions import (
    ServiceApi,
{%- if cookiecutter.use_circuit_breaker %}
    circuit_breakers,
{%- endif %}
    db,
{%- if cookiecutter.use_metrics %}
    metrics,
{%- endif %}
    migrate,
{%- if cookiecutter.use_rate_limiting %}
    rate_limiting,
{%- endif %}
{%- if cookiecutter.use_circuit_breaker %}
    service_clients,
{%- endif %}
{%- if cookiecutter.use_service_registry %}
    service_registry,
{%- endif %}
{%- if cookiecutter.use_tracing %}
    tracer,
{%- endif %}
{%- if cookiecutter.use_api_versioning %}
    versioned_api,
{%- endif %}
)
from app.routes import health
{%- if cookiecutter.use_api_versioning %}
from app.routes_versioned import create_api_blueprint
{%- endif %}
from app.schemas import Money
from common_utils.health import add_readiness_check
from config import Config


class ServiceFlask(Flask):
    """Flask, asking once per function whether a view or hook is `async def`.

    Flask's `ensure_sync` asks iscoroutinefunction about every
    before_request, after_request and teardown hook and every view, on every
    request: about ten Python calls each, a tenth of a small request's work
    when every feature has its hooks. The answer never changes for a function
    (a bound method's is its function's), so it is kept, weakly, per function.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._is_async: WeakKeyDictionary[Callable, bool] = WeakKeyDictionary()

    def ensure_sync(self, func: Callable) -> Callable:
        target = getattr(func, "__func__", func)
        try:
            is_async = self._is_async.get(target)
            if is_async is None:
                is_async = self._is_async[target] = iscoroutinefunction(func)
        except TypeError:  # not weakly referenceable (a builtin, say): ask Flask every time
            return super().ensure_sync(func)
        return self.async_to_sync(func) if is_async else func


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the service. `config` overrides settings read from the environment."""
    app = ServiceFlask(__name__)
    app.config.from_object(Config())
    app.config.update(config or {})
    app.json.sort_keys = False

    request_logging.init_app(app)
    security.init_app(app)
    ensure_sqlite_folder(app.config["SQLALCHEMY_DATABASE_URI"])
    db.init_app(app)
    migrate.init_app(app, db)
{%- if cookiecutter.use_tracing %}
    tracer.init_app(app)  # wraps the WSGI app: its span covers every hook, whichever answers first
{%- endif %}
    # info.version is the service's release, which a generated client package
    # takes as its version; flask-smorest would prefer API_VERSION (in the paths).
    api = ServiceApi(app, spec_kwargs={"version": app.config["SERVICE_VERSION"]})
    api.spec.version = app.config["SERVICE_VERSION"]
    api.register_field(Money, "string", "decimal")  # before any schema is documented
    errors.init_app(app)  # after flask-smorest, whose own error handler it replaces

    app.register_blueprint(health)
    add_readiness_check(app, "database", check_database)
{%- if cookiecutter.use_service_registry %}
    service_registry.init_app(app)
{%- endif %}
{%- if cookiecutter.use_api_versioning %}

    versioned_api.init_app(app, api)
    version = app.config["API_VERSION"]
    api_blueprint = create_api_blueprint(version)
    versioned_api.register_version(version, api_blueprint, app=app)
{%- else %}

    api_blueprint = Blueprint("api", __name__, url_prefix="/api", description="The service's API")
    register_{{ cookiecutter.resource_name }}_routes(api_blueprint)
    api.register_blueprint(api_blueprint)
{%- endif %}
{%- if cookiecutter.use_rate_limiting %}

    rate_limiting.init_app(app)
    rate_limiting.limit_writes(api_blueprint, app)
{%- endif %}
{%- if cookiecutter.use_metrics %}

    metrics.init_app(app)  # last: it instruments the routes registered above
{%- endif %}
{%- if cookiecutter.outbox != "none" %}

    outbox_processor.init_app(app)  # after metrics, whose registry gets the outbox series
{%- endif %}
{%- if cookiecutter.use_circuit_breaker %}

    circuit_breakers.init_app(app)  # after metrics, whose registry gets the breaker states
{%- if cookiecutter.use_service_registry %}
    service_clients.init_app(app, resolve=service_registry.resolve)
{%- else %}
    service_clients.init_app(app)
{%- endif %}
{%- endif %}
    return app


def check_database() -> dict:
    db.session.execute(text("SELECT 1"))
    return {"dialect": db.engine.dialect.name}


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite file so `make run` works on a fresh checkout."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        Path(url[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)

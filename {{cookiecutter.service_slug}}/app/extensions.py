"""The extension instances, created once at import and bound per app in create_app."""

from flask_migrate import Migrate
from flask_smorest import Api

from app.errors import ErrorResponseSchema
{%- if cookiecutter.use_circuit_breaker %}
from common_utils.circuit_breaker import CircuitBreakers
{%- endif %}
from common_utils.database import db as db  # declared there, imported by the app from here
{%- if cookiecutter.use_circuit_breaker %}
from common_utils.http_client import ServiceClients
{%- endif %}
{%- if cookiecutter.use_metrics %}
from common_utils.metrics import Metrics
{%- endif %}
{%- if cookiecutter.use_rate_limiting %}
from common_utils.rate_limiting import RateLimiting
{%- endif %}
{%- if cookiecutter.use_service_registry %}
from common_utils.service_registry import ServiceRegistry
{%- endif %}
{%- if cookiecutter.use_tracing %}
from common_utils.tracing import Tracer
{%- endif %}
{%- if cookiecutter.use_api_versioning %}
from common_utils.versioning import VersionedAPI
{%- endif %}


class ServiceApi(Api):
    """flask-smorest's Api, documenting errors in this service's JSON shape.

    Unlike the extensions below it is created per app in create_app:
    flask-smorest keeps the app and its OpenAPI spec on the Api object, so
    one shared instance would mix up the documents of two apps.
    """

    ERROR_SCHEMA = ErrorResponseSchema


# render_as_batch lets Alembic alter SQLite tables; compare_type makes
# `flask db check` see column type changes, not only added/removed columns.
migrate = Migrate(render_as_batch=True, compare_type=True)
{%- if cookiecutter.use_metrics %}
metrics = Metrics()
{%- endif %}
{%- if cookiecutter.use_circuit_breaker %}
circuit_breakers = CircuitBreakers()
service_clients = ServiceClients(circuit_breakers)
{%- endif %}
{%- if cookiecutter.use_rate_limiting %}
rate_limiting = RateLimiting()
{%- endif %}
{%- if cookiecutter.use_service_registry %}
service_registry = ServiceRegistry()
{%- endif %}
{%- if cookiecutter.use_tracing %}
tracer = Tracer()
{%- endif %}
{%- if cookiecutter.use_api_versioning %}
versioned_api = VersionedAPI()
{%- endif %}

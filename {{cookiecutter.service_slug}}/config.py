"""Every setting of the service, read from the environment (12-factor).

The names are the migration guide's (SERVICE_NAME, SERVICE_PORT,
API_VERSION, LATEST_API_VERSION, ...). Each value is read when Config() is
built, not at import, so tests and `create_app` can change the environment
first. A malformed value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from environs import Env

BASE_DIR = Path(__file__).resolve().parent
SQLITE_FILE = BASE_DIR / "data" / "{{ cookiecutter.service_slug.replace('-', '_') }}.db"
DEFAULT_DATABASE_URL = f"sqlite:///{SQLITE_FILE}"
DRIVERS = {
    "postgres://": "postgresql+psycopg://",
    "postgresql://": "postgresql+psycopg://",
    "mysql://": "mysql+pymysql://",
    "mariadb://": "mysql+pymysql://",
}


def normalise_database_url(url: str) -> str:
    """Point plain postgresql:// and mysql:// URLs at the drivers we install."""
    for prefix, replacement in DRIVERS.items():
        if url.startswith(prefix):
            return replacement + url[len(prefix) :]
    return url


#: The only ENVIRONMENT values (any case) where the local defaults below apply.
#: Anything else, unset included, is production: a forgotten variable fails
#: closed, as a deployment that never said "development" is treated as a real one.
LOCAL_ENVIRONMENTS = frozenset({"development", "test"})
#: SECRET_KEY when nothing sets it: good enough on a laptop, refused in production.
LOCAL_ONLY_SECRET_KEY = "insecure-local-only"  # noqa: S105
#: Shortest SECRET_KEY production accepts (`secrets.token_urlsafe(48)` gives 64).
MIN_SECRET_KEY_LENGTH = 32
#: Credentials that only belong on a laptop: the defaults here and in
#: docker-compose.yml, and the placeholders of .env.example.
PLACEHOLDER_SECRETS = frozenset({LOCAL_ONLY_SECRET_KEY, "change-me", "app", "guest", "root"})


def url_password(value: str) -> str | None:
    """The password inside a URL credential (postgresql://user:password@host/db), if any."""
    if "://" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:  # not a URL after all
        return None


class InsecureConfigError(ValueError):
    """A credential is missing, unreadable or a local-only default where it must not be."""


def read_secret(env: Env, name: str, default: str = "") -> str:
    """A credential from the variable `name`, or from the file that `<name>_FILE` names.

    The file form is how Docker and Kubernetes secrets arrive; its trailing
    newline is dropped. Setting both is refused rather than guessing which wins.
    """
    path = env.str(f"{name}_FILE", "")
    if not path:
        return env.str(name, default)
    if os.environ.get(name):
        raise InsecureConfigError(f"{name} and {name}_FILE are both set; set only one of them")
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise InsecureConfigError(f"{name}_FILE: cannot read {path}: {error.strerror}") from error


class Config:
    """Settings for one app instance; attributes are Flask config keys."""

    def __init__(self) -> None:
        env = Env()
        # A local .env (copied from .env.example) fills in what the real
        # environment leaves unset; it never overrides a set variable.
        env.read_env(BASE_DIR / ".env", recurse=False)
        given = env.str("ENVIRONMENT", "")
        self.environment_source = f"ENVIRONMENT={given}" if given.strip() else "ENVIRONMENT unset"
        self.ENVIRONMENT = given.strip() or "production"
        self.IS_LOCAL = self.ENVIRONMENT.lower() in LOCAL_ENVIRONMENTS
        self.SERVICE_NAME = env.str("SERVICE_NAME", {{ cookiecutter.service_slug | py_string }})
        self.SERVICE_VERSION = env.str("SERVICE_VERSION", "0.1.0")
        self.SERVICE_PORT = env.int("SERVICE_PORT", {{ cookiecutter.service_port }})
        self.LOG_LEVEL = env.log_level("LOG_LEVEL", "INFO")
        # Every credential goes through self.secret(): it may come from a
        # <NAME>_FILE, and production refuses it missing or left at a default.
        self.secrets: dict[str, str] = {}
        self.SECRET_KEY = self.secret(env, "SECRET_KEY", LOCAL_ONLY_SECRET_KEY)

        self.SQLALCHEMY_DATABASE_URI = normalise_database_url(
            self.secret(env, "DATABASE_URL", DEFAULT_DATABASE_URL)
        )
        self.SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}
        self.MAX_CONTENT_LENGTH = env.int("MAX_CONTENT_LENGTH", 1024 * 1024)
        # How many reverse proxies in front of the service append to
        # X-Forwarded-For; 0 trusts the header not at all.
        self.TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", 0)
        # Browser origins allowed to call the API; empty turns CORS off.
        self.CORS_ORIGINS = env.list("CORS_ORIGINS", [])
        # /health/ready: every check runs at once within this many seconds (probes
        # time out after 3 s), and the answer is reused for READINESS_CACHE_TTL s.
        self.READINESS_TIMEOUT = env.float("READINESS_TIMEOUT", 0.8)
        self.READINESS_CACHE_TTL = env.float("READINESS_CACHE_TTL", 1.0)
{%- if cookiecutter.use_api_versioning %}

        self.API_VERSION = env.str("API_VERSION", {{ cookiecutter.api_version | py_string }})
        self.LATEST_API_VERSION = env.str("LATEST_API_VERSION", self.API_VERSION)
        self.DEPRECATED_API_VERSIONS = env.dict("DEPRECATED_API_VERSIONS", {})
{%- endif %}
{%- if cookiecutter.use_metrics %}

        self.METRICS_ENABLED = env.bool("METRICS_ENABLED", True)
{%- endif %}
{%- if cookiecutter.use_circuit_breaker %}

        self.CIRCUIT_BREAKER_ENABLED = env.bool("CIRCUIT_BREAKER_ENABLED", True)
        self.CIRCUIT_BREAKER_FAILURE_THRESHOLD = env.int("CIRCUIT_BREAKER_FAILURE_THRESHOLD", 5)
        self.CIRCUIT_BREAKER_RECOVERY_TIMEOUT = env.float("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", 30.0)
        self.CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS = env.int("CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS", 1)
        # Other services this one calls: name=base URL (used when the
        # service registry is off or does not know the name).
        self.DOWNSTREAM_SERVICES = env.dict("DOWNSTREAM_SERVICES", {})
        self.HTTP_CLIENT_CONNECT_TIMEOUT = env.float("HTTP_CLIENT_CONNECT_TIMEOUT", 2.0)
        self.HTTP_CLIENT_READ_TIMEOUT = env.float("HTTP_CLIENT_READ_TIMEOUT", 5.0)
        self.HTTP_CLIENT_RETRIES = env.int("HTTP_CLIENT_RETRIES", 2)
        self.HTTP_CLIENT_BACKOFF = env.float("HTTP_CLIENT_BACKOFF", 0.2)
        # One call's whole budget: lookups, attempts and the waits between them.
        self.HTTP_CLIENT_DEADLINE = env.float("HTTP_CLIENT_DEADLINE", 10.0)
        # A downstream's Retry-After longer than this ends the call instead of being waited for.
        self.HTTP_CLIENT_MAX_RETRY_AFTER = env.float("HTTP_CLIENT_MAX_RETRY_AFTER", 5.0)
{%- endif %}
{%- if cookiecutter.use_rate_limiting %}

        self.RATELIMIT_ENABLED = env.bool("RATELIMIT_ENABLED", True)
        self.RATELIMIT_DEFAULT = env.str("RATELIMIT_DEFAULT", "300 per minute")
        # Creating, changing and deleting cost more than reading: a tighter limit.
        self.RATELIMIT_WRITE = env.str("RATELIMIT_WRITE", "60 per minute")
        self.RATELIMIT_STORAGE_URI = self.secret(env, "RATELIMIT_STORAGE_URI", "memory://")
        # Seconds a connect or a reply of the Redis storage may take (common_utils/rate_limiting.py).
        self.RATELIMIT_STORAGE_TIMEOUT = env.float("RATELIMIT_STORAGE_TIMEOUT", 0.25)
        self.RATELIMIT_KEY_PREFIX = env.str("RATELIMIT_KEY_PREFIX", self.SERVICE_NAME)
{%- endif %}
{%- if cookiecutter.use_service_registry %}

        # Consul: the local agent this instance registers with and asks for others.
        self.CONSUL_HOST = env.str("CONSUL_HOST", "localhost")
        self.CONSUL_PORT = env.int("CONSUL_PORT", 8500)
        self.CONSUL_SCHEME = env.str("CONSUL_SCHEME", "http")
        self.CONSUL_TOKEN = self.secret(env, "CONSUL_TOKEN", "")
        self.CONSUL_TIMEOUT = env.float("CONSUL_TIMEOUT", 3.0)
        self.CONSUL_RETRY_MAX_DELAY = env.float("CONSUL_RETRY_MAX_DELAY", 30.0)
        self.CONSUL_RESYNC_INTERVAL = env.float("CONSUL_RESYNC_INTERVAL", 15.0)  # re-register if the agent forgot
        # Registration happens only where the service is served (gunicorn's
        # master, `flask run`, `python main.py`), never on import or in tests.
        self.AUTO_REGISTER_SERVICE = env.bool("AUTO_REGISTER_SERVICE", True)
        # What other services should call; empty means this host's IP address.
        self.SERVICE_ADDRESS = env.str("SERVICE_ADDRESS", "")
        self.SERVICE_ID = env.str("SERVICE_ID", "")  # empty: <name>-<hostname>-<port>
        self.SERVICE_TAGS = env.list("SERVICE_TAGS", [])
        self.SERVICE_CHECK_INTERVAL = env.str("SERVICE_CHECK_INTERVAL", "10s")
        self.SERVICE_CHECK_TIMEOUT = env.str("SERVICE_CHECK_TIMEOUT", "5s")
        self.SERVICE_DEREGISTER_AFTER = env.str("SERVICE_DEREGISTER_AFTER", "1m")
        self.SERVICE_DISCOVERY_CACHE_TTL = env.float("SERVICE_DISCOVERY_CACHE_TTL", 5.0)
        self.SERVICE_DISCOVERY_TIMEOUT = env.float("SERVICE_DISCOVERY_TIMEOUT", 1.0)  # longest wait per lookup
{%- endif %}
{%- if cookiecutter.use_tracing %}

        # Tracing: OTLP/HTTP to Jaeger on JAEGER_HOST:4318 unless the
        # standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT says otherwise.
        self.TRACING_ENABLED = env.bool("TRACING_ENABLED", True)
        self.JAEGER_HOST = env.str("JAEGER_HOST", "localhost")
        self.JAEGER_PORT = env.int("JAEGER_PORT", None)  # the guide's UDP agent port: only warned about
        self.OTEL_EXPORTER_OTLP_ENDPOINT = env.str("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        self.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = env.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        self.OTEL_SDK_DISABLED = env.str("OTEL_SDK_DISABLED", "").strip().lower() == "true"  # as the spec says
        self.TRACING_EXPORTER = env.str("OTEL_TRACES_EXPORTER", "otlp")  # otlp, console, none, or a list
        self.OTEL_EXPORTER_OTLP_TIMEOUT = env.float("OTEL_EXPORTER_OTLP_TIMEOUT", None)  # milliseconds
        self.OTEL_EXPORTER_OTLP_TRACES_TIMEOUT = env.float("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", None)  # milliseconds
        # Seconds one export may take: short, so a missing collector never holds up shutdown.
        self.TRACING_EXPORT_TIMEOUT = env.float("TRACING_EXPORT_TIMEOUT", 1.0)
        # A child span per SQL statement; false saves their cost on every recorded request.
        self.TRACING_SQL_SPANS = env.bool("TRACING_SQL_SPANS", True)
        # Probes and scrapes are not worth a trace each.
        self.TRACING_EXCLUDED_URLS = env.str(
            "OTEL_PYTHON_FLASK_EXCLUDED_URLS", r"/health$,/health/ready$,/metrics$"
        )
{%- endif %}
{%- if cookiecutter.outbox != "none" %}

        # Transactional outbox. OUTBOX_PROCESSING_INTERVAL is the longest idle
        # wait between polls: commits (in this process at once, in others through
        # a debounced PostgreSQL NOTIFY) wake the relay, and after a full batch it
        # goes on at once.
        self.OUTBOX_ENABLED = env.bool("OUTBOX_ENABLED", True)
        self.OUTBOX_RELAY_IN_APP = env.bool("OUTBOX_RELAY_IN_APP", True)
        self.OUTBOX_TRANSPORT = env.str("OUTBOX_TRANSPORT", {{ cookiecutter.outbox | py_string }})
        self.OUTBOX_PROCESSING_INTERVAL = env.float("OUTBOX_PROCESSING_INTERVAL", 1.0)
        self.OUTBOX_MIN_POLL_INTERVAL = env.float("OUTBOX_MIN_POLL_INTERVAL", 0.05)
        # At most one NOTIFY per interval per process, sent outside the writers' transactions.
        self.OUTBOX_NOTIFY_INTERVAL = env.float("OUTBOX_NOTIFY_INTERVAL", 0.02)
        self.OUTBOX_BATCH_SIZE = env.int("OUTBOX_BATCH_SIZE", 500)
        # Batches in flight per relay during a backlog (one claims while another publishes); 1 on SQLite.
        self.OUTBOX_RELAY_WORKERS = env.int("OUTBOX_RELAY_WORKERS", 2)
        # A claimed batch is the relay's for this long (database clock); publishing
        # must end within it, or another relay publishes the batch again.
        self.OUTBOX_LEASE_SECONDS = env.float("OUTBOX_LEASE_SECONDS", 30.0)
        # Retries: attempt n waits BASE * 2**(n-1) s (capped, jittered); the defaults
        # retry for about 7 to 13 minutes before the event is dead-lettered and parks its key.
        self.OUTBOX_MAX_RETRY = env.int("OUTBOX_MAX_RETRY", 10)
        self.OUTBOX_BACKOFF_BASE = env.float("OUTBOX_BACKOFF_BASE", 2.0)
        self.OUTBOX_BACKOFF_MAX = env.float("OUTBOX_BACKOFF_MAX", 300.0)
        self.OUTBOX_RETENTION_HOURS = env.float("OUTBOX_RETENTION_HOURS", 168.0)
        # Finished events are deleted by primary-key ranges of this many positions.
        self.OUTBOX_CLEANUP_BATCH_SIZE = env.int("OUTBOX_CLEANUP_BATCH_SIZE", 10000)
        self.OUTBOX_CLEANUP_INTERVAL = env.float("OUTBOX_CLEANUP_INTERVAL", 60.0)
        # /health/ready reports the outbox as down when its oldest pending event is older,
        # and outbox_relay as down when a relay loop has not beaten for OUTBOX_RELAY_STALE_AFTER s.
        self.OUTBOX_MAX_LAG = env.float("OUTBOX_MAX_LAG", 60.0)
        self.OUTBOX_RELAY_STALE_AFTER = env.float("OUTBOX_RELAY_STALE_AFTER", 60.0)
{%- if cookiecutter.outbox == "rabbitmq" %}
        self.AMQP_URL = self.secret(env, "AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")
        self.OUTBOX_EXCHANGE = env.str("OUTBOX_EXCHANGE", self.SERVICE_NAME)
        self.OUTBOX_PUBLISH_TIMEOUT = env.float("OUTBOX_PUBLISH_TIMEOUT", 10.0)
{%- endif %}
{%- endif %}

        # flask-smorest: the OpenAPI document is generated from the code and
        # served under the API prefix.
        self.API_TITLE = {{ cookiecutter.service_name | py_string }}
        self.API_SPEC_OPTIONS = {"info": {"description": {{ cookiecutter.description | py_string }}}}
        self.OPENAPI_VERSION = "3.0.3"
        self.OPENAPI_URL_PREFIX = "/api"
        self.OPENAPI_JSON_PATH = "openapi.json"

        if not self.IS_LOCAL:
            self.refuse_local_secrets()

    def secret(self, env: Env, name: str, default: str = "") -> str:
        """Read a credential (see read_secret) and remember it for the production check."""
        value = read_secret(env, name, default)
        self.secrets[name] = value
        return value

    def refuse_local_secrets(self) -> None:
        """Stop a production start-up naming every credential that is missing, weak or a local default."""
        problems = []
        for name, value in self.secrets.items():
            problem = weakness(name, value)
            if problem:
                problems.append(f"{name} {problem}")
        if getattr(self, "RATELIMIT_ENABLED", False) and self.RATELIMIT_STORAGE_URI.startswith("memory://"):
            problems.append(
                "RATELIMIT_STORAGE_URI is memory:// (counters per process, so each worker and "
                "replica would allow the full limit: use a shared redis://)"
            )
        if problems:
            raise InsecureConfigError(
                f"Refusing to start with {self.environment_source} (anything but development or "
                f"test is production): {'; '.join(problems)}. Set each one (or <NAME>_FILE)."
            )


def weakness(name: str, value: str) -> str:
    """What is wrong with credential `name` in production, or "" when nothing is."""
    if name == "SECRET_KEY":
        if not value:
            return "is not set"
        if value == LOCAL_ONLY_SECRET_KEY:
            return "is not set (only the local-only default)"
        if value in PLACEHOLDER_SECRETS:
            return "is a local-only default or placeholder"
        if len(value) < MIN_SECRET_KEY_LENGTH:
            return f"is too short ({len(value)} characters, at least {MIN_SECRET_KEY_LENGTH})"
        return ""
    if name == "DATABASE_URL" and normalise_database_url(value) == DEFAULT_DATABASE_URL:
        return "is not set (the local SQLite file is for development)"
    if value in PLACEHOLDER_SECRETS:
        return "is a local-only default or placeholder"
    if url_password(value) in PLACEHOLDER_SECRETS:
        return "has a local-only password (a default or placeholder)"
    return ""

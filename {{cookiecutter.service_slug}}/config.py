"""Every setting of the service, read from the environment (12-factor).

The names are the migration guide's (SERVICE_NAME, SERVICE_PORT,
API_VERSION, LATEST_API_VERSION, ...). Each value is read when Config() is
built, not at import, so tests and `create_app` can change the environment
first. A malformed value stops start-up with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path

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


class Config:
    """Settings for one app instance; attributes are Flask config keys."""

    def __init__(self) -> None:
        env = Env()
        # A local .env (copied from .env.example) fills in what the real
        # environment leaves unset; it never overrides a set variable.
        env.read_env(BASE_DIR / ".env", recurse=False)
        self.ENVIRONMENT = env.str("ENVIRONMENT", "development")
        self.SERVICE_NAME = env.str("SERVICE_NAME", {{ cookiecutter.service_slug | py_string }})
        self.SERVICE_VERSION = env.str("SERVICE_VERSION", "0.1.0")
        self.SERVICE_PORT = env.int("SERVICE_PORT", {{ cookiecutter.service_port }})
        self.LOG_LEVEL = env.log_level("LOG_LEVEL", "INFO")

        self.SQLALCHEMY_DATABASE_URI = normalise_database_url(
            env.str("DATABASE_URL", DEFAULT_DATABASE_URL)
        )
        self.SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}
        self.MAX_CONTENT_LENGTH = env.int("MAX_CONTENT_LENGTH", 1024 * 1024)
{%- if cookiecutter.use_api_versioning %}

        self.API_VERSION = env.str("API_VERSION", {{ cookiecutter.api_version | py_string }})
        self.LATEST_API_VERSION = env.str("LATEST_API_VERSION", self.API_VERSION)
        self.DEPRECATED_API_VERSIONS = env.dict("DEPRECATED_API_VERSIONS", {})
{%- endif %}
{%- if cookiecutter.use_metrics %}

        self.METRICS_ENABLED = env.bool("METRICS_ENABLED", True)
{%- endif %}

        # flask-smorest: the OpenAPI document is generated from the code and
        # served under the API prefix.
        self.API_TITLE = {{ cookiecutter.service_name | py_string }}
        self.API_SPEC_OPTIONS = {"info": {"description": {{ cookiecutter.description | py_string }}}}
        self.OPENAPI_VERSION = "3.0.3"
        self.OPENAPI_URL_PREFIX = "/api"
        self.OPENAPI_JSON_PATH = "openapi.json"

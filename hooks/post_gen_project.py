"""Shape the freshly rendered project to the features that were chosen.

Everything here is driven by one table, FEATURES: each row says when a
feature is on, which files it owns, which docker-compose services it needs,
what it adds to the service's environment and which tables its part of the
initial migration creates. Removing files, writing docker-compose.yml and
writing the initial migration all read that table and nothing else, and the
template's own tests import it, so there is no second list to keep in step.

This file is valid Python before Jinja renders it (the only template tag is
inside RENDERED_CONTEXT), which is what lets the pre-generation hook and the
tests import the table.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

RENDERED_CONTEXT = r"""{{ cookiecutter | tojson }}"""


@dataclass(frozen=True)
class Feature:
    """One row of the feature table."""

    name: str
    #: Answers that must all hold for the feature to be on; empty means always on.
    when: dict = field(default_factory=dict)
    #: Files and folders (relative to the project root) that only this feature uses.
    files: tuple[str, ...] = ()
    #: Names from COMPOSE_SERVICES that run beside the service when the feature is on.
    compose_services: tuple[str, ...] = ()
    #: Environment the service's own containers get in docker-compose.yml.
    environment: dict = field(default_factory=dict)
    #: Names from MIGRATION_TABLES that the initial migration creates.
    tables: tuple[str, ...] = ()
    #: One line for the summary printed after generation.
    summary: str = ""
    #: Answers the feature cannot work with, each with the reason:
    #: (({question: value, ...}, reason), ...). The pre-generation hook rejects them.
    incompatible: tuple[tuple[dict, str], ...] = ()

    def is_enabled(self, context: dict) -> bool:
        return all(context.get(key) == value for key, value in self.when.items())


FEATURES: tuple[Feature, ...] = (
    Feature(
        name="core",
        tables=("resource",),
        summary="CRUD API for the {resource_plural} resource with an OpenAPI document",
    ),
    Feature(
        name="postgresql",
        when={"database": "postgresql"},
        compose_services=("postgres",),
        environment={
            "DATABASE_URL": "postgresql+psycopg://${POSTGRES_USER:-app}:${POSTGRES_PASSWORD:-app}"
            "@postgres:5432/{db_name}"
        },
        summary="PostgreSQL (psycopg)",
    ),
    Feature(
        name="mysql",
        when={"database": "mysql"},
        compose_services=("mysql",),
        environment={
            "DATABASE_URL": "mysql+pymysql://${MYSQL_USER:-app}:${MYSQL_PASSWORD:-app}"
            "@mysql:3306/{db_name}"
        },
        summary="MySQL / MariaDB (PyMySQL)",
    ),
    Feature(
        name="sqlite",
        when={"database": "sqlite"},
        environment={"DATABASE_URL": "sqlite:////app/data/{db_name}.db"},
        summary="SQLite",
    ),
    Feature(
        name="api_versioning",
        when={"use_api_versioning": True},
        files=(
            "common_utils/versioning.py",
            "app/routes_versioned.py",
            "tests/test_versioning.py",
        ),
        summary="API versioning at /api/{api_version}/ with redirects to the latest version",
    ),
    Feature(
        name="metrics",
        when={"use_metrics": True},
        files=(
            "common_utils/metrics.py",
            "prometheus",
            "tests/test_metrics.py",
            "tests/test_metrics_gunicorn.py",
        ),
        compose_services=("prometheus",),
        summary="Prometheus metrics at /metrics",
    ),
    Feature(
        name="circuit_breaker",
        when={"use_circuit_breaker": True},
        files=(
            "common_utils/circuit_breaker.py",
            "common_utils/http_client.py",
            "tests/test_circuit_breaker.py",
            "tests/test_http_client.py",
        ),
        summary="Circuit breakers and an HTTP client for calls to other services",
    ),
    Feature(
        name="rate_limiting",
        when={"use_rate_limiting": True},
        files=("common_utils/rate_limiting.py", "tests/test_rate_limiting.py"),
        compose_services=("redis",),
        environment={"RATELIMIT_STORAGE_URI": "redis://redis:6379/0"},
        summary="Rate limiting per client (Redis-backed in docker compose)",
    ),
    Feature(
        name="kubernetes",
        when={"use_kubernetes": True},
        files=(
            "deploy/kubernetes",
            "common_utils/migration_wait.py",
            "tests/test_migration_wait.py",
        ),
        incompatible=(
            (
                {"database": "sqlite"},
                "several replicas cannot share one SQLite file; choose postgresql or mysql",
            ),
        ),
        summary="Kubernetes manifests: kubectl apply -k deploy/kubernetes/overlays/prod",
    ),
)


#: docker-compose services a feature can ask for. "{slug}", "{port}" and
#: "{db_name}" are filled with validated answers, never with free text; any
#: other "${...}" is compose's own variable syntax and is left alone.
COMPOSE_SERVICES: dict[str, dict] = {
    "postgres": {
        "image": "postgres:17.2-alpine",
        "environment": {
            "POSTGRES_USER": "${POSTGRES_USER:-app}",
            "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-app}",
            "POSTGRES_DB": "{db_name}",
        },
        "volumes": ["postgres-data:/var/lib/postgresql/data"],
        "healthcheck": {
            "test": ["CMD-SHELL", "pg_isready -U $$POSTGRES_USER -d {db_name}"],
            "interval": "5s",
            "timeout": "3s",
            "retries": 10,
        },
    },
    "mysql": {
        "image": "mysql:8.4.3",
        "environment": {
            "MYSQL_DATABASE": "{db_name}",
            "MYSQL_USER": "${MYSQL_USER:-app}",
            "MYSQL_PASSWORD": "${MYSQL_PASSWORD:-app}",
            "MYSQL_ROOT_PASSWORD": "${MYSQL_ROOT_PASSWORD:-root}",
        },
        "volumes": ["mysql-data:/var/lib/mysql"],
        "healthcheck": {
            "test": ["CMD-SHELL", "mysqladmin ping -h 127.0.0.1 --silent"],
            "interval": "5s",
            "timeout": "3s",
            "retries": 20,
        },
    },
    "redis": {
        "image": "redis:7.4.2-alpine",
        # Rate-limit counters only: nothing worth persisting across restarts.
        "command": ["redis-server", "--save", "", "--appendonly", "no"],
        "healthcheck": {
            "test": ["CMD", "redis-cli", "ping"],
            "interval": "5s",
            "timeout": "3s",
            "retries": 10,
        },
    },
    "prometheus": {
        "image": "prom/prometheus:v3.1.0",
        "ports": ["9090:9090"],
        "volumes": ["./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
        "depends_on": {"{slug}": {"condition": "service_healthy"}},
        "healthcheck": {
            "test": ["CMD", "wget", "-qO-", "http://localhost:9090/-/ready"],
            "interval": "10s",
            "timeout": "3s",
            "retries": 5,
        },
    },
}

#: Named volumes a compose service keeps its data in.
COMPOSE_VOLUMES = {"postgres": "postgres-data", "mysql": "mysql-data"}

#: Tables of the initial migration: (upgrade code, downgrade code). Formatted
#: with the validated resource names only.
MIGRATION_TABLES: dict[str, tuple[str, str]] = {
    "resource": (
        """\
    op.create_table(
        "{resource_plural}",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", sa.Numeric(precision=10, scale=2), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_{resource_plural}")),
        sa.UniqueConstraint("name", name=op.f("uq_{resource_plural}_name")),
    )
    op.create_index(op.f("ix_{resource_plural}_status"), "{resource_plural}", ["status"])
""",
        """\
    op.drop_index(op.f("ix_{resource_plural}_status"), table_name="{resource_plural}")
    op.drop_table("{resource_plural}")
""",
    ),
}

MIGRATION_TEMPLATE = '''\
"""Initial schema: {table_list}.

Revision ID: {revision}
Revises:
Create Date: written by the project template
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
{upgrade}

def downgrade():
{downgrade}'''


def enabled_features(context: dict) -> list[Feature]:
    return [feature for feature in FEATURES if feature.is_enabled(context)]


def incompatible_answers(context: dict) -> list[tuple[Feature, dict, str]]:
    """(feature, answers, reason) for each enabled feature's incompatibility these answers hit."""
    return [
        (feature, answers, reason)
        for feature in enabled_features(context)
        for answers, reason in feature.incompatible
        if all(context.get(key) == value for key, value in answers.items())
    ]


def format_values(context: dict) -> dict:
    """The answers that may be formatted into generated code and compose files.

    Only answers the pre-generation hook has restricted to identifiers,
    slugs or numbers are here; free text (names, descriptions) never is.
    """
    db_name = context["service_slug"].replace("-", "_")
    return {
        "slug": context["service_slug"],
        "port": context["service_port"],
        "db_name": db_name,
        "resource_name": context["resource_name"],
        "resource_plural": context["resource_plural"],
        "api_version": context["api_version"],
    }


def fill(value, values: dict):
    """Fill the {placeholders} of every string inside a nested compose structure."""
    if isinstance(value, str):
        for key, item in values.items():
            value = value.replace("{" + key + "}", str(item))
        return value
    if isinstance(value, dict):
        return {fill(key, values): fill(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, values) for item in value]
    return value


def remove_path(project: Path, relative: str) -> None:
    path = project / relative
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    # A folder left empty (deploy/ once deploy/kubernetes is gone) goes too.
    for parent in path.parents:
        if parent == project or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def remove_disabled_feature_files(project: Path, context: dict) -> None:
    for feature in FEATURES:
        if not feature.is_enabled(context):
            for relative in feature.files:
                remove_path(project, relative)


def compose_document(context: dict) -> dict:
    """The docker-compose.yml for exactly the enabled features."""
    values = format_values(context)
    features = enabled_features(context)
    slug = values["slug"]
    port = int(values["port"])

    environment = {"SERVICE_NAME": slug, "SERVICE_PORT": str(port)}
    for feature in features:
        environment.update(fill(feature.environment, values))
    service_names = [name for feature in features for name in feature.compose_services]
    backing = [name for name in service_names if "depends_on" not in COMPOSE_SERVICES[name]]

    def depends(extra: dict | None = None) -> dict:
        conditions = {name: {"condition": "service_healthy"} for name in backing}
        conditions.update(extra or {})
        return conditions

    data_volumes = ["app-data:/app/data"] if context["database"] == "sqlite" else []
    migrate = {
        "build": ".",
        "image": f"{slug}:latest",
        "command": ["flask", "db", "upgrade"],
        "environment": environment,
        "volumes": data_volumes,
        "depends_on": depends(),
    }
    service = {
        "build": ".",
        "image": f"{slug}:latest",
        "ports": ["${SERVICE_PORT:-" + str(port) + "}:" + str(port)],
        "environment": environment,
        "volumes": data_volumes,
        "depends_on": depends({"migrate": {"condition": "service_completed_successfully"}}),
        "restart": "unless-stopped",
    }
    services = {
        slug: {key: value for key, value in service.items() if value},
        "migrate": {key: value for key, value in migrate.items() if value},
    }
    for name in service_names:
        services[name] = fill(COMPOSE_SERVICES[name], values)

    volumes = [COMPOSE_VOLUMES[name] for name in service_names if name in COMPOSE_VOLUMES]
    if data_volumes:
        volumes.append("app-data")
    document = {"name": slug, "services": services}
    if volumes:
        document["volumes"] = {volume: {} for volume in volumes}
    return document


def write_compose(project: Path, context: dict) -> None:
    import yaml  # cookiecutter depends on PyYAML, so it is always importable here

    header = (
        "# Written by the project template for the features chosen at generation.\n"
        "# Start everything with `docker compose up --build`.\n"
    )
    class ComposeDumper(yaml.SafeDumper):
        """Plain YAML as people write it: no &anchors, indented lists."""

        def ignore_aliases(self, data):
            return True

        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    body = yaml.dump(compose_document(context), Dumper=ComposeDumper, sort_keys=False, width=100)
    (project / "docker-compose.yml").write_text(header + body, encoding="utf-8")


def migration_revision(context: dict) -> str:
    """A stable revision id, so regenerating the same answers gives the same file."""
    key = json.dumps(
        [context["service_slug"], context["resource_plural"]]
        + [feature.name for feature in enabled_features(context)]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def migration_source(context: dict) -> tuple[str, str]:
    """The initial migration's file name and code, from the enabled features' tables."""
    values = format_values(context)
    tables = [table for feature in enabled_features(context) for table in feature.tables]
    upgrade = "".join(MIGRATION_TABLES[table][0].format(**values) for table in tables)
    downgrade = "".join(
        MIGRATION_TABLES[table][1].format(**values) for table in reversed(tables)
    )
    revision = migration_revision(context)
    table_names = ", ".join(
        MIGRATION_TABLES[table][0].split('"', 2)[1].format(**values) for table in tables
    )
    source = MIGRATION_TEMPLATE.format(
        revision=revision,
        table_list=table_names,
        upgrade=upgrade,
        downgrade=downgrade,
    )
    return f"{revision}_initial.py", source


def write_initial_migration(project: Path, context: dict) -> None:
    versions = project / "migrations" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    name, source = migration_source(context)
    (versions / name).write_text(source, encoding="utf-8")


def print_summary(project: Path, context: dict) -> None:
    values = format_values(context)
    lines = [f"Created {project}", "Features:"]
    lines += [
        f"  - {feature.summary.format(**values)}"
        for feature in enabled_features(context)
        if feature.summary
    ]
    lines += [
        "Next:",
        f"  cd {project}",
        f"  make run     # serves http://127.0.0.1:{values['port']}/health",
        "  make test    # runs the service's own tests",
    ]
    print("\n".join(lines))


def main() -> int:
    context = json.loads(RENDERED_CONTEXT)
    project = Path.cwd()
    remove_disabled_feature_files(project, context)
    write_initial_migration(project, context)
    write_compose(project, context)
    print_summary(project, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())

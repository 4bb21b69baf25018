"""Shape the freshly rendered project to the features that were chosen.

Everything here is driven by one table, FEATURES: each row says when a
feature is on, which files it owns, which docker-compose services it needs,
what it adds to the service's environment, which tables its migration
creates and which later migration steps change them. Removing files,
writing docker-compose.yml and writing the migrations all read that table
and nothing else, and the template's own tests import it, so there is no
second list to keep in step.

It also records where the project came from (.cruft.json: the template's
source, commit and the answers), so the service can take template updates
with cruft.

This file is valid Python before Jinja renders it (the only template tags are
inside the RENDERED_CONTEXT and TEMPLATE_FOLDER strings), which is what lets
the pre-generation hook and the tests import the table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

RENDERED_CONTEXT = r"""{{ cookiecutter | tojson }}"""
#: The template's own folder, from the TemplateFolder extension (local_extensions.py).
TEMPLATE_FOLDER = r'{{ template_folder() | tojson }}'  # tojson leaves no ' in it


@dataclass(frozen=True)
class Feature:
    """One row of the feature table."""

    name: str
    #: Answers that must all hold for the feature to be on; empty means always on.
    #: A tuple of values means "any one of these".
    when: dict = field(default_factory=dict)
    #: Files and folders (relative to the project root) that only this feature uses.
    files: tuple[str, ...] = ()
    #: Names from COMPOSE_SERVICES that run beside the service when the feature is on.
    compose_services: tuple[str, ...] = ()
    #: Environment the service's own containers get in docker-compose.yml.
    environment: dict = field(default_factory=dict)
    #: "named-volume:/path" mounts the service's own containers get in docker-compose.yml.
    volumes: tuple[str, ...] = ()
    #: Names from MIGRATION_TABLES that the feature's own migration creates
    #: (migrations/versions/<name>_0001.py, see migration_revisions).
    tables: tuple[str, ...] = ()
    #: Names from MIGRATION_STEPS: the later changes to those tables, oldest
    #: first. The n-th is <name>_000<n+1>.py, revising the one before it.
    #: Append only: a released step never changes, moves or goes.
    migration_steps: tuple[str, ...] = ()
    #: One line for the summary printed after generation.
    summary: str = ""
    #: Short name for the summary's "Left off" list when the feature is off;
    #: empty for rows that are not an option of their own (a database, a transport).
    title: str = ""
    #: Answers the feature cannot work with, each with the reason:
    #: (({question: value, ...}, reason), ...). The pre-generation hook rejects them.
    incompatible: tuple[tuple[dict, str], ...] = ()

    def is_enabled(self, context: dict) -> bool:
        return all(matches(context.get(key), value) for key, value in self.when.items())


def matches(answer, expected) -> bool:
    """An answer satisfies a `when` value: equal to it, or one of a tuple of values."""
    return answer in expected if isinstance(expected, tuple) else answer == expected


FEATURES: tuple[Feature, ...] = (
    Feature(
        name="core",
        tables=("resource",),
        migration_steps=("resource_version",),
        # docker compose is the laptop stack: ENVIRONMENT=development with the
        # local-only secrets below. Any other ENVIRONMENT is production, which
        # refuses to start until every credential is real (README, Security).
        environment={
            "ENVIRONMENT": "${ENVIRONMENT:-development}",
            "SECRET_KEY": "${SECRET_KEY:-insecure-local-only}",
        },
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
        volumes=("app-data:/app/data",),
        summary="SQLite",
    ),
    Feature(
        # The outbox's races on one aggregate need a server database's row locks, and a
        # relay's loops beside each other need one too (SQLite runs one loop).
        name="outbox_row_locks",
        when={"outbox": ("rabbitmq", "in_process"), "database": ("postgresql", "mysql")},
        files=("tests/test_outbox_races.py", "tests/test_outbox_relay_loops.py"),
    ),
    Feature(
        # A relay loop's own connection, with PostgreSQL's session settings.
        name="outbox_postgresql",
        when={"outbox": ("rabbitmq", "in_process"), "database": "postgresql"},
        files=("tests/test_outbox_relay_connection.py",),
    ),
    Feature(
        name="api_versioning",
        title="API versioning",
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
        title="Prometheus metrics",
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
        name="service_registry",
        title="Consul service registry",
        when={"use_service_registry": True},
        files=(
            "common_utils/service_registry.py",
            "tests/consul_stand_in.py",
            "tests/test_service_registry.py",
            "tests/test_service_registry_process.py",
        ),
        compose_services=("consul",),
        environment={"CONSUL_HOST": "consul", "CONSUL_PORT": "8500"},
        summary="Consul registration and discovery (UI at http://localhost:8500)",
    ),
    Feature(
        name="tracing",
        title="OpenTelemetry tracing",
        when={"use_tracing": True},
        files=(
            "common_utils/tracing.py",
            "tests/otlp_receiver.py",
            "tests/test_tracing.py",
            "tests/test_tracing_wire.py",
        ),
        compose_services=("jaeger",),
        environment={
            "JAEGER_HOST": "jaeger",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318",
        },
        summary="OpenTelemetry tracing over OTLP to Jaeger (UI at http://localhost:16686)",
    ),
    Feature(
        name="circuit_breaker",
        title="Circuit breakers and HTTP client",
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
        # Not a feature of its own: the breaker's gauge test needs /metrics too.
        name="circuit_breaker_metrics",
        when={"use_circuit_breaker": True, "use_metrics": True},
        files=("tests/test_circuit_breaker_metrics.py",),
    ),
    Feature(
        name="rate_limiting",
        title="Rate limiting",
        when={"use_rate_limiting": True},
        files=("common_utils/rate_limiting.py", "tests/test_rate_limiting.py"),
        compose_services=("redis",),
        environment={"RATELIMIT_STORAGE_URI": "redis://redis:6379/0"},
        summary="Rate limiting per client (Redis-backed in docker compose)",
    ),
    Feature(
        name="outbox",
        title="Transactional outbox",
        when={"outbox": ("rabbitmq", "in_process")},
        files=(
            "common_utils/outbox",
            "app/events.py",
            "tests/outbox_support.py",
            "tests/test_outbox.py",
            "tests/test_outbox_concurrency.py",
            "tests/test_outbox_crash.py",
            "tests/test_outbox_relay.py",
            "tests/test_outbox_writes.py",
        ),
        compose_services=("outbox-relay",),
        # compose runs the relay as its own service, not as a thread in the app.
        environment={"OUTBOX_RELAY_IN_APP": "false"},
        tables=("outbox_events", "processed_messages"),
        migration_steps=("outbox_relay_leases",),
        summary="Transactional outbox: events written with the data, relayed in order with retries",
    ),
    Feature(
        name="outbox_rabbitmq",
        when={"outbox": "rabbitmq"},
        files=("common_utils/outbox/rabbitmq.py", "tests/test_outbox_rabbitmq.py"),
        compose_services=("rabbitmq",),
        environment={
            "AMQP_URL": "amqp://${RABBITMQ_USER:-app}:${RABBITMQ_PASSWORD:-app}@rabbitmq:5672/%2F"
        },
        summary="Outbox events published to RabbitMQ with confirms (UI at http://localhost:15672)",
    ),
    Feature(
        name="kubernetes",
        title="Kubernetes manifests",
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
    "consul": {
        "image": "hashicorp/consul:1.20.1",
        # A single development agent (in memory) with the UI; production runs a real cluster.
        "command": ["agent", "-dev", "-client=0.0.0.0", "-ui"],
        "ports": ["8500:8500"],
        "healthcheck": {
            "test": ["CMD", "consul", "members"],
            "interval": "5s",
            "timeout": "3s",
            "retries": 10,
        },
    },
    "jaeger": {
        # Jaeger v2 all-in-one: OTLP on 4317 (gRPC) and 4318 (HTTP), UI on 16686, in memory.
        "image": "jaegertracing/jaeger:2.5.0",
        "ports": ["16686:16686", "4317:4317", "4318:4318"],
        "healthcheck": {
            "test": ["CMD", "wget", "-qO-", "http://localhost:13133/status"],
            "interval": "5s",
            "timeout": "3s",
            "retries": 10,
        },
    },
    "rabbitmq": {
        "image": "rabbitmq:4.0.5-management-alpine",
        "environment": {
            "RABBITMQ_DEFAULT_USER": "${RABBITMQ_USER:-app}",
            "RABBITMQ_DEFAULT_PASS": "${RABBITMQ_PASSWORD:-app}",
        },
        "ports": ["15672:15672"],
        "volumes": ["rabbitmq-data:/var/lib/rabbitmq"],
        "healthcheck": {
            "test": ["CMD", "rabbitmq-diagnostics", "-q", "ping"],
            "interval": "10s",
            "timeout": "5s",
            "retries": 10,
            "start_period": "20s",
        },
    },
    # Built from the service's own image: compose_document gives it the
    # service's environment and data volume and the same backing services.
    "outbox-relay": {
        "build": ".",
        "image": "{slug}:latest",
        "command": ["flask", "outbox", "relay", "--heartbeat-file", "/tmp/outbox-relay.alive"],
        "depends_on": {"migrate": {"condition": "service_completed_successfully"}},
        "healthcheck": {
            "test": [
                "CMD",
                "python",
                "-c",
                "import os, sys, time; "
                "sys.exit(time.time() - os.path.getmtime('/tmp/outbox-relay.alive') > 60)",
            ],
            "interval": "15s",
            "timeout": "5s",
            "retries": 3,
            "start_period": "30s",
        },
        "restart": "unless-stopped",
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
COMPOSE_VOLUMES = {"postgres": "postgres-data", "mysql": "mysql-data", "rabbitmq": "rabbitmq-data"}

#: Tables the features' migrations create: (upgrade code, downgrade code).
#: Formatted with the validated resource names only.
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
        # Microseconds on MySQL too (its DATETIME keeps whole seconds by default).
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_{resource_plural}")),
        sa.UniqueConstraint("name", name=op.f("uq_{resource_plural}_name")),
        # Ids are never reused on SQLite either (AUTOINCREMENT).
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_{resource_plural}_status"), "{resource_plural}", ["status"])
""",
        """\
    op.drop_index(op.f("ix_{resource_plural}_status"), table_name="{resource_plural}")
    op.drop_table("{resource_plural}")
""",
    ),
    "outbox_events": (
        """\
    op.create_table(
        "outbox_events",
        sa.Column(
            "position",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("aggregate_type", sa.String(length=100), nullable=False),
        sa.Column("aggregate_id", sa.String(length=100), nullable=False),
        sa.Column("ordering_key", sa.String(length=255), nullable=False),
        sa.Column(
            "payload",
            sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column("headers", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        # Microseconds on MySQL too (its DATETIME keeps whole seconds by default).
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_outbox_events")),
        sa.UniqueConstraint("id", name=op.f("uq_outbox_events_id")),
    )
    op.create_index(op.f("ix_outbox_events_event_type"), "outbox_events", ["event_type"])
    op.create_index(
        op.f("ix_outbox_events_status_position"), "outbox_events", ["status", "position"]
    )
    op.create_index(
        op.f("ix_outbox_events_status_ordering_key_position"),
        "outbox_events",
        ["status", "ordering_key", "position"],
    )
""",
        """\
    op.drop_index(op.f("ix_outbox_events_status_ordering_key_position"), table_name="outbox_events")
    op.drop_index(op.f("ix_outbox_events_status_position"), table_name="outbox_events")
    op.drop_index(op.f("ix_outbox_events_event_type"), table_name="outbox_events")
    op.drop_table("outbox_events")
""",
    ),
    "processed_messages": (
        """\
    op.create_table(
        "processed_messages",
        sa.Column("consumer", sa.String(length=100), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_processed_messages")),
    )
    op.create_index(
        op.f("ix_processed_messages_processed_at"), "processed_messages", ["processed_at"]
    )
""",
        """\
    op.drop_index(op.f("ix_processed_messages_processed_at"), table_name="processed_messages")
    op.drop_table("processed_messages")
""",
    ),
}

#: Later changes to released tables (see Feature.migration_steps):
#: (one-line title, upgrade code, downgrade code). Formatted like MIGRATION_TABLES.
MIGRATION_STEPS: dict[str, tuple[str, str, str]] = {
    "outbox_relay_leases": (
        "Relay leases, fewer and partial indexes on outbox_events; relay heartbeats in outbox_relays.",
        """\
    timestamp = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    op.add_column("outbox_events", sa.Column("claimed_until", timestamp, nullable=True))
    op.add_column("outbox_events", sa.Column("claimed_by", sa.String(length=36), nullable=True))
    op.drop_index(op.f("ix_outbox_events_status_ordering_key_position"), table_name="outbox_events")
    op.drop_index(op.f("ix_outbox_events_status_position"), table_name="outbox_events")
    op.drop_index(op.f("ix_outbox_events_event_type"), table_name="outbox_events")
    # Partial on PostgreSQL and SQLite (unfinished rows only); MySQL/MariaDB
    # have no partial index and build full ones, led by the status.
    op.create_index(
        "ix_outbox_events_pending",
        "outbox_events",
        ["status", "position"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_outbox_events_unfinished",
        "outbox_events",
        ["ordering_key", "status", "position"],
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
        sqlite_where=sa.text("status IN ('pending', 'failed')"),
    )
    op.create_table(
        "outbox_relays",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", timestamp, nullable=False),
        sa.Column("heartbeat_at", timestamp, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_outbox_relays")),
    )
""",
        """\
    op.drop_table("outbox_relays")
    op.drop_index("ix_outbox_events_unfinished", table_name="outbox_events")
    op.drop_index("ix_outbox_events_pending", table_name="outbox_events")
    op.create_index(op.f("ix_outbox_events_event_type"), "outbox_events", ["event_type"])
    op.create_index(
        op.f("ix_outbox_events_status_position"), "outbox_events", ["status", "position"]
    )
    op.create_index(
        op.f("ix_outbox_events_status_ordering_key_position"),
        "outbox_events",
        ["status", "ordering_key", "position"],
    )
    op.drop_column("outbox_events", "claimed_by")
    op.drop_column("outbox_events", "claimed_until")
""",
    ),
    "resource_version": (
        "A version on each of {resource_plural} (optimistic concurrency; existing rows get 1).",
        """\
    op.add_column(
        "{resource_plural}",
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
""",
        """\
    op.drop_column("{resource_plural}", "version")
""",
    ),
}

MIGRATION_TEMPLATE = '''\
"""{title}

Revision ID: {revision}
Revises:{revises}
Create Date: written by the project template

The template writes this file, with this revision, into
{services}, and a template update never changes it: databases
have applied it. Change the schema with a new migration (`make migrate`).
"""

import sqlalchemy as sa
from alembic import op
{mysql_import}
revision = "{revision}"
down_revision = {down_revision}
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

    data_volumes = [mount for feature in features for mount in feature.volumes]
    migrate = {
        "build": ".",
        "image": f"{slug}:latest",
        # heads: every feature's migration branch and the team's (see migration_sources).
        "command": ["flask", "db", "upgrade", "heads"],
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
        # Longer than gunicorn's graceful_timeout (20 s) plus deregistering and
        # flushing spans: compose's default 10 s would SIGKILL a slow drain.
        "stop_grace_period": "30s",
    }
    services = {
        slug: {key: value for key, value in service.items() if value},
        "migrate": {key: value for key, value in migrate.items() if value},
    }
    for name in service_names:
        definition = fill(COMPOSE_SERVICES[name], values)
        if definition.get("image") == service["image"]:
            # Another process of the service itself (a relay, a worker): the
            # service's environment and data, and the same services to wait for.
            shared = {
                "environment": {**environment, **definition.get("environment", {})},
                "volumes": data_volumes + definition.get("volumes", []),
                "depends_on": depends(definition.get("depends_on")),
            }
            own = {key: value for key, value in definition.items() if key not in shared}
            first = {key: own.pop(key) for key in ("build", "image", "command") if key in own}
            definition = {key: value for key, value in {**first, **shared, **own}.items() if value}
        services[name] = definition

    volumes = [COMPOSE_VOLUMES[name] for name in service_names if name in COMPOSE_VOLUMES]
    volumes += [mount.split(":", 1)[0] for mount in data_volumes]
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


def migration_revisions(feature: Feature) -> list[str]:
    """The revisions of a feature's migrations, oldest first: fixed, whatever the answers.

    `<name>_0001` creates the feature's tables; each of its migration_steps
    adds the next number, revising the one before. So turning a feature on
    later adds its files beside the applied ones, a template update adds only
    the new steps, and a service generated with it has byte for byte the same
    files. Never change a released revision (tests/test_updates.py keeps the list).
    """
    if not feature.tables:
        return []
    return [f"{feature.name}_{number:04d}" for number in range(1, len(feature.migration_steps) + 2)]


def migration_sources(context: dict) -> dict[str, str]:
    """The migration files of the enabled features: {file name: code}.

    The core migration (the resource table) is the root; each other
    table-owning feature's first migration revises it, so features are
    independent branches that `flask db upgrade heads` applies in any
    combination. A feature's later steps form a chain on its own branch.
    """
    values = format_values(context)
    core = FEATURES[0]
    sources = {}
    for feature in enabled_features(context):
        revisions = migration_revisions(feature)
        if not revisions:
            continue
        table_names = ", ".join(
            MIGRATION_TABLES[table][0].split('"', 2)[1].format(**values) for table in feature.tables
        )
        owner = "the service's own tables" if feature is core else f"the {feature.name} feature's tables"
        first = (
            f"{owner[0].upper()}{owner[1:]}: {table_names}.",
            "".join(MIGRATION_TABLES[table][0].format(**values) for table in feature.tables),
            "".join(MIGRATION_TABLES[table][1].format(**values) for table in reversed(feature.tables)),
        )
        steps = [first] + [MIGRATION_STEPS[name] for name in feature.migration_steps]
        down_revisions = [None if feature is core else migration_revisions(core)[0], *revisions[:-1]]
        for revision, down_revision, (title, upgrade, downgrade) in zip(
            revisions, down_revisions, steps, strict=True
        ):
            sources[f"{revision}.py"] = MIGRATION_TEMPLATE.format(
                title=title.format(**values),
                mysql_import="from sqlalchemy.dialects import mysql\n" if "mysql." in upgrade + downgrade else "",
                revision=revision,
                revises=f" {down_revision}" if down_revision else "",
                services="every service" if feature is core else f"every service with the {feature.name} feature",
                down_revision=json.dumps(down_revision) if down_revision else "None",
                upgrade=upgrade.format(**values),
                downgrade=downgrade.format(**values),
            )
    return sources


def write_migrations(project: Path, context: dict) -> None:
    versions = project / "migrations" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    for name, source in migration_sources(context).items():
        (versions / name).write_text(source, encoding="utf-8")


def cruft_state(context: dict, template_folder: Path) -> dict | None:
    """What cruft needs to update the project: the template's source and commit, and the answers.

    None when cruft is the one rendering (it writes .cruft.json itself: its
    context has `_commit`) or when the template is not a git checkout (a zip,
    a copied folder) and no commit can name it. The result depends only on
    the answers, the source and the commit (no dates, no local paths of the
    run), so the same inputs give the same file.
    """
    if "_commit" in context:
        return None
    try:
        toplevel, prefix, commit = subprocess.run(
            ["git", "-C", str(template_folder), "rev-parse", "--show-toplevel", "--show-prefix", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    source = template_source(context, toplevel)
    # cruft keeps the answers in the order of cookiecutter.json (the rendered
    # context arrives sorted), so order them the same way for the same file.
    questions = json.loads((template_folder / "cookiecutter.json").read_text(encoding="utf-8"))
    position = {key: index for index, key in enumerate(questions)}
    answers = {
        key: context[key]
        for key in sorted(context, key=lambda key: position.get(key, len(position)))
        if key not in {"_template", "_output_dir", "_repo_dir", "_checkout"}
    }
    return {
        "template": source,
        "commit": commit,
        "checkout": context.get("_checkout"),
        "context": {"cookiecutter": {**answers, "_template": source, "_commit": commit}},
        "directory": prefix.rstrip("/") or None,
    }


def template_source(context: dict, toplevel: str) -> str:
    """The template's source as git can clone it: the local checkout, or the URL as typed (abbreviations expanded)."""
    typed = context.get("_template", "")
    if context.get("_repo_dir") == typed:
        # A local folder: cookiecutter rendered it where it is. (Checked first
        # because importing cookiecutter costs more than the rest of this hook.)
        return toplevel
    from cookiecutter.config import BUILTIN_ABBREVIATIONS, get_user_config
    from cookiecutter.repository import expand_abbreviations, is_repo_url

    try:
        abbreviations = get_user_config()["abbreviations"]
    except Exception:  # an unreadable user config: cookiecutter's own abbreviations still apply
        abbreviations = BUILTIN_ABBREVIATIONS
    url = expand_abbreviations(typed, abbreviations)
    if is_repo_url(url):
        return url.removeprefix("git+")
    return toplevel


def write_cruft_file(project: Path, context: dict) -> None:
    if not TEMPLATE_FOLDER.startswith('"'):
        raise RuntimeError("run in-process: set TEMPLATE_FOLDER (JSON) as well as RENDERED_CONTEXT")
    state = cruft_state(context, Path(json.loads(TEMPLATE_FOLDER)))
    if state is not None:
        # The format cruft itself writes, so `cruft create` and this give the same file.
        text = json.dumps(state, ensure_ascii=False, indent=2, separators=(",", ": ")) + "\n"
        (project / ".cruft.json").write_text(text, encoding="utf-8")
    elif "_commit" not in context:
        print(
            "Note: the template is not a git checkout, so no .cruft.json records it; "
            "to take template updates later, run `cruft link <template git URL>` in the project.",
            file=sys.stderr,
        )


#: The choices that shape the whole project, named first in the summary.
SUMMARY_CHOICES = {"python_version": "Python", "database": "Database", "outbox": "Outbox"}


def answer_text(value) -> str:
    """An answer as cookiecutter takes it on the command line (use_x=yes)."""
    if isinstance(value, tuple):
        return " or ".join(answer_text(item) for item in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_summary(project: Path, context: dict) -> None:
    values = format_values(context)
    lines = [f"Created {project}"]
    width = max(len(label) for label in SUMMARY_CHOICES.values()) + 1
    lines += [
        f"  {label + ':':<{width}} {context[key]}"
        for key, label in SUMMARY_CHOICES.items()
        if key in context
    ]
    lines.append("Features:")
    lines += [
        f"  - {feature.summary.format(**values)}"
        for feature in enabled_features(context)
        if feature.summary
    ]
    left_off = [feature for feature in FEATURES if feature.title and not feature.is_enabled(context)]
    if left_off:
        lines.append("Left off (generate again with the answer shown to add one):")
        lines += [
            "  - " + feature.title + ": " + ", ".join(
                f"{key}={answer_text(value)}" for key, value in feature.when.items()
            )
            for feature in left_off
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
    write_migrations(project, context)
    write_compose(project, context)
    write_cruft_file(project, context)
    if "_commit" not in context:
        # cruft renders into temporary folders (twice per update): a summary
        # would send people to a folder that is about to disappear.
        print_summary(project, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())

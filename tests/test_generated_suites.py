"""Generated projects pass their own test suites, against the real database they chose.

A covering set of answer combinations (every pair of option values at least
once, plus all-on and all-off for each database) is rendered; each project
runs `make test` (the command its README gives) in one shared virtualenv
built from the generated requirements and cached between runs, with a fresh
database of its own on the real PostgreSQL or MariaDB server.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.combinations import (
    TEMPLATE,
    combination_id,
    covering_set,
    defaults,
    make_possible,
    matrix_questions,
)
from tests.conftest import bake_or_fail, fail_or_skip
from tests.test_answers import HOSTILE

CACHE = TEMPLATE / ".cache"
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("TEST_MYSQL_ADMIN_URL", "mysql://root@127.0.0.1:3306/")
SERVICE_URLS = {
    "TEST_AMQP_URL": os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    "TEST_REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}
SUITE_TIMEOUT = 900
FAILED_LINE = re.compile(r"^FAILED (\S+)", re.MULTILINE)
SUMMARY_LINE = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?),? ?)+ in [\d.]+s")

pytestmark = pytest.mark.generated_suite


def requirement_lines(project: Path) -> set[str]:
    lines = set()
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (project / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                lines.add(line)
    return lines


@contextmanager
def file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def generated_venv(cookies_session) -> Path:
    """One virtualenv with every generated requirement, rebuilt only when they change."""
    questions = matrix_questions()
    choices = {key: values for key, values in questions.items() if not isinstance(values[0], bool)}
    requirements: set[str] = set()
    for database in choices.get("database", [None]):
        for other in [dict(zip(choices, combo, strict=True)) for combo in __import__("itertools").product(*choices.values())]:
            if other.get("database", database) != database:
                continue
            all_on = {key: True for key, values in questions.items() if isinstance(values[0], bool)}
            baked = bake_or_fail(cookies_session, make_possible({**all_on, **other}))
            requirements |= requirement_lines(baked.path)
            shutil.rmtree(baked.path.parent, ignore_errors=True)
    text = "\n".join(sorted(requirements)) + "\n"
    key = hashlib.sha256((sys.version + text).encode()).hexdigest()[:16]
    venv = CACHE / f"generated-venv-{key}"
    with file_lock(CACHE / "generated-venv.lock"):
        if not (venv / "bin" / ".installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            (venv / "requirements.txt").write_text(text)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(venv / "requirements.txt")],
                check=True,
            )
            (venv / "bin" / ".installed").touch()
    return venv


def connect_admin(url: str):
    try:
        if url.startswith("postgresql"):
            import psycopg

            return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        import pymysql

        rest = url.split("://", 1)[1]
        credentials, _, host = rest.partition("@")
        user, _, password = credentials.partition(":")
        hostname, _, port = host.rstrip("/").partition(":")
        return pymysql.connect(host=hostname, port=int(port or 3306), user=user, password=password, autocommit=True)
    except Exception as error:  # any connection failure means the server is not usable
        fail_or_skip(f"cannot reach the database server at {url}: {error}")


@contextmanager
def fresh_database(database: str):
    """A new empty database on the real server, dropped afterwards; None for SQLite."""
    if database == "sqlite":
        yield None
        return
    name = f"gen_{uuid.uuid4().hex[:12]}"
    admin_url = POSTGRES_ADMIN_URL if database == "postgresql" else MYSQL_ADMIN_URL
    connection = connect_admin(admin_url)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        if database == "postgresql":
            base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
            yield f"{base}/{name}"
        else:
            yield f"{MYSQL_ADMIN_URL.rstrip('/')}/{name}"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.close()


def make_command(venv: Path, target: str, **variables: str) -> list[str]:
    """`make <target>` with the shared virtualenv, never reinstalling into it."""
    assignments = [f"{key}={value}" for key, value in {"VENV": str(venv), **variables}.items()]
    return ["make", "--no-print-directory", "-o", str(venv / "bin" / ".installed"), target, *assignments]


def run_suite(project: Path, venv: Path, database_url: str | None) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TEST_", "PYTEST_", "VIRTUAL_ENV", "DATABASE_URL"))
    }
    env.update(SERVICE_URLS)
    env["TEST_REQUIRE_SERVICES"] = "1"
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if database_url:
        env["TEST_DATABASE_URL"] = database_url
    result = subprocess.run(
        make_command(venv, "test"), cwd=project, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT
    )
    if result.returncode != 0 and FAILED_LINE.search(result.stdout):
        # Timing-sensitive tests (gunicorn workers, latency ratios, broker cuts)
        # share two cores with another suite; rerun only what failed, once,
        # and say so, so a real failure still fails and a flaky one is visible.
        first_failures = FAILED_LINE.findall(result.stdout)
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pytest", "--last-failed", "-q"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT,
        )
        print(f"RERUN after failures {first_failures}: rerun exit code {result.returncode}")
        with (CACHE / "reruns.log").open("a") as log:
            log.write(f"{project.name} {first_failures} -> {result.returncode}\n")
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if line.startswith(("E ", "FAILED", "ERROR", ">"))][:80]
    assert result.returncode == 0, "\n".join(problems) + "\n...\n" + "\n".join(lines[-15:])
    # Log lines may follow pytest's own last line (exporters flushing at exit).
    counts = [line for line in lines if SUMMARY_LINE.search(line)]
    assert counts, "\n".join(lines[-15:])
    assert " passed" in counts[-1], counts[-1]
    assert "skipped" not in counts[-1], counts[-1]
    assert "failed" not in counts[-1], counts[-1]


COVERING = covering_set()


@pytest.mark.parametrize("answers", COVERING, ids=[combination_id(a) for a in COVERING])
def test_generated_suite_passes(answers, cookies, generated_venv):
    """The project's own `make test` passes, on its real database when it chose one."""
    baked = bake_or_fail(cookies, answers)
    with fresh_database(baked.context["database"]) as database_url:
        run_suite(baked.path, generated_venv, database_url)


def test_hostile_answers_project_passes_its_suite(cookies, generated_venv):
    """Quotes, backslashes, braces and non-ASCII in the answers do not break the service's tests."""
    baked = bake_or_fail(cookies, {**defaults(), **HOSTILE, "database": "sqlite"})
    run_suite(baked.path, generated_venv, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_commands_generate_a_service_that_serves_health(tmp_path, generated_venv):
    """The README's `make generate` (no input) then the generated README's `make run` serves /health."""
    template_venv = Path(sys.prefix)
    result = subprocess.run(
        make_command(template_venv, "generate", ARGS="--no-input", OUT=str(tmp_path)),
        cwd=TEMPLATE,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "make run" in result.stdout
    project = next(path for path in tmp_path.iterdir() if path.is_dir())
    assert "make run" in (project / "README.md").read_text()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TEST_", "DATABASE_URL"))}
    server = subprocess.Popen(
        make_command(generated_venv, "run", SERVICE_PORT=str(port)),
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    body = response.read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "make run did not serve /health within 60 s"
                time.sleep(0.5)
        assert '"status":"healthy"' in body.replace(" ", "")
        assert (project / "data").is_dir(), "make run should have created the local SQLite database"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)

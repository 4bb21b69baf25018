"""Day two: a generated service takes template updates and turns features on and off later.

A temporary git repository holds this template at commit A and at a later
commit B (A plus a change to a shared file and to a feature file). Services
are generated from A with plain `cookiecutter`, committed, given a file, a
model and a migration of the team's own and a database with rows; then
`make update` (cruft update and the migration step) takes them to B and turns
features on, a few per update, and one feature off again. After every
update:

- the project is exactly a fresh render of the same commit with the same
  answers, plus the team's own changes (so no conflict in a file the team did
  not touch, nothing missing, nothing left over);
- every migration file that existed before is still there, byte for byte;
- `make check-migrations` (upgrade heads, then `flask db check`) passes on the
  database, whose rows are all still there.

The project's own test suite runs once at the end of each sequence. Update
and upgrade times are printed (run with -s to see them).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.combinations import TEMPLATE, feature_table, matrix_questions
from tests.conftest import fail_or_skip
from tests.suites import uv, uv_environment

CACHE = TEMPLATE / ".cache"
TEMPLATE_BIN = Path(sys.executable).parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SERVICE_URLS = {
    "TEST_AMQP_URL": os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    "TEST_REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "TEST_RABBITMQCTL": os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl"),
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Team",
    "GIT_AUTHOR_EMAIL": "team@example.com",
    "GIT_COMMITTER_NAME": "Team",
    "GIT_COMMITTER_EMAIL": "team@example.com",
}

ALL_OFF = {
    "use_api_versioning": False,
    "use_metrics": False,
    "use_service_registry": False,
    "use_tracing": False,
    "use_circuit_breaker": False,
    "use_rate_limiting": False,
    "outbox": "none",
    "use_kubernetes": False,
}

#: Commit B's change to a file every project has, and to a feature's file.
SHARED_CHANGE = ("{{cookiecutter.service_slug}}/.gitignore", "\n# Editor folders\n.idea/\n.vscode/\n")
FEATURE_CHANGE = (
    "{{cookiecutter.service_slug}}/common_utils/circuit_breaker.py",
    '\n\ndef breaker_names(registry) -> list[str]:\n    """The names of the breakers made so far, sorted."""\n'
    "    return sorted(registry.breakers)\n",
)
#: The team's own line at the end of .gitignore, where commit B adds lines too: a conflict.
TEAM_GITIGNORE = "\n# Our notes\nnotes/\n"

#: The team's own model (appended to app/models.py) and its own test file.
TEAM_MODEL = '''

class Note(db.Model):
    """The team's own table, added after generation."""

    __tablename__ = "notes"

    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.String(200), nullable=False)
'''
TEAM_TEST = '''"""The team's own test: its Note model round-trips through the database."""

from app.extensions import db
from app.models import Note


def test_note_round_trip(app):
    with app.app_context():
        db.session.add(Note(text="remember"))
        db.session.commit()
        assert [note.text for note in db.session.scalars(db.select(Note))] == ["remember"]
'''
TEAM_FILES = ("app/models.py", "tests/test_notes.py")

#: Revisions the template has shipped: never change one (services have applied it).
#: Each feature's, oldest first: a later step is appended, never inserted.
RELEASED_REVISIONS = {"core": ["core_0001", "core_0002"], "outbox": ["outbox_0001", "outbox_0002"]}


# --------------------------------------------------------------------------- helpers


def run(
    command: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed in {cwd}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def child_cpu() -> float:
    """CPU seconds of finished child processes: steadier than wall time on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def git(cwd: Path, *args: str) -> str:
    return run(["git", *args], cwd, env={**os.environ, **GIT_IDENTITY}).stdout


def commit_all(cwd: Path, message: str) -> None:
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory) -> dict:
    """A git repository of this template: commit A (the template as it is) and commit B (A + a change)."""
    repo = tmp_path_factory.mktemp("template") / "enhanced-service"
    repo.mkdir()
    files = git(TEMPLATE, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        source = TEMPLATE / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    git(repo, "init", "-q", "-b", "main")
    commit_all(repo, "A")
    commit_a = git(repo, "rev-parse", "HEAD").strip()
    for relative, addition in (SHARED_CHANGE, FEATURE_CHANGE):
        with (repo / relative).open("a", encoding="utf-8") as handle:
            handle.write(addition)
    commit_all(repo, "B: editor folders ignored, breaker_names()")
    commit_b = git(repo, "rev-parse", "HEAD").strip()
    return {"path": repo, "A": commit_a, "B": commit_b}


def check_out(template_repo: dict, commit: str) -> None:
    """Generate at A as if B did not exist yet; update from `main`, which is at B."""
    git(template_repo["path"], "checkout", "-q", "main" if commit == "B" else template_repo[commit])


def cli_answers(answers: dict) -> list[str]:
    return [
        f"{key}={json.dumps(value) if isinstance(value, bool) else value}" for key, value in answers.items()
    ]


def generate(repo: Path, out: Path, answers: dict) -> Path:
    """Plain cookiecutter, as the README says, from the template repository."""
    out.mkdir(parents=True, exist_ok=True)
    run(
        [str(TEMPLATE_BIN / "cookiecutter"), "--no-input", "-o", str(out), str(repo), *cli_answers(answers)],
        out,
    )
    (project,) = [path for path in out.iterdir() if path.is_dir()]
    return project


def render_in_process(repo: Path, out: Path, answers: dict) -> Path:
    """The same render without a cookiecutter process of its own (cheaper, for comparisons)."""
    from cookiecutter.main import cookiecutter

    out.mkdir(parents=True)
    config = out / "cookiecutter.yaml"
    config.write_text(json.dumps({"cookiecutters_dir": str(out / "cc"), "replay_dir": str(out / "replay")}))
    return Path(
        cookiecutter(
            str(repo), no_input=True, extra_context=answers, output_dir=str(out), config_file=str(config)
        )
    )


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file of the project but git's own, by relative path."""
    return {
        path.relative_to(project).as_posix(): path.read_bytes()
        for path in sorted(project.rglob("*"))
        if path.is_file() and not {".git", "__pycache__"} & set(path.relative_to(project).parts)
    }


def migration_hashes(project: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (project / "migrations" / "versions").glob("*.py")
    }


def recorded_answers(project: Path) -> dict:
    context = json.loads((project / ".cruft.json").read_text())["context"]["cookiecutter"]
    return {key: value for key, value in context.items() if not key.startswith("_")}


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


@pytest.fixture(scope="module")
def service_venv(template_repo, tmp_path_factory) -> Path:
    """A virtualenv with every generated requirement (cruft for `make update` included).

    The union over all-on projects of each database, named and locked like the
    generated-suite virtualenv of tests/test_generated_suites.py, so the two
    share one cached virtualenv when their requirements are the same.
    """
    out = tmp_path_factory.mktemp("requirements")
    requirements: set[str] = set()
    questions = matrix_questions()
    for database in questions["database"]:
        answers = {
            key: values[0] if not isinstance(values[0], bool) else True for key, values in questions.items()
        }
        answers.update(database=database, use_kubernetes=database != "sqlite")
        requirements |= requirement_lines(generate(template_repo["path"], out / database, answers))
    text = "\n".join(sorted(requirements)) + "\n"
    key = hashlib.sha256((sys.version + text).encode()).hexdigest()[:16]
    venv = CACHE / f"generated-venv-{key}"
    with file_lock(CACHE / "generated-venv.lock"):
        if not (venv / "bin" / ".installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            # uv builds it from its package cache (outside the clone) in seconds.
            environment = uv_environment()
            subprocess.run(
                [uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=environment
            )
            (venv / "requirements.txt").write_text(text)
            subprocess.run(
                [
                    uv(),
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    str(venv / "bin" / "python"),
                    "-r",
                    str(venv / "requirements.txt"),
                ],
                check=True,
                env=environment,
            )
            (venv / "bin" / ".installed").touch()
    return venv


def service_env(venv: Path, database_url: str) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TEST_", "PYTEST_", "VIRTUAL_ENV"))
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        DATABASE_URL=database_url,
        ENVIRONMENT="development",
        TRACING_ENABLED="false",
        **GIT_IDENTITY,
    )
    return env


def make(project: Path, venv: Path, env: dict, target: str, check: bool = True, **variables: str):
    assignments = [f"{key}={value}" for key, value in {"VENV": str(venv), **variables}.items()]
    command = ["make", "--no-print-directory", "-o", str(venv / "bin" / ".installed"), target, *assignments]
    return run(command, project, env=env, check=check)


class Service:
    """A generated service in its git repository, with the team's changes and a database."""

    def __init__(self, repo: Path, path: Path, venv: Path, database_url: str, rows: callable):
        self.repo = repo
        self.path = path
        self.venv = venv
        self.database_url = database_url
        self.rows = rows
        self.env = service_env(venv, database_url)
        self.team_migrations: set[str] = set()
        self.team_gitignore = ""
        self.times: list[tuple[str, float, float]] = []

    def python(self, code: str) -> str:
        return run([str(self.venv / "bin" / "python"), "-c", code], self.path, env=self.env).stdout

    def api_prefix(self) -> str:
        answers = recorded_answers(self.path)
        return f"/api/{answers['api_version']}" if answers["use_api_versioning"] else "/api"

    def create_resources(self, names: list[str]) -> None:
        """Through the service's own API, so the rows are what the service writes."""
        plural = recorded_answers(self.path)["resource_plural"].replace("_", "-")
        self.python(
            "from app import create_app\n"
            f"app = create_app({{'SQLALCHEMY_DATABASE_URI': {self.database_url!r}}})\n"
            "client = app.test_client()\n"
            f"for name in {names!r}:\n"
            f"    response = client.post('{self.api_prefix()}/{plural}', "
            "json={'name': name, 'quantity': 2, 'unit_price': '9.50'})\n"
            "    assert response.status_code == 201, response.get_data(as_text=True)\n"
        )

    def add_team_work(self) -> None:
        """The team's own model, test and migration, written the way the README says."""
        with (self.path / "app" / "models.py").open("a", encoding="utf-8") as handle:
            handle.write(TEAM_MODEL)
        (self.path / "tests" / "test_notes.py").write_text(TEAM_TEST, encoding="utf-8")
        before = set(migration_hashes(self.path))
        run([str(self.venv / "bin" / "flask"), "db", "upgrade", "heads"], self.path, env=self.env)
        make(self.path, self.venv, self.env, "migrate", m="add notes")
        self.team_migrations |= set(migration_hashes(self.path)) - before
        assert len(self.team_migrations) == 1, self.team_migrations
        make(self.path, self.venv, self.env, "check-migrations")
        commit_all(self.path, "Our notes")

    def update(self, label: str, answers: dict | None = None, expect_conflicts: tuple[str, ...] = ()) -> None:
        """`make update`, then every check of the module docstring."""
        migrations_before = migration_hashes(self.path)
        rows_before = self.rows()
        variables = {"ANSWERS": json.dumps(answers)} if answers else {}
        started, cpu = time.perf_counter(), child_cpu()
        result = make(self.path, self.venv, self.env, "update", check=not expect_conflicts, **variables)
        update_seconds, update_cpu = time.perf_counter() - started, child_cpu() - cpu
        output = result.stdout + result.stderr
        if expect_conflicts:
            assert result.returncode != 0, "make update should fail on a conflict"
            conflicted = git(self.path, "diff", "--name-only", "--diff-filter=U").split()
            assert sorted(conflicted) == sorted(expect_conflicts), output
            for name in conflicted:
                text = (self.path / name).read_text()
                for marker in ("<<<<<<< ours", "=======", ">>>>>>> theirs"):
                    assert marker in text, text
                assert name in result.stderr, result.stderr
                self.resolve_by_keeping_both(name)
        assert not list(self.path.rglob("*.rej")), output
        # New migrations (merge, removal) are the team's from now on.
        self.team_migrations |= (
            set(migration_hashes(self.path)) - set(migrations_before) - set(self.template_migrations())
        )

        after = migration_hashes(self.path)
        for name, digest in migrations_before.items():
            assert after.get(name) == digest, f"{label}: the applied migration {name} was changed or removed"

        self.assert_is_a_fresh_render_plus_team_changes(label)

        started, cpu = time.perf_counter(), child_cpu()
        self.upgrade_and_check()
        upgrade_seconds, upgrade_cpu = time.perf_counter() - started, child_cpu() - cpu
        rows_after = self.rows()
        for table, rows in rows_before.items():
            if table in rows_after or self.table_is_kept(table):
                assert rows_after.get(table) == rows, f"{label}: rows of {table} changed"
        commit_all(self.path, f"Template update: {label}")
        self.times.append((label, update_seconds, update_cpu, upgrade_seconds, upgrade_cpu))

    def upgrade_and_check(self) -> None:
        """`make check-migrations` (`flask db upgrade heads`, `flask db check`) in one process."""
        self.python(
            "from alembic import command\n"
            "from flask_migrate import upgrade\n"
            "from app import create_app\n"
            f"app = create_app({{'SQLALCHEMY_DATABASE_URI': {self.database_url!r}}})\n"
            "with app.app_context():\n"
            "    upgrade(revision='heads')\n"
            "    command.check(app.extensions['migrate'].migrate.get_config())\n"
        )

    def table_is_kept(self, table: str) -> bool:
        return table not in {"outbox_events", "processed_messages", "outbox_sequences"}

    def resolve_by_keeping_both(self, name: str) -> None:
        """What a person does with a conflict: keep both sides, drop the markers, git add."""
        lines = (self.path / name).read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith(("<<<<<<< ", "=======", ">>>>>>> "))]
        (self.path / name).write_text("".join(kept))
        git(self.path, "add", name)

    def template_migrations(self) -> list[str]:
        return [f"{revision}.py" for revisions in RELEASED_REVISIONS.values() for revision in revisions]

    def assert_is_a_fresh_render_plus_team_changes(self, label: str) -> None:
        answers = recorded_answers(self.path)
        fresh = render_in_process(self.repo, self.path.parent / f"fresh-{uuid.uuid4().hex[:8]}", answers)
        try:
            expected, actual = snapshot(fresh), snapshot(self.path)
        finally:
            shutil.rmtree(fresh.parent)
        team = set(TEAM_FILES) | {f"migrations/versions/{name}" for name in self.team_migrations}
        team |= {f"migrations/versions/{name}" for name in self.kept_migrations(expected)}
        if self.team_gitignore:
            team.add(".gitignore")
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected) - team)
        assert not missing, f"{label}: files the update did not bring: {missing}"
        assert not extra, f"{label}: files a fresh render does not have: {extra}"
        differing = sorted(name for name in expected if name not in team and expected[name] != actual[name])
        assert not differing, f"{label}: files that differ from a fresh render: {differing}"
        models = actual["app/models.py"].decode()
        assert models == expected["app/models.py"].decode() + TEAM_MODEL, f"{label}: app/models.py"
        assert actual["tests/test_notes.py"].decode() == TEAM_TEST
        if self.team_gitignore:
            # The conflict was resolved by keeping both sides: every line of each is there.
            lines = actual[".gitignore"].decode().splitlines()
            assert set(expected[".gitignore"].decode().splitlines()) <= set(lines), label
            assert set(self.team_gitignore.splitlines()) <= set(lines), label

    def kept_migrations(self, expected: dict) -> set[str]:
        """Template migrations a switched-off feature left behind (kept on purpose)."""
        shipped = {
            name for name in self.template_migrations() if (self.path / "migrations/versions" / name).exists()
        }
        return {name for name in shipped if f"migrations/versions/{name}" not in expected}

    def run_suite(self, *selection: str, database_url: str | None = None) -> None:
        env = {**self.env, **SERVICE_URLS, "TEST_REQUIRE_SERVICES": "1"}
        env.pop("DATABASE_URL")
        if database_url:
            env["TEST_DATABASE_URL"] = database_url
        started = time.perf_counter()
        result = run(
            [str(self.venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
            self.path,
            env=env,
            check=False,
        )
        print(
            f"\nthe project's own tests ({' '.join(selection) or 'all'}): {time.perf_counter() - started:.1f} s"
        )
        lines = (result.stdout + result.stderr).splitlines()
        assert result.returncode == 0, "\n".join(lines[-60:])
        summary = [line for line in lines if " passed" in line and " in " in line]
        assert summary, "\n".join(lines[-20:])
        assert "skipped" not in summary[-1], summary[-1]
        assert "failed" not in summary[-1], summary[-1]

    def print_times(self, title: str) -> None:
        print(f"\n{title}: seconds per step, wall (CPU)")
        print(f"  {'step':<36} {'make update':>14} {'upgrade + check':>16}")
        for label, update_wall, update_cpu, upgrade_wall, upgrade_cpu in self.times:
            print(
                f"  {label:<36} {update_wall:6.1f} ({update_cpu:4.1f}) {upgrade_wall:8.1f} ({upgrade_cpu:4.1f})"
            )


@contextmanager
def fresh_postgres_database():
    try:
        import psycopg

        connection = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    except Exception as error:  # any connection failure means the server is not usable
        fail_or_skip(f"cannot reach PostgreSQL at {POSTGRES_ADMIN_URL}: {error}")
    name = f"upd_{uuid.uuid4().hex[:12]}"
    connection.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.close()


def table_rows_sqlite(path: Path, tables: tuple[str, ...]):
    def rows() -> dict:
        with sqlite3.connect(path) as connection:
            present = {
                row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            return {
                table: sorted(connection.execute(f"SELECT * FROM {table}").fetchall())  # noqa: S608
                for table in tables
                if table in present
            }

    return rows


def table_rows_postgres(url: str, tables: tuple[str, ...]):
    def rows() -> dict:
        import psycopg

        with psycopg.connect(url) as connection:
            present = {
                row[0]
                for row in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            }
            return {
                table: sorted(map(repr, connection.execute(f"SELECT * FROM {table}").fetchall()))  # noqa: S608
                for table in tables
                if table in present
            }

    return rows


def start_service(template_repo, tmp_path, venv, answers, database_url, rows) -> Service:
    check_out(template_repo, "A")
    project = generate(template_repo["path"], tmp_path / "services", answers)
    service = Service(template_repo["path"], project, venv, database_url, rows)
    git(project, "init", "-q", "-b", "main")
    commit_all(project, "Generated from the template")
    service.add_team_work()
    return service


#: Toggles turned on by one update in the feature sequence (see feature_steps).
TOGGLES_PER_UPDATE = 3


def feature_steps(database: str) -> list[dict]:
    """Answers that turn each feature with files or tables on, from all off, in a few updates.

    The toggles come TOGGLES_PER_UPDATE at a time: each one's files still
    arrive by an update, and the later updates patch shared files an earlier
    one already changed. Each outbox value gets an update of its own (its
    tables, the merge with the team's migration, then the switch of relay).
    An update turning on one toggle at a time would check nothing more: the
    project after it is compared with a fresh render of its answers, and every
    combination's render is checked by the matrix.
    """
    toggles: dict = {}
    choices: list[dict] = []
    answers = {**ALL_OFF, "database": database}
    for question, values in matrix_questions().items():
        if question == "database":
            continue
        options = [True] if isinstance(values[0], bool) else [v for v in reversed(values) if v != "none"]
        for value in options:
            candidate = {**answers, question: value}
            if feature_table().incompatible_answers(candidate):
                continue
            if isinstance(value, bool):
                toggles[question] = value
            else:
                choices.append({question: value})
            answers = candidate
    names = list(toggles)
    grouped = [
        {name: toggles[name] for name in names[start : start + TOGGLES_PER_UPDATE]}
        for start in range(0, len(names), TOGGLES_PER_UPDATE)
    ]
    return grouped + choices


# --------------------------------------------------------------------------- tests


def test_migration_revisions_are_fixed(table):
    """Each table-owning feature's migration has its released revision, whatever the other answers."""
    owners = {feature.name: table.migration_revisions(feature) for feature in table.FEATURES if feature.tables}
    assert owners == RELEASED_REVISIONS
    base = {
        **ALL_OFF,
        "database": "sqlite",
        "service_slug": "a",
        "service_port": "5000",
        "resource_name": "order",
        "resource_plural": "orders",
        "api_version": "v1",
    }
    alone = table.migration_sources({**base, "outbox": "rabbitmq"})
    with_everything = table.migration_sources(
        {
            **base,
            **{key: True for key in ALL_OFF if key.startswith("use_")},
            "outbox": "in_process",
            "database": "postgresql",
            "service_slug": "b-c",
            "api_version": "v2",
        }
    )
    assert alone == with_everything, (
        "a migration file must not depend on other answers than the resource's names"
    )
    # Each feature's first migration revises core_0001 (core's is the root); each later step the one before.
    revises = {
        name.removesuffix(".py"): source.split("\ndown_revision = ", 1)[1].split("\n", 1)[0]
        for name, source in alone.items()
    }
    for feature, revisions in RELEASED_REVISIONS.items():
        first = "None" if feature == "core" else '"core_0001"'
        assert [revises[revision] for revision in revisions] == [
            first,
            *(f'"{revision}"' for revision in revisions[:-1]),
        ]


def test_feature_steps_cover_every_feature_with_files_or_tables(table):
    """The update sequences below turn on every feature that owns files or tables."""
    turned_on = set()
    for database, extra in (("sqlite", {}), ("postgresql", {"use_kubernetes": True})):
        answers = {**ALL_OFF, "database": database}
        for step in [*feature_steps(database), extra]:
            before = {feature.name for feature in table.enabled_features(answers)}
            answers = {**answers, **step}
            turned_on |= {feature.name for feature in table.enabled_features(answers)} - before
    owners = {
        feature.name for feature in table.FEATURES if feature.files or (feature.tables and feature.when)
    }
    assert owners <= turned_on, owners - turned_on


def test_plain_cookiecutter_records_the_template_for_cruft(template_repo, tmp_path):
    """`.cruft.json` names the template's source and commit and keeps the answers, as cruft does."""
    check_out(template_repo, "A")
    project = generate(
        template_repo["path"], tmp_path / "out", {"database": "sqlite", "outbox": "in_process"}
    )
    state = json.loads((project / ".cruft.json").read_text())
    assert state["template"] == str(template_repo["path"].resolve())
    assert state["commit"] == template_repo["A"]
    assert state["checkout"] is None
    assert state["directory"] is None
    answers = state["context"]["cookiecutter"]
    assert answers["_commit"] == template_repo["A"]
    assert answers["_template"] == state["template"]
    assert answers["database"] == "sqlite"
    assert answers["outbox"] == "in_process"
    assert answers["use_tracing"] is True
    assert not {"_output_dir", "_repo_dir", "_checkout"} & set(answers), (
        "paths of one run make renders differ"
    )


def test_a_cloned_template_is_recorded_by_its_url(template_repo, tmp_path):
    """From a URL, cookiecutter clones the template; .cruft.json keeps the URL git can clone again."""
    check_out(template_repo, "A")
    config = tmp_path / "cookiecutter.yaml"
    config.write_text(
        json.dumps({"cookiecutters_dir": str(tmp_path / "clones"), "replay_dir": str(tmp_path / "r")})
    )
    url = template_repo["path"].resolve().as_uri()
    out = tmp_path / "out"
    run(
        [
            str(TEMPLATE_BIN / "cookiecutter"),
            "--no-input",
            "--config-file",
            str(config),
            "-o",
            str(out),
            f"git+{url}",
        ],
        tmp_path,
    )
    (project,) = out.iterdir()
    state = json.loads((project / ".cruft.json").read_text())
    assert state["template"] == url
    assert state["commit"] == template_repo["A"]
    assert state["context"]["cookiecutter"]["_template"] == url


def test_a_template_without_git_says_it_cannot_be_recorded(template_repo, tmp_path):
    """A copied folder has no commit: no .cruft.json, and a note saying how to link it later."""
    copy = tmp_path / "copy"
    shutil.copytree(template_repo["path"], copy, ignore=shutil.ignore_patterns(".git"))
    out = tmp_path / "out"
    result = run([str(TEMPLATE_BIN / "cookiecutter"), "--no-input", "-o", str(out), str(copy)], tmp_path)
    (project,) = out.iterdir()
    assert not (project / ".cruft.json").exists()
    assert "cruft link" in result.stderr


def test_cruft_create_and_cookiecutter_give_byte_identical_projects(template_repo, tmp_path):
    """The hooks work under cruft, and rendering is deterministic: same answers and commit, same bytes."""
    check_out(template_repo, "A")
    answers = {"database": "postgresql", "use_kubernetes": True, "service_name": 'Zoë\'s "Shop"'}
    first = generate(template_repo["path"], tmp_path / "first", answers)
    second = generate(template_repo["path"], tmp_path / "second", answers)
    assert snapshot(first) == snapshot(second)
    (tmp_path / "cruft").mkdir()
    run(
        [
            str(TEMPLATE_BIN / "cruft"),
            "create",
            "--no-input",
            "--output-dir",
            str(tmp_path / "cruft"),
            "--extra-context",
            json.dumps(answers),
            str(template_repo["path"]),
        ],
        tmp_path,
    )
    assert snapshot(tmp_path / "cruft" / first.name) == snapshot(first)


def test_cruft_create_refuses_a_bad_answer_like_cookiecutter(template_repo, tmp_path):
    """The pre-generation hook reads the feature table under cruft too: one ERROR line, nothing on disk."""
    check_out(template_repo, "A")
    out = tmp_path / "out"
    out.mkdir()
    result = run(
        [
            str(TEMPLATE_BIN / "cruft"),
            "create",
            "--no-input",
            "--output-dir",
            str(out),
            "--extra-context",
            json.dumps({"service_port": "9090"}),
            str(template_repo["path"]),
        ],
        tmp_path,
        check=False,
    )
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("ERROR: ")]
    assert errors, result.stdout + result.stderr
    assert "service_port = '9090'" in errors[0], errors
    assert "prometheus" in errors[0], errors
    assert list(out.iterdir()) == []


def test_sqlite_service_takes_the_update_and_every_feature_a_few_at_a_time(
    template_repo, service_venv, tmp_path
):
    """All features off at A; then A -> B (a conflict in .gitignore, resolved) and every feature on, a few per update."""
    database = tmp_path / "service.db"
    service = start_service(
        template_repo,
        tmp_path,
        service_venv,
        {**ALL_OFF, "database": "sqlite"},
        f"sqlite:///{database}",
        table_rows_sqlite(database, ("orders", "notes")),
    )
    service.create_resources(["first", "second", "third"])
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO notes (text) VALUES ('written before any update')")
    # The team's own line where commit B adds lines too.
    with (service.path / ".gitignore").open("a", encoding="utf-8") as handle:
        handle.write(TEAM_GITIGNORE)
    service.team_gitignore = TEAM_GITIGNORE
    commit_all(service.path, "Ignore our notes folder")
    check_out(template_repo, "B")

    service.update("A -> B (conflict in .gitignore)", expect_conflicts=(".gitignore",))
    assert json.loads((service.path / ".cruft.json").read_text())["commit"] == template_repo["B"]
    for step in feature_steps("sqlite"):
        service.update(" ".join(f"{key}={value}" for key, value in step.items()), step)
    assert service.rows()["orders"], "the rows written at A are still there"
    service.print_times("SQLite service, all features off at A")
    # The service is a fresh render plus the team's files (checked after every update),
    # and the all-on SQLite render's whole suite runs among the generated suites: here
    # the team's own test, the API and the tests that walk the migrations.
    service.run_suite("tests/test_migrations.py", "tests/test_notes.py", "tests/test_api.py")


def test_postgresql_service_turns_the_outbox_on_and_off(template_repo, service_venv, tmp_path):
    """A few features on at A, on PostgreSQL: A -> B with the outbox (tables beside the team's migration),
    then the outbox off again (its tables dropped, everything else kept) with Kubernetes on."""
    answers = {
        **ALL_OFF,
        "database": "postgresql",
        "use_api_versioning": True,
        "use_metrics": True,
        "use_circuit_breaker": True,
    }
    with fresh_postgres_database() as url:
        tables = ("orders", "notes", "outbox_events")
        service_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
        service = start_service(
            template_repo, tmp_path, service_venv, answers, service_url, table_rows_postgres(url, tables)
        )
        service.create_resources(["first", "second"])
        service.python(
            "import psycopg\n"
            f"with psycopg.connect({url!r}) as c:\n"
            "    c.execute(\"INSERT INTO notes (text) VALUES ('written before any update')\")\n"
        )
        check_out(template_repo, "B")

        service.update("A -> B, outbox=rabbitmq", {"outbox": "rabbitmq"})
        assert any("merge" in name for name in service.team_migrations), "the branches were joined"
        service.create_resources(["with events"])
        assert service.rows()["outbox_events"], "the outbox works after the update"
        # Kubernetes (files only) comes with the outbox's removal: one update less, the same checks.
        service.update(
            "outbox=none (off again), use_kubernetes=True", {"outbox": "none", "use_kubernetes": True}
        )
        rows = service.rows()
        assert "outbox_events" not in rows, "turning the outbox off drops its tables"
        assert len(rows["orders"]) == 3
        assert len(rows["notes"]) == 1
        removal = [name for name in service.team_migrations if "_remove_outbox_0001" in name]
        assert len(removal) == 1
        assert (service.path / "migrations/versions/outbox_0001.py").exists()
        service.print_times("PostgreSQL service, a few features on at A")
        with fresh_postgres_database() as suite_url:
            # The tests that walk the migrations (the team's, the merge, the removal) on
            # PostgreSQL; the rest of the suite is the generated suites' job.
            service.run_suite(
                "tests/test_migrations.py",
                "tests/test_migration_wait.py",
                "tests/test_notes.py",
                database_url=suite_url,
            )

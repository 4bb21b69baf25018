"""The Kubernetes init container's wait: pods start only on a schema with their migrations."""

import shutil
import threading
import time

import pytest
from alembic.script import ScriptDirectory
from flask_migrate import upgrade
from sqlalchemy import create_engine, text

from app import create_app
from common_utils import migration_wait
from common_utils.migration_wait import schema_is_current, wait_for_migrations
from config import BASE_DIR

MIGRATIONS = BASE_DIR / "migrations"


def sqlite_url(path) -> str:
    return f"sqlite:///{path}"


def migrate(url: str) -> None:
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        upgrade(revision="heads")


@pytest.fixture
def newer_migrations(tmp_path):
    """This project's migrations plus one more revision, as the next image would ship them."""
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    heads = tuple(ScriptDirectory(str(MIGRATIONS)).get_heads())
    (folder / "versions" / "0000next_add_colour.py").write_text(
        f'revision = "0000next"\ndown_revision = {heads!r}\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
    )
    return folder


def test_migrated_database_is_current(app, database_url):
    """The session database, upgraded by the real migrations, needs no waiting."""
    assert schema_is_current(database_url, MIGRATIONS)


def test_empty_database_is_not_current(tmp_path):
    """A database the migration Job has not touched yet is not current."""
    assert not schema_is_current(sqlite_url(tmp_path / "empty.db"), MIGRATIONS)


def test_database_behind_this_image_is_not_current(tmp_path, newer_migrations):
    """A new image's pods wait while the database lacks the image's newest revision."""
    url = sqlite_url(tmp_path / "old.db")
    migrate(url)
    assert schema_is_current(url, MIGRATIONS)
    assert not schema_is_current(url, newer_migrations)


def test_revision_unknown_to_this_image_counts_as_current(tmp_path):
    """An old pod restarting after a newer version migrated starts instead of waiting forever."""
    url = sqlite_url(tmp_path / "newer.db")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        connection.execute(text("INSERT INTO alembic_version VALUES ('ffffffffffff')"))
    engine.dispose()
    assert schema_is_current(url, MIGRATIONS)


def test_wait_returns_once_the_migration_ran(tmp_path):
    """The wait ends soon after another process (the Job) applies the migrations."""
    url = sqlite_url(tmp_path / "late.db")
    job = threading.Timer(0.3, migrate, args=(url,))
    job.start()
    try:
        started = time.monotonic()
        assert wait_for_migrations(url, MIGRATIONS, timeout=20, interval=0.05)
        assert time.monotonic() - started >= 0.3
    finally:
        job.join()


def test_wait_gives_up_after_the_timeout(tmp_path):
    """Without a migration the wait fails after the timeout, so the pod restarts visibly."""
    started = time.monotonic()
    assert not wait_for_migrations(sqlite_url(tmp_path / "never.db"), MIGRATIONS, timeout=0.3, interval=0.05)
    assert 0.3 <= time.monotonic() - started < 5


def test_unreachable_database_is_waited_for_not_fatal(tmp_path, caplog):
    """A database that cannot be reached yet is retried and reported, not a crash."""
    url = sqlite_url(tmp_path / "missing-folder" / "x.db")
    with caplog.at_level("INFO", logger="migration_wait"):
        assert not wait_for_migrations(url, MIGRATIONS, timeout=0.2, interval=0.05)
    assert "not reachable" in caplog.text


def test_command_exit_code_says_whether_the_schema_is_current(tmp_path, monkeypatch):
    """`python -m common_utils.migration_wait` exits 0 on a current schema and 1 on timeout."""
    url = sqlite_url(tmp_path / "cli.db")
    monkeypatch.setenv("DATABASE_URL", url)
    assert migration_wait.main(["--timeout", "0"]) == 1
    migrate(url)
    assert migration_wait.main(["--timeout", "0"]) == 0

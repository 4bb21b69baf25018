"""Wait until the database has this code's migrations: the pods' init container on Kubernetes.

The migration Job (`flask db upgrade`) and the Deployments are applied together, so
nothing orders them by itself. Each pod first runs `python -m common_utils.migration_wait`,
which returns once every Alembic head shipped in this image is applied. So the pods of
a new version start after its migrations ran while the old pods keep serving, and an
old pod restarting after a newer version migrated (a revision this image does not
know) starts at once instead of waiting for a schema it will never see.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError

from common_utils.json_logging import configure_json_logging

logger = logging.getLogger("migration_wait")


def schema_is_current(database_url: str, migrations_dir: Path) -> bool:
    """True when every head of `migrations_dir` is applied to the database (or superseded)."""
    script = ScriptDirectory(str(migrations_dir))
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_heads()
    finally:
        engine.dispose()
    applied: set[str] = set()
    for revision in current:
        try:
            applied.update(step.revision for step in script.iterate_revisions(revision, "base"))
        except RevisionError:
            logger.warning(
                "the database is at revision %s, which this code does not know: "
                "a newer version migrated it, so there is nothing to wait for",
                revision,
            )
            return True
    return set(script.get_heads()) <= applied


def wait_for_migrations(
    database_url: str, migrations_dir: Path, timeout: float, interval: float = 2.0
) -> bool:
    """Poll until the schema is current (True) or `timeout` seconds passed (False).

    An unreachable database is waited for like missing migrations: the database
    may start after the pod.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if schema_is_current(database_url, migrations_dir):
                logger.info("the database schema is current")
                return True
            reason = "migrations are not applied yet"
        except SQLAlchemyError as error:
            detail = str(getattr(error, "orig", None) or error).splitlines()[0]
            reason = f"the database is not reachable: {detail}"
        if time.monotonic() >= deadline:
            logger.error("gave up after %s s: %s", timeout, reason)
            return False
        logger.info("waiting: %s", reason)
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    from config import BASE_DIR, Config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait (default 900)")
    parser.add_argument("--interval", type=float, default=2, help="seconds between checks (default 2)")
    args = parser.parse_args(argv)
    config = Config()
    configure_json_logging(config.LOG_LEVEL)
    current = wait_for_migrations(
        config.SQLALCHEMY_DATABASE_URI, BASE_DIR / "migrations", args.timeout, args.interval
    )
    return 0 if current else 1


if __name__ == "__main__":
    sys.exit(main())

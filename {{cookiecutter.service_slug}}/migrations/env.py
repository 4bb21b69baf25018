"""Alembic environment: migrations run with the app's engine and models.

The app's own JSON logging is kept (no fileConfig), and an autogenerate run
that finds no change writes no empty migration file.

A new migration revises every head: the template's migrations are one branch
per feature (a feature turned on by a template update starts a branch beside
the team's own migrations), so `flask db migrate` joins them instead of
failing with "Multiple heads are present".
"""

import logging

from alembic import context
from flask import current_app

logger = logging.getLogger("alembic.env")
migrate = current_app.extensions["migrate"]
target_metadata = migrate.db.metadata


def write_revision(context, revision, directives):
    if getattr(context.config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        logger.info("No changes in the models; no migration written.")
        return
    directives[0].head = "heads"


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (`flask db upgrade --sql`)."""
    url = migrate.db.engine.url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, **migrate.configure_args)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with migrate.db.engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            process_revision_directives=write_revision,
            **migrate.configure_args,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

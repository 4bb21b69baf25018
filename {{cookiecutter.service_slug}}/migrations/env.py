"""Alembic environment: migrations run with the app's engine and models.

The app's own JSON logging is kept (no fileConfig), and an autogenerate run
that finds no change writes no empty migration file.
"""

import logging

from alembic import context
from flask import current_app

logger = logging.getLogger("alembic.env")
migrate = current_app.extensions["migrate"]
target_metadata = migrate.db.metadata


def skip_empty_autogenerate(context, revision, directives):
    if getattr(context.config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        logger.info("No changes in the models; no migration written.")


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
            process_revision_directives=skip_empty_autogenerate,
            **migrate.configure_args,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

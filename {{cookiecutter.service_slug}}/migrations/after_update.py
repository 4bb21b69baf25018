"""Keep the migrations consistent after a template update: `make update` runs this after `cruft update`.

An applied migration must never disappear or change: the database records its
revision and Alembic must find it. The template's migrations have fixed
revisions (one per feature that has tables), so an update only ever adds or
removes whole files. This script deals with both:

- A migration the update deleted (its feature was turned off) is put back from
  git, and a new migration undoes it: upgrading drops that feature's tables,
  with their rows. Review it before committing; it is yours from now on.
- When the update added a migration beside the service's own ones (a feature
  turned on after the team wrote migrations), a merge revision joins the
  heads, so a plain `flask db upgrade` or `flask db downgrade -1` keeps working.

Then it lists the files the update could not merge and fails until they are
resolved. It needs git and the migrations, not the database or the app.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent
PROJECT = MIGRATIONS.parent

REMOVAL_TEMPLATE = '''\
"""Remove what {removed} created: its feature was turned off by a template update.

Revision ID: {revision}
Revises: {revises}
Create Date: written by migrations/after_update.py

{removed_file} stays, because databases have applied it; this migration undoes
it. Upgrading DROPS its tables and every row in them; downgrading creates them
again, empty. To keep the data, copy it elsewhere first.
"""

from alembic import context

revision = "{revision}"
down_revision = {down_revision!r}
branch_labels = None
depends_on = None

REMOVED = "{removed}"


def upgrade():
    context.script.get_revision(REMOVED).module.downgrade()


def downgrade():
    context.script.get_revision(REMOVED).module.upgrade()
'''


def git(*args: str) -> list[str]:
    result = subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, check=True)  # noqa: S603, S607
    return [line for line in result.stdout.splitlines() if line]


def alembic_config() -> Config:
    config = Config(str(MIGRATIONS / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def restore_deleted_migrations() -> list[str]:
    """Put back every migration file the update deleted; return their revisions, newest first."""
    deleted = git("diff", "--name-only", "--diff-filter=D", "HEAD", "--", "migrations/versions")
    if not deleted:
        return []
    git("checkout", "HEAD", "--", *deleted)
    paths = {(PROJECT / name).resolve() for name in deleted}
    script = ScriptDirectory.from_config(alembic_config())
    return [step.revision for step in script.walk_revisions() if Path(step.path).resolve() in paths]


def write_removal(removed: str) -> Path:
    """A migration after every current head that undoes `removed`."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = tuple(sorted(script.get_heads()))
    revision = uuid.uuid4().hex[:12]
    removed_file = Path(script.get_revision(removed).path).relative_to(PROJECT)
    # Named like `flask db migrate` names files (alembic.ini's file_template).
    path = MIGRATIONS / "versions" / f"{datetime.now(UTC):%Y%m%d}_{revision}_remove_{removed}.py"
    path.write_text(
        REMOVAL_TEMPLATE.format(
            removed=removed,
            removed_file=removed_file.as_posix(),
            revision=revision,
            revises=", ".join(heads),
            down_revision=heads[0] if len(heads) == 1 else heads,
        ),
        encoding="utf-8",
    )
    return path


def merge_heads() -> bool:
    """Join several heads with a merge revision; False when there is one head."""
    config = alembic_config()
    if len(ScriptDirectory.from_config(config).get_heads()) < 2:
        return False
    command.merge(config, "heads", message="merge the template's and the service's migrations")
    return True


def unresolved_files() -> list[str]:
    conflicted = git("diff", "--name-only", "--diff-filter=U")
    rejected = git("ls-files", "--others", "--exclude-standard", "--", "*.rej")
    return sorted(set(conflicted) | set(rejected))


def main() -> int:
    try:
        git("rev-parse", "--verify", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        print(
            "This needs the service in a git repository with a commit from before the update "
            "(to put back a migration the update deleted).",
            file=sys.stderr,
        )
        return 1
    for removed in restore_deleted_migrations():
        path = write_removal(removed)
        print(f"Kept {removed} (applied migrations stay) and wrote {path.relative_to(PROJECT)}: review it.")
    if merge_heads():
        print("The update added a migration branch; a merge revision now joins the heads.")
    unresolved = unresolved_files()
    if unresolved:
        print("The update conflicts with your changes in these files:", file=sys.stderr)
        for name in unresolved:
            print(f"  {name}", file=sys.stderr)
        print(
            "Resolve each (edit the <<<<<<< ======= >>>>>>> blocks, or apply a .rej file's hunks "
            "by hand and delete it), then `git add` them.",
            file=sys.stderr,
        )
        return 1
    print("Next: review `git diff HEAD`, run `make check-migrations` and `make test`, then commit.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

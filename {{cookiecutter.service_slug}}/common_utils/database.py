"""The SQLAlchemy extension every model is declared on.

It lives here rather than in app/extensions.py so that common_utils modules
with tables of their own (the outbox) can declare them without importing
the app package: `app` uses `common_utils`, never the reverse.
"""

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData

# Deterministic constraint names, so migrations can refer to (and drop) them
# on every database, and `flask db check` compares like with like.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

db = SQLAlchemy(metadata=MetaData(naming_convention=NAMING_CONVENTION))

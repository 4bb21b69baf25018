"""The row an event's payload is built from: exactly as its transaction wrote it.

After the flush, `as_written` gives a detached, columns-only copy of the
object with the values its row holds until commit. Reading the row back
costs a statement per event (a versioned PATCH sends 5 with it, 4
without), so the copy is taken from memory when that is provably the
same row:

- the row cannot hold anything this transaction did not write or load: it
  was just inserted, or the model has a `version_id_col` and its UPDATE
  matched the version that was loaded (any other writer bumps the version,
  as optimistic concurrency requires of every writer: the ORM always does);
- every column is loaded (a column set by a server default, a trigger
  declared as `FetchedValue` or a deferred load is expired or missing);
- every value is stored and given back unchanged (`exact_check`): no
  rounding, padding, time zone change or value mutable in place.

Otherwise the row is read back by primary key on the flush's connection.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Dialect, and_, bindparam, inspect, select
from sqlalchemy import types as sqltypes
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.orm.attributes import instance_dict

#: A column attribute that is not loaded (expired, deferred or never set).
MISSING = object()


def primary_key_clause(mapper: Mapper, identity: tuple) -> Any:
    """WHERE the mapper's primary key columns equal `identity` (composite keys too)."""
    return and_(*(column == value for column, value in zip(mapper.primary_key, identity, strict=True)))


@functools.cache
def read_back(mapper: Mapper) -> tuple[list, Any]:
    """The mapper's column attributes and the SELECT of their row by primary key (bound as pk_0, pk_1...).

    Built once per mapper: constructing and compiling it again for every
    event cost more than running it.
    """
    attributes = list(mapper.column_attrs)
    statement = (
        select(*(attribute.columns[0] for attribute in attributes))
        .select_from(mapper.persist_selectable)
        .where(primary_key_clause(mapper, [bindparam(f"pk_{index}") for index in range(len(mapper.primary_key))]))
    )
    return attributes, statement


def exact_check(column_type: sqltypes.TypeEngine, dialect: Dialect) -> Callable[[Any], bool]:
    """A test of whether a column of `column_type` gives a (non-NULL) value back exactly as written.

    True only for immutable values of types the database keeps verbatim:
    integers, booleans, UUIDs, text (not CHAR, which pads, nor Enum),
    decimals already at the column's scale (not on SQLite, which keeps them
    as floats), and timestamps with their microseconds (aware exactly when
    a PostgreSQL column has a time zone; naive elsewhere, in DATETIME(6) on
    MySQL). A TypeDecorator's own conversion must give the value back too.
    Anything else (floats, JSON, arrays, ...) is read back. On MySQL this
    takes its default strict mode, in which a value that does not fit is an
    error: a server without STRICT_TRANS_TABLES truncates or clamps silently.
    """
    if isinstance(column_type, sqltypes.TypeDecorator):
        decorator, stored_check = column_type, exact_check(column_type.load_dialect_impl(dialect), dialect)

        def through_decorator(value: Any) -> bool:
            try:
                stored = decorator.process_bind_param(value, dialect)
                loaded = decorator.process_result_value(stored, dialect)
            except Exception:  # a conversion that only runs on the driver's values: read the row back
                return False
            if type(loaded) is not type(value) or loaded != value:
                return False
            if isinstance(value, datetime) and loaded.utcoffset() != value.utcoffset():
                return False
            return stored is None or stored_check(stored)

        return through_decorator
    # Exact types: True is an int, but comes back from an integer column as 1.
    if isinstance(column_type, sqltypes.Boolean):
        return lambda value: type(value) is bool
    if isinstance(column_type, sqltypes.Integer):
        return lambda value: type(value) is int
    if isinstance(column_type, sqltypes.Uuid):
        return lambda value: type(value) is uuid.UUID
    if isinstance(column_type, sqltypes.String) and not isinstance(column_type, sqltypes.CHAR | sqltypes.Enum):
        return lambda value: type(value) is str
    if (
        isinstance(column_type, sqltypes.Numeric)
        and not isinstance(column_type, sqltypes.Float)
        and column_type.scale is not None
        and dialect.name != "sqlite"
    ):
        exponent = -column_type.scale
        return lambda value: type(value) is Decimal and value.as_tuple().exponent == exponent
    if isinstance(column_type, sqltypes.DateTime):
        if dialect.name == "postgresql":
            aware = bool(column_type.timezone)
            return lambda value: type(value) is datetime and (value.tzinfo is not None) is aware
        # Neither keeps a time zone; MySQL keeps microseconds only in DATETIME(6).
        if dialect.name == "sqlite" or getattr(column_type, "fsp", None) == 6:
            return lambda value: type(value) is datetime and value.tzinfo is None
    return lambda value: False


@functools.lru_cache(maxsize=256)
def exact_checks(mapper: Mapper, dialect: Dialect) -> list[tuple[str, Callable[[Any], bool]]]:
    """Each column attribute's key and `exact_check`, built once per mapper and database."""
    attributes, _ = read_back(mapper)
    return [(attribute.key, exact_check(attribute.columns[0].type, dialect)) for attribute in attributes]


def held_values(state: InstanceState, dialect: Dialect) -> list | None:
    """The object's column values when each is loaded and stored as is, else None."""
    values = []
    loaded = state.dict
    for key, check in exact_checks(state.mapper, dialect):
        value = loaded.get(key, MISSING)
        if value is MISSING or (value is not None and not check(value)):
            return None
        values.append(value)
    return values


def as_written(connection: Connection, obj: Any, inserted: bool) -> Any:
    """A detached, columns-only copy of `obj` as this transaction has just written its row.

    Called after the flush, on the flush's connection. Read back, the row
    is exactly the row that commits: the INSERT or UPDATE holds its lock
    until commit, a transaction always sees its own writes, and an UPDATE
    writes on the newest committed row (PostgreSQL and MySQL alike).
    `inserted` says the flush inserted the row rather than updated it.
    """
    state = inspect(obj)
    mapper = state.mapper
    attributes, statement = read_back(mapper)
    # See the module; a driver that cannot count updated rows skips SQLAlchemy's version check.
    proven = inserted or (mapper.version_id_col is not None and connection.dialect.supports_sane_rowcount)
    values = held_values(state, connection.dialect) if proven else None
    if values is None:
        identity = mapper.primary_key_from_instance(obj)
        values = connection.execute(statement, {f"pk_{index}": value for index, value in enumerate(identity)}).one()
    copy = mapper.class_manager.new_instance()
    # As the ORM loads a row: values in the instance's dict are its committed state.
    instance_dict(copy).update(zip((attribute.key for attribute in attributes), values, strict=True))
    return copy

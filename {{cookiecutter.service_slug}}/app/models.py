"""The service's example aggregate, {{ cookiecutter.__resource_class }}.

Rename or extend it freely: change the model, then run
`flask db migrate -m "..."` and review the generated migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import DateTime, Numeric, String, Text, TypeDecorator, text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
{%- if cookiecutter.outbox != "none" %}
from common_utils.outbox import OutboxMixin
{%- endif %}

STATUSES = ("draft", "active", "archived")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL keeps the offset; SQLite and MySQL do not, so values are
    stored as naive UTC there and given their UTC zone back when loaded. On
    MySQL and MariaDB the column is DATETIME(6): a plain DATETIME drops the
    microseconds.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware one")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class {{ cookiecutter.__resource_class }}({% if cookiecutter.outbox != "none" %}OutboxMixin, {% endif %}db.Model):
    __tablename__ = "{{ cookiecutter.resource_plural }}"
    # Ids are never reused, even the highest one after a delete: events and
    # caches refer to them. PostgreSQL sequences and MySQL AUTO_INCREMENT never
    # reuse; SQLite needs AUTOINCREMENT for that.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(default=0)
    unit_price: Mapped[Decimal] = mapped_column(Numeric(10, 2), default=Decimal("0.00"))
    status: Mapped[str] = mapped_column(String(20), default="draft", index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Optimistic concurrency: every UPDATE says "WHERE version = <the version
    # read>" and bumps it, so a write based on stale state changes no row and
    # SQLAlchemy raises StaleDataError (the API answers 409) instead of
    # silently overwriting a concurrent change.
    version: Mapped[int] = mapped_column(server_default=text("1"))

    __mapper_args__ = {"version_id_col": version}

    def to_dict(self) -> dict:
        """A JSON-ready snapshot, as the API returns it."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "quantity": self.quantity,
            "unit_price": str(self.unit_price),
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "version": self.version,
        }

    def __repr__(self) -> str:
        return f"<{{ cookiecutter.__resource_class }} {self.id} {self.name!r}>"

"""Request and response schemas; flask-smorest validates with them and documents them."""

import re
from decimal import Decimal

from marshmallow import Schema, fields, validate

from app.models import STATUSES

#: An amount of money as the API accepts it: up to eight digits before the point
#: (no sign, no leading zero) and up to two after it, as NUMERIC(10, 2) stores it.
MONEY_PATTERN = r"^(0|[1-9][0-9]{0,7})(\.[0-9]{1,2})?$"


class Money(fields.Decimal):
    """An exact amount that travels as a JSON string ("9.99"), never as a JSON number.

    The contract is MONEY_PATTERN, enforced here and published in the OpenAPI
    document. Anything else is refused (a 422 naming the field), never
    rounded: "12.345" is an error, not 12.34; "1e2", " 1.00" and "-1" are
    errors; a JSON number is refused because a float may have lost cents
    before the service sees it. An accepted amount is returned with exactly
    two decimals ("12.3" is stored and shown as "12.30"). create_app
    documents the field as an OpenAPI string.
    """

    default_error_messages = {
        "invalid_amount": "Not a valid amount: send a string with at most 8 digits before the "
        'point and 2 after it, without sign, spaces or exponent, like "9.99".',
    }
    # fullmatch on the pattern without its anchors: in Python "$" also matches
    # before a trailing newline, which the JSON Schema pattern does not allow.
    regex = re.compile(MONEY_PATTERN.removeprefix("^").removesuffix("$"))

    def __init__(self, **kwargs):
        metadata = {"pattern": MONEY_PATTERN, **kwargs.pop("metadata", {})}
        super().__init__(places=2, as_string=True, metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs) -> Decimal:
        if not isinstance(value, str) or not self.regex.fullmatch(value):
            raise self.make_error("invalid_amount")
        return super()._deserialize(value, attr, data, **kwargs)


#: What Text publishes: no NUL character. (Lone surrogates are refused too; JSON Schema
#: strings cannot hold them, so no client that follows the document sends one.)
TEXT_PATTERN = r"^[^\u0000]*$"
SURROGATES = re.compile(r"[\ud800-\udfff]")


class Text(fields.String):
    """Text any database can store: no NUL character and no lone surrogate.

    JSON can carry both (as \\u escapes), but PostgreSQL's text refuses
    NUL and no database can encode a lone surrogate as UTF-8: without this
    check they reach the database and fail there as a 500. They are refused
    here as a 422 naming the field, on every database, so the API's contract
    does not depend on the one behind it.
    """

    default_error_messages = {
        "unstorable": "Not valid text: it contains the NUL character or a lone surrogate.",
    }

    def __init__(self, **kwargs):
        metadata = {"pattern": TEXT_PATTERN, **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text or SURROGATES.search(text):
            raise self.make_error("unstorable")
        return text


class {{ cookiecutter.__resource_class }}Schema(Schema):
    """A {{ cookiecutter.resource_name.replace('_', ' ') }} as the API shows it and accepts it."""

    id = fields.Integer(dump_only=True)
    name = Text(required=True, validate=validate.Length(min=1, max=120))
    description = Text(allow_none=True, validate=validate.Length(max=10_000))
    quantity = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=1_000_000_000)
    )
    unit_price = Money(required=True, metadata={"example": "9.99"})
    status = fields.String(load_default="draft", validate=validate.OneOf(STATUSES))
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)
    version = fields.Integer(
        dump_only=True,
        metadata={"description": "Bumped by every change; the ETag header carries it too."},
    )


class {{ cookiecutter.__resource_class }}UpdateSchema({{ cookiecutter.__resource_class }}Schema):
    """The fields of a partial update (PATCH): any subset, same rules.

    status has no default here: a field that is not sent is not changed, and a
    documented default would make generated clients send it.
    """

    status = fields.String(validate=validate.OneOf(STATUSES))

    def __init__(self, **kwargs):
        super().__init__(partial=True, **kwargs)


class PaginationQuerySchema(Schema):
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))
    page_size = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class {{ cookiecutter.__resource_class }}PageSchema(Schema):
    items = fields.List(fields.Nested({{ cookiecutter.__resource_class }}Schema), required=True)
    page = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    total = fields.Integer(required=True)
    pages = fields.Integer(required=True)

"""Request and response schemas; flask-smorest validates with them and documents them."""

from decimal import Decimal

from marshmallow import Schema, fields, validate

from app.models import STATUSES


class DecimalString(fields.Decimal):
    """A decimal that travels as a JSON string ("9.99"), so no precision is lost on the way.

    create_app documents it as an OpenAPI string: a plain Decimal field would
    be documented as a number, which is not what clients receive.
    """

    def __init__(self, **kwargs):
        super().__init__(as_string=True, **kwargs)


class {{ cookiecutter.__resource_class }}Schema(Schema):
    """A {{ cookiecutter.resource_name.replace('_', ' ') }} as the API shows it and accepts it."""

    id = fields.Integer(dump_only=True)
    name = fields.String(required=True, validate=validate.Length(min=1, max=120))
    description = fields.String(allow_none=True, validate=validate.Length(max=10_000))
    quantity = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=1_000_000_000)
    )
    unit_price = DecimalString(
        required=True,
        places=2,
        allow_nan=False,
        validate=validate.Range(min=Decimal("0"), max=Decimal("99999999.99")),
        metadata={"pattern": r"^[0-9]{1,8}(\.[0-9]{1,2})?$", "example": "9.99"},
    )
    status = fields.String(load_default="draft", validate=validate.OneOf(STATUSES))
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)


class {{ cookiecutter.__resource_class }}UpdateSchema({{ cookiecutter.__resource_class }}Schema):
    """The fields of a partial update (PATCH): any subset, same rules."""

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

"""The {{ cookiecutter.resource_plural.replace('_', ' ') }} API: list, create, read, update and delete.

The views are attached to whichever blueprint serves the API, so the same
code can be mounted once per API version. flask-smorest validates every
request body and query string with the schemas and builds the OpenAPI
document from these decorators: each operation has a readable operationId
(list_{{ cookiecutter.resource_plural }}, create_{{ cookiecutter.resource_name }}, ...) and documents every error status it can
answer with the error body's schema, so a client generated from the
document gets named functions and typed errors.

Writes are optimistic: every {{ cookiecutter.resource_name.replace('_', ' ') }} has a `version` (the model's
version_id_col), GET answers it as the `ETag`, PUT, PATCH and DELETE honour
`If-Match` (412 when it names an older version), and a write that loses a
race with another one is a 409, never a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from math import ceil

from flask import request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app.errors import ErrorResponseSchema
from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from app.schemas import (
{%- set resource_class = cookiecutter.__resource_class %}
{%- for name in [resource_class ~ "PageSchema", resource_class ~ "Schema", resource_class ~ "UpdateSchema", "PaginationQuerySchema"] | sort %}
    {{ name }},
{%- endfor %}
)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Ids are 32-bit on every database; a bigger one can only be unknown.
ID_RULE = "<int(max=2147483647):item_id>"

SINGULAR = "{{ cookiecutter.resource_name.replace('_', ' ') }}"
#: Why each error status can happen; every one is answered with ErrorResponseSchema.
ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON (`malformed_json`).",
    404: f"No {SINGULAR} has this id (`not_found`).",
    409: f"Another {SINGULAR} already has this name, or another request changed or deleted "
    f"this {SINGULAR} while this one was writing it (`conflict`): read it again and retry.",
    412: f"The request's If-Match header does not name the {SINGULAR}'s current ETag "
    "(`precondition_failed`): another request changed it since it was read; read it again and retry.",
    413: "The body is larger than MAX_CONTENT_LENGTH (`payload_too_large`).",
    415: "The body is not sent as application/json (`unsupported_media_type`).",
    429: "Too many requests from this client; retry after Retry-After seconds (`rate_limited`).",
    500: "A bug in the service; its log has the details under the request id (`internal_error`).",
}
#: Errors any operation can answer, whatever it is sent.
ANY_REQUEST_ERRORS = [{% if cookiecutter.use_rate_limiting %}429, {% endif %}500]
#: Errors of a write with a body, besides 422 (documented with the body's schema).
WRITE_ERRORS = (400, 409, 413, 415)
#: Errors of a write to one existing {{ cookiecutter.resource_name.replace('_', ' ') }} (it may have changed since it was read).
ITEM_WRITE_ERRORS = (404, 409, 412)

#: The conditional-write header of PUT, PATCH and DELETE, declared so typed clients offer it.
IF_MATCH_PARAMETER = {
    "in": "header",
    "name": "If-Match",
    "required": False,
    "description": f"The ETag of the {SINGULAR} as last read: the write happens only if it is still "
    "current (412 otherwise). Without it the write goes ahead whatever changed since.",
    "schema": {"type": "string"},
}
ETAG_HEADER = {
    "ETag": {
        "description": f"The {SINGULAR}'s version: send it back as If-Match to change it only if "
        "nobody else has since.",
        "schema": {"type": "string"},
    }
}


def require_json_body() -> None:
    """Refuse a write whose body is not declared as JSON (415, not a confusing 422)."""
    if request.method in BODY_METHODS and not request.is_json:
        abort(
            415,
            message="Send the request body as JSON (Content-Type: application/json).",
            details={"content_type": request.content_type or ""},
        )


def get_or_404(item_id: int) -> {{ cookiecutter.__resource_class }}:
    item = db.session.get({{ cookiecutter.__resource_class }}, item_id)
    if item is None:
        abort(
            404,
            message=f"{{ cookiecutter.__resource_class }} {item_id} does not exist.",
            details={"id": item_id},
        )
    return item


def etag(item: {{ cookiecutter.__resource_class }}) -> str:
    """The strong ETag of a {{ cookiecutter.resource_name.replace('_', ' ') }}: its version, which every write bumps."""
    return f'"{item.version}"'


def check_if_match(item: {{ cookiecutter.__resource_class }}) -> None:
    """Refuse the write (412) when If-Match names a version that is no longer current.

    Strong comparison (RFC 9110): a weak tag never matches, `*` matches any
    existing {{ cookiecutter.resource_name.replace('_', ' ') }}. Without If-Match the write goes ahead.
    """
    if request.if_match and not request.if_match.contains(str(item.version)):
        abort_precondition_failed(item.id)


def abort_precondition_failed(item_id: int) -> None:
    abort(
        412,
        message=f"{{ cookiecutter.__resource_class }} {item_id} has changed since the version named in If-Match.",
        details={"id": item_id, "if_match": request.headers.get("If-Match", "")},
    )


def commit_or_409(item: {{ cookiecutter.__resource_class }}) -> None:
    """Commit, turning a unique-name clash or a lost race into a 409 instead of a 500.

    The UPDATE (or DELETE) only matches the row at the version this request
    read; if another request wrote it in between, nothing matches and
    SQLAlchemy raises StaleDataError. A request that sent If-Match gets 412
    then, as if it had arrived a moment later.
    """
    item_id = item.id
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        abort(
            409,
            message="Another {{ cookiecutter.resource_name.replace('_', ' ') }} already has this name.",
            details={"name": ["must be unique"]},
        )
    except StaleDataError:
        db.session.rollback()
        if request.if_match:
            abort_precondition_failed(item_id)
        abort(
            409,
            message=f"{{ cookiecutter.__resource_class }} {item_id} was changed or deleted by another request "
            "while this one was writing it; read it again and retry.",
            details={"id": item_id},
        )


def documented(blueprint: Blueprint, operation_id: str, *errors: int) -> Callable:
    """Name a view's operation and document the errors it can answer, besides ANY_REQUEST_ERRORS.

    An operation that can answer 412 is a conditional write: it also declares If-Match.
    """
    doc = {"operationId": operation_id}
    if 412 in errors:
        doc["parameters"] = [IF_MATCH_PARAMETER]

    def decorate(view: Callable) -> Callable:
        for status in sorted({*errors, *ANY_REQUEST_ERRORS}, reverse=True):
            view = blueprint.alt_response(
                status, schema=ErrorResponseSchema, description=ERROR_DESCRIPTIONS[status]
            )(view)
        return blueprint.doc(**doc)(view)

    return decorate


def register_{{ cookiecutter.resource_name }}_routes(
    blueprint: Blueprint, view_decorators: Iterable[Callable] = (), operation_suffix: str = ""
) -> None:
    """Attach the {{ cookiecutter.resource_plural.replace('_', ' ') }} endpoints to `blueprint`.

    `view_decorators` wrap every view, for example to mark them as served by
    the latest API version. operationIds must be unique in the document: when
    two blueprints serve these views (two API versions), give one of them an
    `operation_suffix` ("_v1" makes list_{{ cookiecutter.resource_plural }}_v1).
    """
    blueprint.before_request(require_json_body)

    def operation(name: str, *errors: int) -> Callable:
        return documented(blueprint, name + operation_suffix, *errors)

    @blueprint.route("/{{ cookiecutter.resource_plural.replace('_', '-') }}")
    class {{ cookiecutter.__resource_class }}Collection(MethodView):
        decorators = list(view_decorators)

        @operation("list_{{ cookiecutter.resource_plural }}")
        @blueprint.arguments(PaginationQuerySchema, location="query")
        @blueprint.response(200, {{ cookiecutter.__resource_class }}PageSchema)
        def get(self, pagination):
            """List {{ cookiecutter.resource_plural.replace('_', ' ') }}, newest first."""
            page, page_size = pagination["page"], pagination["page_size"]
            total = db.session.scalar(select(func.count()).select_from({{ cookiecutter.__resource_class }}))
            items = db.session.scalars(
                select({{ cookiecutter.__resource_class }})
                .order_by({{ cookiecutter.__resource_class }}.id.desc())
                .limit(page_size)
                .offset((page - 1) * page_size)
            ).all()
            return {
                "items": items,
                "page": page,
                "page_size": page_size,
                "total": total,
                "pages": ceil(total / page_size),
            }

        @operation("create_{{ cookiecutter.resource_name }}", *WRITE_ERRORS)
        @blueprint.arguments({{ cookiecutter.__resource_class }}Schema)
        @blueprint.response(201, {{ cookiecutter.__resource_class }}Schema, headers=ETAG_HEADER)
        def post(self, data):
            """Create a {{ cookiecutter.resource_name.replace('_', ' ') }}."""
            item = {{ cookiecutter.__resource_class }}(**data)
            db.session.add(item)
            commit_or_409(item)
            location = url_for(f"{request.blueprint}.{{ cookiecutter.__resource_class }}Item", item_id=item.id)
            return item, 201, {"Location": location, "ETag": etag(item)}

    @blueprint.route(f"/{{ cookiecutter.resource_plural.replace('_', '-') }}/{ID_RULE}")
    class {{ cookiecutter.__resource_class }}Item(MethodView):
        decorators = list(view_decorators)

        @operation("get_{{ cookiecutter.resource_name }}", 404)
        @blueprint.response(200, {{ cookiecutter.__resource_class }}Schema, headers=ETAG_HEADER)
        def get(self, item_id):
            """Get one {{ cookiecutter.resource_name.replace('_', ' ') }}."""
            item = get_or_404(item_id)
            return item, 200, {"ETag": etag(item)}

        @operation("replace_{{ cookiecutter.resource_name }}", *ITEM_WRITE_ERRORS, *WRITE_ERRORS)
        @blueprint.arguments({{ cookiecutter.__resource_class }}Schema)
        @blueprint.response(200, {{ cookiecutter.__resource_class }}Schema, headers=ETAG_HEADER)
        def put(self, data, item_id):
            """Replace a {{ cookiecutter.resource_name.replace('_', ' ') }}; omitted optional fields are reset."""
            item = get_or_404(item_id)
            check_if_match(item)
            data.setdefault("description", None)
            for field, value in data.items():
                setattr(item, field, value)
            commit_or_409(item)
            return item, 200, {"ETag": etag(item)}

        @operation("update_{{ cookiecutter.resource_name }}", *ITEM_WRITE_ERRORS, *WRITE_ERRORS)
        @blueprint.arguments({{ cookiecutter.__resource_class }}UpdateSchema)
        @blueprint.response(200, {{ cookiecutter.__resource_class }}Schema, headers=ETAG_HEADER)
        def patch(self, data, item_id):
            """Change some fields of a {{ cookiecutter.resource_name.replace('_', ' ') }}."""
            item = get_or_404(item_id)
            check_if_match(item)
            for field, value in data.items():
                setattr(item, field, value)
            commit_or_409(item)
            return item, 200, {"ETag": etag(item)}

        @operation("delete_{{ cookiecutter.resource_name }}", *ITEM_WRITE_ERRORS)
        @blueprint.response(204)
        def delete(self, item_id):
            """Delete a {{ cookiecutter.resource_name.replace('_', ' ') }}."""
            item = get_or_404(item_id)
            check_if_match(item)
            db.session.delete(item)
            commit_or_409(item)

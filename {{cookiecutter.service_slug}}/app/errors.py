"""Every error leaves the service as JSON: {"error": {"code", "message", "details"}}.

Clients can switch on `code` (stable, snake_case), show `message` to people
and find field-level problems in `details`. No error is ever an HTML page,
and bad input is always a 4xx: only a bug in the service gives a 500.

A 5xx tells the caller its code and a generic message only: what went wrong
inside (a host name, an address, an exception's text) goes to the log, where
the request id joins it to the answer, never into the response.
"""

from __future__ import annotations

import logging

from flask import Flask, Response
from marshmallow import Schema, ValidationError, fields
from werkzeug.exceptions import HTTPException, InternalServerError

from common_utils.json_errors import ERROR_CODES, error_response

logger = logging.getLogger(__name__)

# What a caller is told about a server-side failure, whatever the exception said.
GENERIC_MESSAGES = {
    502: "A service this one depends on gave an invalid answer.",
    503: "The service is unavailable for now; try again later.",
    504: "A service this one depends on did not answer in time.",
}


class ErrorSchema(Schema):
    code = fields.String(required=True, metadata={"example": "validation_error"})
    message = fields.String(required=True)
    details = fields.Dict(required=True)


class ErrorResponseSchema(Schema):
    error = fields.Nested(ErrorSchema, required=True)


def handle_http_exception(error: HTTPException) -> Response:
    """Turn werkzeug/webargs HTTP errors into the JSON shape, keeping their headers."""
    data = getattr(error, "data", None) or {}
    details = data.get("details") or data.get("messages") or {}
    code = data.get("code")
    message = data.get("message") or error.description or "Error"
    cause = getattr(error, "exc", None)
    if isinstance(cause, ValueError) and not isinstance(cause, ValidationError):
        # webargs reports a body it could not decode as JSON this way.
        code, message = "malformed_json", "The request body is not valid JSON."
    if error.code == 422 and "message" not in data:
        message = "The request did not pass validation."
    status = error.code or 500
    if status >= 500:
        logger.warning("Answering %s %s: %s (details: %s)", status, code or ERROR_CODES.get(status), message, details)
        message = GENERIC_MESSAGES.get(status, InternalServerError.description)
        # Details of a server error can hold internals too: only the name of the
        # dependency at fault, which this service's own errors put there, is kept.
        details = {key: value for key, value in details.items() if key == "service"}
    body, status = error_response(status, message, details, code)
    response = error.get_response()
    response.set_data(body.get_data())
    response.content_type = "application/json"
    response.status_code = status
    return response


def handle_unexpected_error(error: Exception):
    """A bug: log it with its traceback and answer a generic 500."""
    if isinstance(error, HTTPException):
        return handle_http_exception(error)
    logger.exception("Unhandled error while serving the request")
    return error_response(500, InternalServerError.description)


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected_error)

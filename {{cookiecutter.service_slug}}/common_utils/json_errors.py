"""The service's JSON error shape: {"error": {"code", "message", "details"}}.

It lives here, below the app, because the extensions in common_utils answer
with it too (a 429 from rate limiting, a 502/503/504 from the HTTP client),
and common_utils never imports app. app/errors.py turns every other 4xx/5xx
into it.
"""

from __future__ import annotations

from flask import jsonify

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_response(status: int, message: str, details: dict | None = None, code: str | None = None):
    """(response, status) in the shape above; `code` defaults to the one of `status`."""
    body = {
        "error": {
            "code": code or ERROR_CODES.get(status, "error"),
            "message": message,
            "details": details or {},
        }
    }
    return jsonify(body), status

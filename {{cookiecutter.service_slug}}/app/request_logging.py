"""Structured JSON logs, each line carrying the id of the request it belongs to.

The request id comes from the caller's X-Request-ID header when it looks
sane (so one id follows a request across services) and is generated
otherwise; it is echoed back in the response header.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, g, has_request_context, request

from common_utils.json_logging import configure_json_logging

REQUEST_ID_HEADER = "X-Request-ID"
#: The same header as WSGI names it, read straight from the environ on every request.
REQUEST_ID_ENVIRON = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_logger = logging.getLogger("access")


class RequestContextFilter(logging.Filter):
    """Adds the current request id (or null outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id") if has_request_context() else None
        return True


def configure_logging(level: str | int = "INFO") -> None:
    """Send JSON lines to stdout, each with the request id. Safe to call again (see configure_json_logging)."""
    configure_json_logging(level, RequestContextFilter())


def start_request() -> None:
    # One lookup of the request and of `g` each, as in finish_request.
    state = g._get_current_object()
    incoming = request._get_current_object().environ.get(REQUEST_ID_ENVIRON, "")
    state.request_id = incoming if VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    state.request_started = time.perf_counter()


def finish_request(response):
    # One lookup of the request and of `g` each, not one per field: this runs on every request.
    req = request._get_current_object()
    state = g._get_current_object()
    request_id = getattr(state, "request_id", "")
    started = getattr(state, "request_started", None)
    response.headers[REQUEST_ID_HEADER] = request_id
    duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
    method, path, status = req.method, req.path, response.status_code
    access_logger.info(
        "%s %s %s",
        method,
        path,
        status,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "remote_addr": req.remote_addr,
        },
    )
    return response


def init_app(app: Flask) -> None:
    configure_logging(app.config["LOG_LEVEL"])
    app.before_request(start_request)
    app.after_request(finish_request)

"""Structured JSON logs with a request id."""

import io
import json
import logging
import sys

import pytest

from app.request_logging import RequestContextFilter, configure_logging


@pytest.fixture
def log_lines():
    """Capture what the service's JSON handler writes, as parsed lines."""
    configure_logging("INFO")
    root = logging.getLogger()
    handler = next(h for h in root.handlers if getattr(h, "is_service_handler", False))
    stream = io.StringIO()
    original = handler.setStream(stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    handler.setStream(original)


def test_request_id_is_generated_and_echoed(client):
    """Without an incoming X-Request-ID the service makes one and returns it."""
    response = client.get("/health")
    assert len(response.headers["X-Request-ID"]) == 32


def test_incoming_request_id_is_kept(client):
    """A caller's X-Request-ID is reused, so one id follows the request across services."""
    response = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


def test_unsafe_request_id_is_replaced(client):
    """A request id with odd characters is not trusted (no log injection)."""
    response = client.get("/health", headers={"X-Request-ID": 'bad id "},{"level": "x'})
    assert response.headers["X-Request-ID"] != 'bad id "},{"level": "x'
    assert len(response.headers["X-Request-ID"]) == 32


def test_access_log_is_json_with_request_id(client, log_lines):
    """Every request writes one JSON access line carrying its request id and status."""
    client.get("/health", headers={"X-Request-ID": "trace-me"})
    access = [line for line in log_lines() if line["logger"] == "access"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == "trace-me"
    assert line["status"] == 200
    assert line["path"] == "/health"
    assert line["level"] == "INFO"
    assert "timestamp" in line


def test_records_outside_requests_have_null_request_id():
    """Log lines written outside a request still parse, with request_id null."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    assert RequestContextFilter().filter(record)
    assert record.request_id is None


def test_the_handler_writes_to_the_stdout_of_the_moment(monkeypatch):
    """Lines go to the current sys.stdout, not the one of configure time (pytest closes those)."""
    configure_logging("INFO")
    later = io.StringIO()
    monkeypatch.setattr(sys, "stdout", later)
    logging.getLogger("test").warning("after the swap")
    assert json.loads(later.getvalue())["message"] == "after the swap"

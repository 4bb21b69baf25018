"""Structured JSON logs with a request id."""

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from app.request_logging import RequestContextFilter, configure_logging

PROJECT = Path(__file__).resolve().parent.parent


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.mark.gunicorn
def test_gunicorn_prints_json_lines_and_one_warning_per_missing_dependency(tmp_path):
    """gunicorn's master and workers print only JSON lines; absent Consul and collector: a WARNING each, no ERROR.

    This is a first `make serve` on a laptop: nothing listens where the
    service registry and the span exporter (when the project has them) look.
    """
    port, nothing_there = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PROMETHEUS_MULTIPROC_DIR"},
        "ENVIRONMENT": "test",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "SERVICE_PORT": str(port),
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "OUTBOX_RELAY_IN_APP": "false",  # no tables in this database: not what this test is about
        "AUTO_REGISTER_SERVICE": "true",
        "CONSUL_HOST": "127.0.0.1",
        "CONSUL_PORT": str(nothing_there),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{nothing_there}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
    process = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60  # a worker imports the whole app first: seconds on a busy machine
        while status_of(f"http://127.0.0.1:{port}/no-such-page") != 404:
            assert time.monotonic() < deadline, "gunicorn never served:\n" + "".join(lines[-20:])
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)

    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert any(r["logger"] == "gunicorn.error" and r["message"].startswith("Starting gunicorn") for r in records)
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    warnings = Counter(r["logger"] for r in records if r["level"] == "WARNING")
    assert all(count == 1 for count in warnings.values()), warnings

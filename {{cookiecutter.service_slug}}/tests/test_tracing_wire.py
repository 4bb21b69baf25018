"""Tracing over the real wire: OTLP/HTTP protobuf to a local receiver, gunicorn, no collector."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from app.extensions import tracer
from common_utils.tracing import ForkSafeBatchProcessor
from tests.otlp_receiver import OTLPReceiver, free_port, wait_for

PROJECT = Path(__file__).resolve().parent.parent
SHUTDOWN_LIMIT = 2.0


@pytest.fixture
def receiver():
    stand_in = OTLPReceiver().start()
    yield stand_in
    stand_in.stop()


def exporting_to(endpoint: str) -> dict:
    """Settings that send spans over OTLP to `endpoint` (a base URL, as in OTEL_EXPORTER_OTLP_ENDPOINT)."""
    return {
        "TRACING_ENABLED": True,
        "TRACING_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
    }


def no_collector() -> str:
    """The URL of a port nobody listens on."""
    return f"http://127.0.0.1:{free_port()}"


def test_spans_reach_an_otlp_receiver(make_app, receiver, collection_url):
    """The request's spans arrive as OTLP protobuf, with the service name and the route."""
    app = make_app(**exporting_to(receiver.endpoint))
    assert app.test_client().get(collection_url).status_code == 200

    tracer.shutdown(app)  # flushes the batch

    served = [s for s in receiver.spans if s.kind == ProtoSpan.SPAN_KIND_SERVER]
    assert [s.name for s in served] == [f"GET {collection_url}"]
    assert served[0].resource["service.name"] == app.config["SERVICE_NAME"]
    assert served[0].resource["service.version"] == app.config["SERVICE_VERSION"]
    sql = [s for s in receiver.spans if s.kind == ProtoSpan.SPAN_KIND_CLIENT]
    assert sql
    assert all(s.trace_id == served[0].trace_id for s in sql)
    assert set(receiver.content_types) == {"application/x-protobuf"}


@pytest.mark.gunicorn
def test_every_gunicorn_worker_exports(tmp_path, receiver):
    """Under gunicorn with two workers, spans arrive from both (each has its own exporter)."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "ENVIRONMENT": "test",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "SERVICE_PORT": str(port),
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "1",  # sync workers: concurrent requests must use both
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "AUTO_REGISTER_SERVICE": "false",
        "TRACING_ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_PYTHON_FLASK_EXCLUDED_URLS": "",  # trace /health too, no database needed
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/health"

    def get(_=None) -> int:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status

    try:
        wait_for(lambda: _answers(get), 60, "gunicorn to serve")  # workers import the whole app first

        def worker_pids():
            """Send a burst of concurrent requests; the pids that spans came from so far."""
            with ThreadPoolExecutor(max_workers=8) as pool:
                assert set(pool.map(get, range(16))) == {200}
            time.sleep(0.3)  # the batch exporter sends every 100 ms here
            pids = {s.resource["process.pid"] for s in receiver.spans if s.name == "GET /health"}
            return pids if len(pids) >= 2 else None

        # A worker still starting (a loaded machine) serves nothing: keep going until both have.
        pids = wait_for(worker_pids, 60, "spans from both workers")
        instances = {s.resource["service.instance.id"] for s in receiver.spans}
        assert len(pids) == 2
        assert len(instances) == 2
        assert process.pid not in pids
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _answers(get) -> bool:
    try:
        return get() == 200
    except OSError:
        return False


class HangingExporter(SpanExporter):
    """An exporter whose every export hangs until released (a collector that never answers)."""

    def __init__(self):
        self.exporting = threading.Event()
        self.release = threading.Event()

    def export(self, spans) -> SpanExportResult:
        self.exporting.set()
        self.release.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_requests_do_not_wait_for_a_hanging_export(make_app, collection_url, monkeypatch):
    """Spans leave on the export thread: requests are served while an export hangs.

    How much tracing costs a request (latency, throughput) is measured in the
    template's bench/, not asserted here.
    """
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "1")
    exporter = HangingExporter()
    app = make_app(TRACING_ENABLED=True, TRACING_EXPORTER="none")
    tracer.provider(app).add_span_processor(ForkSafeBatchProcessor(lambda: exporter))
    client = app.test_client()
    try:
        assert client.get(collection_url).status_code == 200
        assert exporter.exporting.wait(10), "the batch was never exported"
        served = []
        serving = threading.Thread(
            target=lambda: served.extend(client.get(collection_url).status_code for _ in range(20))
        )
        serving.start()
        serving.join(10)  # a request waiting for the export would wait for release (30 s)
        assert served == [200] * 20
    finally:
        exporter.release.set()
        tracer.shutdown(app)


def test_shutdown_with_no_collector_is_bounded(make_app, collection_url):
    """Spans still queued for a collector that is not there are given up within 2 s at shutdown."""
    gc.collect()  # apps of earlier tests stop their export threads when collected
    app = make_app(**exporting_to(no_collector()))
    client = app.test_client()
    for _ in range(50):
        assert client.get(collection_url).status_code == 200

    started = time.perf_counter()
    tracer.shutdown(app)  # spans of the requests still queued, nobody to take them
    assert time.perf_counter() - started <= SHUTDOWN_LIMIT


SHUTDOWN_SCRIPT = """
import sys
import threading
from app import create_app
app = create_app({
    "SQLALCHEMY_DATABASE_URI": sys.argv[1],
    "TRACING_ENABLED": True,
    "TRACING_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_ENDPOINT": sys.argv[2],
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
    "TRACING_EXCLUDED_URLS": "",
})
client = app.test_client()
for _ in range(20):
    assert client.get("/health").status_code == 200
"""


def test_process_exit_with_a_hung_collector_is_bounded_and_clean(tmp_path):
    """A process whose collector hangs exits while its export still waits, shutting the exporter down once.

    Each export may take 60 s here (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT): the
    exit waits SHUTDOWN_TIMEOUT, not that. Nothing goes wrong on the way out:
    no "Exporter already shutdown", no exception in an exit hook, no ERROR.
    """
    hung = OTLPReceiver(hang=True).start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "ENVIRONMENT": "test",
        "AUTO_REGISTER_SERVICE": "false",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "60000",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, f"sqlite:///{tmp_path / 'service.db'}", hung.endpoint],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=40)  # well under the 60 s the export may take
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the process waited for the hung collector")
    finally:
        hung.stop()
    assert process.returncode == 0, stderr
    assert hung.requests >= 1  # the spans were on their way when the process left
    assert "already shutdown" not in stdout + stderr
    assert "Exception ignored" not in stderr
    assert "Logging error" not in stderr
    assert not [line for line in stdout.splitlines() if '"level": "ERROR"' in line]

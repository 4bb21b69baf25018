"""Under gunicorn with several workers, a real Prometheus sees the sum over workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import require_executable

PROJECT = Path(__file__).resolve().parent.parent
REQUESTS = 60
MAX_REQUESTS = 3000
QUERY = 'sum(http_requests_by_endpoint_total{endpoint="health.liveness"})'

pytestmark = pytest.mark.gunicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except OSError as error:
            last_error = error
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def gunicorn_service(tmp_path):
    port = free_port()
    multiproc = tmp_path / "prometheus-multiproc"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "SERVICE_PORT": str(port),
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "1",  # sync workers: concurrent requests must use both
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(f"{base}/health/ready"), 30, "gunicorn to serve")
        yield base, multiproc
    finally:
        stop(process)


@pytest.fixture
def prometheus(tmp_path):
    """Start a real Prometheus; returns a function that points it at a target."""
    binary = require_executable("prometheus")
    processes = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: service\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(f"{base}/-/ready"), 30, "prometheus to be ready")
        return base

    yield start
    for process in processes:
        stop(process)


def query(prometheus_url: str, promql: str) -> float | None:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    result = json.loads(get(url))["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_sum_over_workers(gunicorn_service, prometheus):
    """Requests spread over 2 workers show up in Prometheus as exactly their number."""
    base, multiproc = gunicorn_service
    sent = 0

    def serving_workers() -> set[str]:
        return {path.stem.rsplit("_", 1)[-1] for path in multiproc.glob("counter_*.db")}

    # A request takes well under a millisecond, so one worker may take a whole
    # burst; send bursts until both workers have served (bounded).
    with ThreadPoolExecutor(max_workers=8) as pool:
        while len(serving_workers()) < 2 or sent < REQUESTS:
            assert sent < MAX_REQUESTS, f"only workers {serving_workers()} served {sent} requests"
            statuses = list(pool.map(lambda _: get(f"{base}/health") and 200, range(REQUESTS)))
            assert statuses == [200] * REQUESTS
            sent += REQUESTS
    assert len(serving_workers()) == 2

    prometheus_url = prometheus(base.removeprefix("http://"))
    seen = wait_for(lambda: query(prometheus_url, QUERY) == sent and sent, 30, f"Prometheus to report {sent}")
    assert seen == sent

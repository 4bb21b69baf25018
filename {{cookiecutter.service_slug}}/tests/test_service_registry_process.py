"""Registration by the process that serves: once per instance, gone on SIGTERM before the drain.

Each test starts the real service in a subprocess against the Consul
stand-in: `flask run` (as `python main.py` would), and one gunicorn with two
workers that lives through Consul down, up, a recycled worker and SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.consul_stand_in import ConsulStandIn, free_port, wait_for

PROJECT = Path(__file__).resolve().parent.parent
EXITING = re.compile(r"Worker exiting \(pid: (\d+)\)")


@pytest.fixture
def consul():
    stand_in = ConsulStandIn().start()
    yield stand_in
    stand_in.stop()


def service_env(tmp_path, consul: ConsulStandIn, port: int) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {
        **inherited,
        "ENVIRONMENT": "test",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "SERVICE_PORT": str(port),
        "CONSUL_HOST": "127.0.0.1",
        "CONSUL_PORT": str(consul.port),
        "AUTO_REGISTER_SERVICE": "true",
        "SERVICE_ADDRESS": "",
        "SERVICE_ID": "",
        "OTEL_TRACES_EXPORTER": "none",
    }


class Service:
    """A service subprocess whose output (stdout and stderr) is collected line by line."""

    def __init__(self, command: list[str], env: dict, port: int):
        self.port = port
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def get_json(self, path: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def readiness_check(self) -> dict | None:
        try:
            return self.get_json("/health/ready")["checks"]["service_registry"]
        except OSError:
            return None

    def terminate(self, timeout: float = 15) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"did not stop on SIGTERM:\n{''.join(self.lines[-20:])}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_development_server_registers_and_deregisters_on_sigterm(tmp_path, consul):
    """`flask run` (make run) registers once at start-up and deregisters on SIGTERM.

    `python main.py` takes the same path (register_process, then SIGTERM as
    a normal exit); one process is enough to show it.
    """
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "main", "run", "--host", "127.0.0.1", "--port", str(port)]
    service = Service(command, service_env(tmp_path, consul, port), port)
    try:
        [registration] = wait_for(consul.registrations, 60, "the service to register")
        assert registration.body["port"] == port
        assert registration.body["address"] == "127.0.0.1"
        check = wait_for(service.readiness_check, 30, "the service to answer /health/ready")
        assert check["status"] == "up"
        assert check["registered"] is True
        service_id = registration.body["id"]

        assert service.terminate() in (0, 128 + signal.SIGTERM)
    finally:
        service.kill()

    assert [call.path for call in consul.deregistrations()] == [f"/v1/agent/service/deregister/{service_id}"]
    assert len(consul.registrations()) == 1


def app_with_a_held_route():
    """main's app plus GET /held, which answers once the Consul stand-in releases it.

    gunicorn builds it in each worker (`tests.test_service_registry_process:app_with_a_held_route()`),
    so a test can keep a request in flight for as long as it likes.
    """
    from main import app

    hold = f"http://127.0.0.1:{os.environ['CONSUL_PORT']}/test/hold"

    def held():
        with urllib.request.urlopen(hold, timeout=30) as response:
            return response.read().decode()

    app.add_url_rule("/held", "held", held)
    return app


def served_by(service: Service) -> set[str]:
    """The worker pids in gunicorn's access log lines ("served-by <pid>")."""
    messages = [json.loads(line)["message"] for line in service.lines if line.startswith("{")]
    return {message.split()[1].strip("<>") for message in messages if message.startswith("served-by ")}


@pytest.mark.gunicorn
def test_gunicorn_serves_without_consul_then_registers_once_and_deregisters_before_draining(tmp_path):
    """Consul down at start: every worker serves; once it is up, one registration, kept until SIGTERM drains.

    One gunicorn (two workers) plays a whole life, each step checked as it happens:

    - the agent is not there yet: the master retries in the background and
      every worker it forks starts and serves (no fork deadlock); readiness
      says the registry is down but not critical; the failure is logged;
    - the agent comes up: the master registers the instance once, and a
      worker's readiness sees the id the master registered;
    - one worker fewer (TTOU) exits as a recycled worker would and leaves
      the instance registered;
    - SIGTERM with a request in flight: the deregistration reaches the agent
      while that request is still running, the request then completes (the
      drain) and gunicorn exits cleanly.
    """
    port = free_port()
    consul = ConsulStandIn()  # its port is chosen; nothing listens there until start()
    env = {
        **service_env(tmp_path, consul, port),
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),  # used when metrics are on
        "CONSUL_RETRY_MAX_DELAY": "1",  # once the agent is up, the next retry comes within a second
    }
    command = [
        sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
        "--access-logfile", "-", "--access-logformat", "served-by %(p)s",
        "tests.test_service_registry_process:app_with_a_held_route()",
    ]
    service = Service(command, env, port)
    url = f"http://127.0.0.1:{port}/health"

    def burst():
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda _: urllib.request.urlopen(url, timeout=5).read(), range(12)))
        return len(served_by(service)) == 2

    try:
        wait_for(service.readiness_check, 60, "gunicorn to serve")  # workers import the whole app first
        check = service.readiness_check()
        assert check["status"] == "down"  # not registered: reported, not fatal
        assert check["critical"] is False
        wait_for(burst, 60, "both workers to serve")
        assert any("unreachable" in line and "common_utils.service_registry" in line for line in service.lines)

        consul.start()
        [registration] = wait_for(consul.registrations, 60, "gunicorn's master to register")
        assert registration.body["port"] == port
        assert registration.body["address"] == "127.0.0.1"
        service_id = registration.body["id"]
        # A worker's readiness asks the agent about the id the master registered.
        check = wait_for(
            lambda: (c := service.readiness_check()) and c["status"] == "up" and c,
            60,
            "a worker to see the registration",
        )
        assert check["status"] == "up"

        # One worker fewer (TTOU): it exits as a recycled worker would, inheriting the
        # master's registrar and its atexit hook, and must leave the instance registered.
        os.kill(service.process.pid, signal.SIGTTOU)
        exiting = wait_for(lambda: EXITING.findall("".join(service.lines)), 20, "a worker to exit")
        wait_for(lambda: not process_exists(int(exiting[0])), 20, "the worker process to be gone")
        assert consul.deregistrations() == []
        assert service_id in consul.services

        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(urllib.request.urlopen, f"http://127.0.0.1:{port}/held", timeout=30)
            wait_for(lambda: consul.calls("GET", "/test/hold"), 20, "the request to be in flight")
            signalled = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            try:
                wait_for(consul.deregistrations, 10, "the deregistration while a request is in flight")
                print(f"SIGTERM to deregistration: {(time.monotonic() - signalled) * 1000:.0f} ms")
                assert not in_flight.done()
            finally:
                consul.release.set()
            with in_flight.result(timeout=20) as response:
                assert response.read() == b"released"  # drained, not cut off
        assert service.process.wait(timeout=20) == 0
    finally:
        consul.release.set()
        service.kill()
        consul.stop()

    assert [call.path for call in consul.deregistrations()] == [f"/v1/agent/service/deregister/{service_id}"]
    assert len(consul.registrations()) == 1

"""A local stand-in for the Consul agent's HTTP API, for the registry tests.

It speaks the part of the real protocol the service uses (register,
deregister, list the agent's services, health of a service with `?passing`,
the X-Consul-Index header) and records every request, so tests can check
exactly what the service sent. It can start late on a port chosen in
advance, to play a Consul that comes up after the service, and `forget()`
plays an agent restarted with nothing kept. `GET /test/hold` is not
Consul's: it answers only once `release` is set, so a test can keep a
request of the service in flight. `HungServer` accepts connections and never
answers, like an agent that hangs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict
    body: dict | None
    headers: dict


class ConsulStandIn:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.requests: list[Recorded] = []
        #: Services registered through the agent API, by id (as the service sent them).
        self.services: dict[str, dict] = {}
        #: Instances of other services (name, address, port, check status), as other agents registered them.
        self.others: list[tuple[str, str, int, str]] = []
        #: Set it to answer the requests waiting on GET /test/hold.
        self.release = threading.Event()
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ConsulStandIn:
        self._server = make_server("127.0.0.1", self.port, self.wsgi, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def forget(self) -> None:
        """Lose every registration, as a restarted `consul agent -dev` does."""
        self.services.clear()

    def add_instance(self, name: str, address: str, port: int, status: str = "passing") -> None:
        self.others.append((name, address, port, status))

    def calls(self, method: str, path_prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def registrations(self) -> list[Recorded]:
        return self.calls("PUT", "/v1/agent/service/register")

    def deregistrations(self) -> list[Recorded]:
        return self.calls("PUT", "/v1/agent/service/deregister/")

    def wsgi(self, environ, start_response):
        request = Request(environ)
        body = json.loads(request.get_data()) if request.get_data() else None
        self.requests.append(
            Recorded(request.method, request.path, dict(request.args), body, dict(request.headers))
        )
        return self.respond(request, body)(environ, start_response)

    def respond(self, request: Request, body: dict | None) -> Response:
        path = request.path
        if request.method == "GET" and path == "/test/hold":
            return Response("released" if self.release.wait(30) else "not released", 200)
        if request.method == "PUT" and path == "/v1/agent/service/register":
            self.services[body.get("id") or body["name"]] = body
            return Response("", 200)
        if request.method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
            service_id = path.rsplit("/", 1)[1]
            if self.services.pop(service_id, None) is None:
                return Response(f'Unknown service ID "{service_id}"', 404)
            return Response("", 200)
        if request.method == "GET" and path == "/v1/agent/services":
            listing = {
                service_id: {"ID": service_id, "Service": s["name"], "Address": s.get("address", ""), "Port": s.get("port", 0)}
                for service_id, s in self.services.items()
            }
            return Response(json.dumps(listing), 200, content_type="application/json")
        if request.method == "GET" and path.startswith("/v1/health/service/"):
            name = path.rsplit("/", 1)[1]
            entries = [
                self.health_entry(name, address, port, status)
                for other, address, port, status in self.others
                if other == name
            ]
            if "passing" in request.args:
                entries = [e for e in entries if all(c["Status"] == "passing" for c in e["Checks"])]
            return Response(
                json.dumps(entries), 200, content_type="application/json", headers={"X-Consul-Index": "42"}
            )
        return Response("no such endpoint in the stand-in", 404)

    @staticmethod
    def health_entry(name: str, address: str, port: int, status: str) -> dict:
        service_id = f"{name}-{address}-{port}"
        return {
            "Node": {"Node": f"node-{address}", "Address": address},
            "Service": {"ID": service_id, "Service": name, "Address": address, "Port": port, "Tags": []},
            "Checks": [
                {"CheckID": "serfHealth", "Status": "passing"},
                {"CheckID": f"service:{service_id}", "Status": status},
            ],
        }


class HungServer:
    """Accepts TCP connections and never answers: an agent that hangs."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections.append(connection)

    def open_connections(self) -> int:
        """Connections the client has not closed (a client that gave up closes its socket)."""
        still_open = 0
        for connection in list(self.connections):
            try:
                still_open += connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:  # open, nothing unread
                still_open += 1
            except OSError:
                pass
        return still_open

    def stop(self) -> None:
        self._closed.set()
        self._listener.close()
        for connection in self.connections:
            connection.close()

"""A local OTLP/HTTP receiver standing in for Jaeger's port 4318, for the tracing tests.

It accepts POST /v1/traces like a collector does, decodes the protobuf
body with opentelemetry-proto and keeps the spans with their resource
attributes, so a test can check what really went over the wire. With
`hang=True` it plays a collector that accepts and never answers (until
`release` is set).
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
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


def attribute_value(value):
    """The Python value of an OTLP AnyValue."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    resource: dict


class OTLPReceiver:
    def __init__(self, hang: bool = False):
        self.port = free_port()
        self.spans: list[ReceivedSpan] = []
        self.content_types: list[str] = []
        self.hang = hang
        self.release = threading.Event()
        self.requests = 0
        self._server = None

    @property
    def endpoint(self) -> str:
        """The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OTLPReceiver:
        self._server = make_server("127.0.0.1", self.port, self.wsgi, threaded=True)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wsgi(self, environ, start_response):
        request = Request(environ)
        self.requests += 1
        if self.hang:
            self.release.wait(30)
        if request.method != "POST" or request.path != "/v1/traces":
            return Response("not found", 404)(environ, start_response)
        body = request.get_data()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.content_types.append(request.content_type)
        self.collect(ExportTraceServiceRequest.FromString(body))
        reply = ExportTraceServiceResponse().SerializeToString()
        return Response(reply, 200, content_type="application/x-protobuf")(environ, start_response)

    def collect(self, export: ExportTraceServiceRequest) -> None:
        for resource_spans in export.resource_spans:
            resource = {a.key: attribute_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: attribute_value(a.value) for a in span.attributes},
                            resource=resource,
                        )
                    )

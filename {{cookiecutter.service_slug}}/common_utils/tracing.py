"""Distributed tracing with OpenTelemetry, exported over OTLP to Jaeger: the guide's Tracer.

`tracer.init_app(app)` gives the app its own TracerProvider and traces every
request it serves (RequestSpans), every SQL statement of its engines
(SqlSpans) and every outgoing `requests` call, which carries a W3C
`traceparent` header so the next service continues the trace. Spans leave
in batches over OTLP/HTTP (Jaeger listens on 4318); the old Jaeger exporter
is gone upstream.

Why the pieces look the way they do:

- Request and SQL spans are our own few hooks on the OpenTelemetry API, not
  opentelemetry-instrumentation-flask and -sqlalchemy: those cost about 550
  Python calls per request span and 575 even for a request the sampler
  left out, plus about 80 per SQL statement for SQLAlchemy's per-connection
  event dispatch, which was a fifth of a whole request's CPU in the
  template's bench (bench/bench_hotpath.py). The spans keep the
  instrumentations' names, scopes and attributes. What a recorded span
  still costs is the SDK's (about 90 calls to start and end one, 70 to
  encode it to OTLP protobuf, and 15 per attribute for both), so the
  attributes are set only on spans the sampler keeps.
- Several apps in one process (tests) must not share state, and OTel's
  global TracerProvider can be set only once. So each app owns a provider,
  used by its own request and SQL hooks. `requests` can only be patched
  once per process; it, and anyone calling
  `opentelemetry.trace.get_tracer()`, gets a provider that forwards to the
  provider of the app in context.
- No collector must not mean a slow or stuck service: spans are exported
  from a background thread, each export gives up after
  TRACING_EXPORT_TIMEOUT (the SDK's default of 10 s with retries would hold
  process exit for about 7 s), and shutdown is bounded by SHUTDOWN_TIMEOUT.
- Under gunicorn every worker needs its own export thread and HTTP session.
  Without preload_app each worker builds the app after the fork anyway;
  with it, `gunicorn_post_fork` starts a fresh pipeline in each worker.
- Log lines carry `trace_id` and `span_id` (TraceContextFilter), so a
  trace found in Jaeger leads to its logs and back.
- A request that is not sampled costs next to nothing (about 100 Python
  calls, against some 700 for a recorded one with its SQL span): no
  attributes, and with the default parent-based sampler its SQL statements
  start no span at all (they would only be dropped), see SqlSpans.
- A missing collector is one WARNING, not a line per batch: the OTLP
  exporter's own per-attempt errors are folded into BackoffExporter's
  message, logged when the outage starts (and an INFO when it ends).
- Everything is shut down once, at exit, without starting threads (Python
  3.12 refuses new threads in atexit callbacks).

The standard OTEL_* variables win over the service's own settings, as the
OpenTelemetry specification describes them: OTEL_SDK_DISABLED=true turns
tracing off; OTEL_TRACES_EXPORTER is otlp, console, none or a comma-separated
list; OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT wins over JAEGER_HOST and
OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT (milliseconds, as the specification says;
the Python SDK alone reads seconds) over TRACING_EXPORT_TIMEOUT;
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over SERVICE_NAME and
friends; OTEL_TRACES_SAMPLER, OTEL_BSP_* and OTEL_EXPORTER_OTLP_HEADERS are
read by the SDK itself.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app, has_app_context
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, suppress_instrumentation
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id
from sqlalchemy import event
from sqlalchemy.engine import Engine

EXTENSION_KEY = "tracing"
#: Instrumentation scopes of the request and SQL spans: the names the OpenTelemetry instrumentations
#: used before our own hooks replaced them, so queries by otel.scope.name keep finding the spans.
SQLALCHEMY_SCOPE = "opentelemetry.instrumentation.sqlalchemy"
FLASK_SCOPE = "opentelemetry.instrumentation.flask"
#: Longest wait for the last spans to leave when the process stops.
SHUTDOWN_TIMEOUT = 0.5
#: After a failed export, batches are dropped unsent for this long, doubling up to the maximum.
FIRST_BACKOFF, MAX_BACKOFF = 2.0, 30.0

logger = logging.getLogger(__name__)


def traces_endpoint(config: Mapping[str, Any]) -> str:
    """Where spans go: the OTEL_* endpoints when set, else Jaeger's OTLP/HTTP port on JAEGER_HOST."""
    if config.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return config["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = config.get("OTEL_EXPORTER_OTLP_ENDPOINT") or f"http://{config['JAEGER_HOST']}:4318"
    return base.rstrip("/") + "/v1/traces"


EXPORTERS = ("otlp", "console", "none")


def export_timeout(config: Mapping[str, Any]) -> float:
    """Seconds one export may take: OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT in milliseconds, else TRACING_EXPORT_TIMEOUT."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        if config.get(name) is not None:
            return config[name] / 1000
    return config["TRACING_EXPORT_TIMEOUT"]


def make_exporter_factory(config: Mapping[str, Any]) -> Callable[[], SpanExporter] | None:
    """A function building the configured exporter(s) (OTEL_TRACES_EXPORTER: otlp, console, none, or a list)."""
    kinds = [kind.strip() for kind in config["TRACING_EXPORTER"].split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in EXPORTERS]
    if unknown or not kinds:
        raise ValueError(f"OTEL_TRACES_EXPORTER must list otlp, console or none, not {config['TRACING_EXPORTER']!r}")
    kinds = [kind for kind in dict.fromkeys(kinds) if kind != "none"]
    if not kinds:
        return None
    endpoint, timeout = traces_endpoint(config), export_timeout(config)
    builders = {
        "console": ConsoleSpanExporter,
        "otlp": lambda: BackoffExporter(OTLPSpanExporter(endpoint=endpoint, timeout=timeout), endpoint),
    }
    if len(kinds) == 1:
        return builders[kinds[0]]
    return lambda: FanOutExporter([builders[kind]() for kind in kinds])


class FanOutExporter(SpanExporter):
    """Hands each batch to several exporters (OTEL_TRACES_EXPORTER=otlp,console)."""

    def __init__(self, exporters: list[SpanExporter]):
        self.exporters = exporters

    def export(self, spans) -> SpanExportResult:
        results = [exporter.export(spans) for exporter in self.exporters]
        ok = all(result is SpanExportResult.SUCCESS for result in results)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        for exporter in self.exporters:
            exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(exporter.force_flush(timeout_millis) for exporter in self.exporters)


def make_resource(config: Mapping[str, Any]) -> Resource:
    """Who is sending: service name and version, environment, and this instance."""
    environment = config["ENVIRONMENT"]
    own = Resource.create(
        {
            "service.name": config["SERVICE_NAME"],
            "service.version": config["SERVICE_VERSION"],
            "service.instance.id": str(uuid.uuid4()),
            "deployment.environment": environment,
            "deployment.environment.name": environment,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
    )
    merged = own.merge(OTELResourceDetector().detect())  # OTEL_SERVICE_NAME etc. win
    return HashOnceResource(merged.attributes, merged.schema_url)


class HashOnceResource(Resource):
    """A Resource that works out its hash once.

    The OTLP encoder groups every span of a batch by its resource, which
    hashes it each time, and Resource's hash serialises all its attributes
    to JSON: about a dozen Python calls per span on the export thread for a
    value that never changes (a resource's attributes are immutable).
    """

    def __init__(self, attributes, schema_url: str | None = None):
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or super().__eq__(other)


#: The logger the OTLP/HTTP exporter (and its HTTP client) report each failed attempt on.
OTLP_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_exporting = threading.local()


class FoldIntoBackoffExporter(logging.Filter):
    """Keeps the OTLP exporter's per-attempt errors for BackoffExporter, which reports the outage once."""

    def filter(self, record: logging.LogRecord) -> bool:
        held = getattr(_exporting, "messages", None)
        if held is None:
            return True
        held.append(record.getMessage())
        return False


FOLD_INTO_BACKOFF_EXPORTER = FoldIntoBackoffExporter()


def failure_reason(messages: list[str]) -> str:
    """The exporter's account of the first failed attempt, without its generic "Failed to export" line."""
    specific = [message for message in messages if not message.startswith("Failed to export")]
    return specific[0] if specific else "the collector did not take the spans in time"


class BackoffExporter(SpanExporter):
    """Stops trying a collector that is not there, for a while, and says so once.

    Each export encodes a whole batch to protobuf before sending it: with no
    collector that work is wasted, and the exporter's own retries hold the
    export thread while spans pile up. After a failure this drops batches
    unsent, without encoding them, for a backoff period that doubles up to
    MAX_BACKOFF and is reset by the next success; the spans dropped would
    have been lost anyway. The first failure is a WARNING (with the
    exporter's own reason), the rest of the outage DEBUG, the end an INFO.
    """

    def __init__(self, inner: SpanExporter, endpoint: str, clock: Callable[[], float] = time.monotonic):
        self.inner = inner
        self.endpoint = endpoint
        self.clock = clock
        self.backoff = 0.0
        self.resume_at = 0.0
        self.dropped = 0
        self._shut_down = False

    def export(self, spans) -> SpanExportResult:
        if self._shut_down or self.clock() < self.resume_at:
            self.dropped += len(spans)
            return SpanExportResult.FAILURE
        _exporting.messages = []
        try:
            result = self.inner.export(spans)
        finally:
            reasons, _exporting.messages = _exporting.messages, None
        if result is SpanExportResult.SUCCESS:
            if self.backoff:
                logger.info("Span export to %s works again (%d spans were dropped)", self.endpoint, self.dropped)
            self.backoff, self.dropped = 0.0, 0
            return result
        first = not self.backoff
        self.backoff = min(self.backoff * 2 or FIRST_BACKOFF, MAX_BACKOFF)
        self.resume_at = self.clock() + self.backoff
        self.dropped += len(spans)
        (logger.warning if first else logger.debug)(
            "Span export to %s failed (%s); dropping spans, trying again after %.0f s, quietly until it works",
            self.endpoint,
            failure_reason(reasons),
            self.backoff,
        )
        return result

    def shutdown(self) -> None:
        if not self._shut_down:
            self._shut_down = True
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class ForkSafeBatchProcessor(SpanProcessor):
    """A BatchSpanProcessor, and its exporter, owned by one process.

    The queue, the export thread and the exporter's HTTP session of a batch
    processor belong to the process that made them. When gunicorn forks a
    worker from a master that already built the app (preload_app), the
    worker starts its own (`after_fork`, from gunicorn's post_fork hook, or
    at its first span) instead of sharing the master's.
    """

    def __init__(self, make_exporter: Callable[[], SpanExporter]):
        self._make_exporter = make_exporter
        self._lock = threading.Lock()
        self._shut_down = False
        self._start()

    def _start(self) -> None:
        self.exporter = self._make_exporter()
        self._batch = BatchSpanProcessor(self.exporter)
        self._pid = os.getpid()

    def after_fork(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            inherited = self._batch
            self._start()
        inherited.shutdown()  # its copied queue is empty: this only ends its thread

    def on_start(self, span: Span, parent_context=None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._pid != os.getpid():
            self.after_fork()
        self._batch.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Send what is queued, but give up after `timeout` seconds (no collector, say); once."""
        if self._pid != os.getpid() or self._shut_down:
            return
        self._shut_down = True
        batch = getattr(self._batch, "_batch_processor", None)
        if batch is not None and "timeout_millis" in inspect.signature(batch.shutdown).parameters:
            # The SDK's own bounded shutdown: its export thread sends what is
            # queued while this one waits at most `timeout`; no new thread,
            # which Python 3.12 refuses at exit (BatchSpanProcessor.shutdown()
            # would allow it 30 s).
            batch.shutdown(timeout_millis=timeout * 1000)
        else:
            finishing = threading.Thread(target=self._batch.shutdown, name="otel-shutdown", daemon=True)
            finishing.start()
            finishing.join(timeout)
        # Ends the exporter's retry waits if it is still sending; a no-op when it stopped already.
        self.exporter.shutdown()


def drops_children_of_unsampled(provider: TracerProvider) -> bool:
    """Whether the provider's sampler drops every span whose local parent is not sampled.

    True for every parent-based sampler OTEL_TRACES_SAMPLER can name (the default among them).
    """
    sampler = provider.sampler
    description = sampler.get_description()
    return isinstance(sampler, ParentBased) and "localParentNotSampled:AlwaysOffSampler" in description


class EnvironGetter(Getter):
    """Reads propagation headers (traceparent, baggage) straight from the WSGI environ."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [name[5:].lower().replace("_", "-") for name in carrier if name.startswith("HTTP_")]


ENVIRON_GETTER = EnvironGetter()
#: The headers of the default propagators (tracecontext, baggage), and the context they extract without them.
W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
EMPTY_CONTEXT = otel_context.Context()


class RequestSpans:
    """WSGI middleware: one SERVER span per request.

    Why not opentelemetry-instrumentation-flask: it spent about 550 Python
    calls on every recorded request span and 575 on one the sampler left
    out (a WSGI wrapper and three Flask hooks, semantic-convention mode
    lookups, duration metrics of its own, attributes built before the
    sampler is asked), a fifth of what a whole all-off request costs.
    This does the same job with the OpenTelemetry API in one wrapper: the
    caller's traceparent (and baggage) through the global propagator, a
    span named `METHOD route` (just the method when no route matched:
    span names must not grow with what clients send), the attributes the
    instrumentation set (its default, pre-1.20 semantic-convention names,
    so existing Jaeger queries keep working), ERROR on a 5xx, and an
    exception that escapes the app recorded. The attributes are read
    when the app is done, so ProxyFix's rewrite of the client address is
    in them, and a span the sampler leaves out costs no attribute work.
    """

    def __init__(self, wsgi_app, tracer: trace.Tracer, excluded: re.Pattern | None):
        self.wsgi_app = wsgi_app
        self.tracer = tracer
        self.excluded = excluded
        self._textmap: TextMapPropagator | None = None
        self._w3c_only = False

    def __call__(self, environ, start_response):
        if self.excluded is not None and self.excluded.search(request_url(environ)):
            # No spans at all while serving a probe: without this its SQL and
            # Consul calls would each start a trace of their own.
            with suppress_instrumentation():
                return self.wsgi_app(environ, start_response)
        parent = self._caller_context(environ)
        span = self.tracer.start_span(environ.get("REQUEST_METHOD", ""), context=parent, kind=SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            if not span.is_recording():
                return self.wsgi_app(environ, start_response)
            return self._recorded(span, environ, start_response)
        finally:
            span.end()
            otel_context.detach(token)

    def _caller_context(self, environ) -> otel_context.Context:
        """The caller's trace context (traceparent, baggage) from the global propagator."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:  # OTEL_PROPAGATORS, or set_global_textmap() since
            self._textmap, self._w3c_only = textmap, textmap.fields <= W3C_FIELDS
        if self._w3c_only and "HTTP_TRACEPARENT" not in environ and "HTTP_BAGGAGE" not in environ:
            return EMPTY_CONTEXT  # what the W3C propagators would find, without their dozen calls
        return textmap.extract(environ, getter=ENVIRON_GETTER)

    def _recorded(self, span: trace.Span, environ, start_response):
        answered: list[tuple[str, str | None]] = []

        def keep_status(status: str, headers, exc_info=None):
            # Flask answers while its request is still in the environ: the route it matched.
            rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
            answered.append((status, rule.rule if rule is not None else None))
            return start_response(status, headers, exc_info)

        try:
            return self.wsgi_app(environ, keep_status)
        except Exception as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            raise
        finally:
            status, route = answered[-1] if answered else (None, None)
            attributes = request_attributes(environ, route)
            if route is not None:
                span.update_name(f"{attributes['http.method']} {route}")
            if status is not None:
                code = int(status[:3])
                attributes["http.status_code"] = code
                if code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)


def request_url(environ: Mapping[str, Any]) -> str:
    """The URL the excluded-URL patterns are searched in (scheme, host, path and query, as sent)."""
    query = environ.get("QUERY_STRING")
    return "".join(
        (
            environ.get("wsgi.url_scheme", "http"),
            "://",
            environ.get("HTTP_HOST") or environ.get("SERVER_NAME", ""),
            environ.get("SCRIPT_NAME", ""),
            environ.get("PATH_INFO", ""),
            "?" + query if query else "",
        )
    )


def request_attributes(environ: Mapping[str, Any], route: str | None) -> dict[str, Any]:
    """The attributes opentelemetry-instrumentation-flask recorded, read from the WSGI environ."""
    attributes: dict[str, Any] = {
        "http.method": environ.get("REQUEST_METHOD", ""),
        "http.scheme": environ.get("wsgi.url_scheme"),
    }
    for name, key in REQUEST_ATTRIBUTES:
        value = environ.get(key)
        if value:
            attributes[name] = value
    host = environ.get("HTTP_HOST")
    if host:
        attributes["net.host.name"] = host.partition(":")[0]
    port = environ.get("SERVER_PORT")
    if port and port.isdigit():
        attributes["net.host.port"] = int(port)
    peer_port = environ.get("REMOTE_PORT")
    if peer_port and str(peer_port).isdigit():
        attributes["net.peer.port"] = int(peer_port)
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        query = environ.get("QUERY_STRING")
        target = environ.get("PATH_INFO", "") + ("?" + query if query else "")
    attributes["http.target"] = target
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol:
        attributes["http.flavor"] = protocol.removeprefix("HTTP/")
    if route:
        attributes["http.route"] = route
    return attributes


#: Attributes copied from the environ as they are: (attribute, environ key).
REQUEST_ATTRIBUTES = (
    ("http.server_name", "SERVER_NAME"),
    ("http.host", "HTTP_HOST"),
    ("net.peer.ip", "REMOTE_ADDR"),
    ("http.user_agent", "HTTP_USER_AGENT"),
)


def excluded_urls(patterns: str) -> re.Pattern | None:
    """OTEL_PYTHON_FLASK_EXCLUDED_URLS: comma-separated regular expressions searched in each request's URL."""
    parts = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    return re.compile("|".join(parts)) if parts else None


class SqlSpans:
    """A CLIENT span around each SQL statement one engine sends to its database.

    Why not opentelemetry-instrumentation-sqlalchemy: it reads the engine's
    URL, the driver's connection info and the semantic-convention modes on
    every statement and builds its attributes before the sampler is asked,
    and its Connection-level events make SQLAlchemy join an event dispatch
    for every connection it hands out, about 80 Python calls a request
    even when nothing is recorded. This listens to the dialect's
    do_execute events instead, which SQLAlchemy offers for wrapping the
    driver call: the span starts, the dialect's own do_execute runs, the
    span ends (ERROR with the driver's message if it raised). The engine's
    attributes never change, so they are read once; a statement adds its
    text. With `skip_unsampled` (a parent-based sampler, the default) a
    statement inside a request the sampler left out starts no span at all
    (it would be dropped); statements outside any request still go to the
    sampler. Names and attributes are the instrumentation's (`SELECT
    orders_db`, db.system, db.name, db.statement, ...).
    """

    def __init__(self, tracer: trace.Tracer, engine: Engine, skip_unsampled: bool):
        self.tracer = tracer
        self.skip_unsampled = skip_unsampled
        url = engine.url
        system = engine.dialect.name
        system = "postgresql" if "postgres" in system else system
        self.suffix = f" {url.database}" if url.database else ""
        self.fallback_name = system
        self.engine_attributes: dict[str, Any] = {"db.system": system}
        for name, value in (
            ("net.peer.name", url.host),
            ("net.peer.port", url.port),
            ("db.name", url.database),
            ("db.user", url.username),
        ):
            if value:
                self.engine_attributes[name] = value
        dialect = engine.dialect
        for name in ("do_execute", "do_executemany", "do_execute_no_params"):
            event.listen(engine, name, self._traced(getattr(dialect, name)))

    def _traced(self, run: Callable[..., Any]) -> Callable[..., bool]:
        """A listener for the dialect event of the same name: the dialect's own `run`, inside a span."""

        def execute(cursor, statement: str, *parameters_and_context) -> bool:
            span = self.start(statement)
            try:
                run(cursor, statement, *parameters_and_context)
            except Exception as error:
                if span is not None and span.is_recording():
                    span.set_status(Status(StatusCode.ERROR, str(error)))
                raise
            finally:
                if span is not None:
                    span.end()
            return True  # the statement ran: SQLAlchemy must not run it again

        return execute

    def start(self, statement: str) -> trace.Span | None:
        """The statement's span, or None when it gets none (unsampled request, probe, instrumentation off).

        The current context is looked up once and handed to the parent check
        and the tracer, which would otherwise each fetch it again. The
        attributes go in with the span's start, where the SDK keeps them only
        if the span records.
        """
        context = otel_context.get_current()
        parent = trace.get_current_span(context).get_span_context()
        if self.skip_unsampled and parent.is_valid and not parent.trace_flags.sampled:
            return None
        if not is_instrumentation_enabled():
            return None
        words = statement.split(None, 1)
        name = words[0] + self.suffix if words else self.fallback_name
        attributes = {**self.engine_attributes, "db.statement": statement, "db.operation": name}
        return self.tracer.start_span(
            name, context=context, kind=SpanKind.CLIENT, attributes=attributes
        )


@dataclass(eq=False)  # hashable by identity, for the WeakSet of live states
class TracingState:
    """Per-app tracing: its provider, its export pipeline and its tracers by scope."""

    provider: TracerProvider
    processor: ForkSafeBatchProcessor | None
    endpoint: str | None
    tracers: dict[tuple, trace.Tracer] = field(default_factory=dict)

    def tracer(self, name: str, version: str | None = None, schema_url: str | None = None, attributes=None):
        key = (name, version, schema_url, tuple(sorted((attributes or {}).items())))
        if key not in self.tracers:
            self.tracers[key] = self.provider.get_tracer(name, version, schema_url, attributes)
        return self.tracers[key]

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        if self.processor is not None:
            self.processor.shutdown(timeout)
        self.provider.shutdown()


_live_states: weakref.WeakSet[TracingState] = weakref.WeakSet()
_process_wide_lock = threading.Lock()
_process_wide_done = False
_NOOP_TRACER = trace.NoOpTracer()


class CurrentAppTracer(trace.Tracer):
    """A tracer that starts spans with the tracer provider of the app in context.

    Outside an app context (a thread without one, say) it records nothing.
    """

    def __init__(self, *scope):
        self._scope = scope

    def _target(self) -> trace.Tracer:
        state = current_app.extensions.get(EXTENSION_KEY) if has_app_context() else None
        return state.tracer(*self._scope) if state is not None else _NOOP_TRACER

    def start_span(self, *args, **kwargs) -> trace.Span:
        return self._target().start_span(*args, **kwargs)

    def start_as_current_span(self, *args, **kwargs):
        return self._target().start_as_current_span(*args, **kwargs)


class CurrentAppTracerProvider(trace.TracerProvider):
    """The process-wide provider: its tracers forward to the current app's own provider."""

    def get_tracer(self, instrumenting_module_name, instrumenting_library_version=None, schema_url=None, attributes=None):
        return CurrentAppTracer(instrumenting_module_name, instrumenting_library_version, schema_url, attributes)


ROUTING_PROVIDER = CurrentAppTracerProvider()


class TraceContextFilter(logging.Filter):
    """Adds the current span's trace_id and span_id (null outside a span) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        valid = context.is_valid
        record.trace_id = format_trace_id(context.trace_id) if valid else None
        record.span_id = format_span_id(context.span_id) if valid else None
        return True


TRACE_CONTEXT_FILTER = TraceContextFilter()


def add_trace_ids_to_service_logs() -> None:
    """Put TraceContextFilter on the service's JSON handler (it keeps it when reconfigured)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "is_service_handler", False):
            handler.addFilter(TRACE_CONTEXT_FILTER)


def instrument_process() -> None:
    """What can only happen once per process: patch `requests`, set the global provider."""
    global _process_wide_done
    with _process_wide_lock:
        if _process_wide_done:
            return
        _process_wide_done = True
    RequestsInstrumentor().instrument(tracer_provider=ROUTING_PROVIDER)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(ROUTING_PROVIDER)
    logging.getLogger(OTLP_EXPORTER_LOGGER).addFilter(FOLD_INTO_BACKOFF_EXPORTER)
    atexit.register(shutdown_all)


def shutdown_all(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """At exit: flush every app's spans, all within `timeout` seconds (one app, in a service)."""
    deadline = time.monotonic() + timeout
    for state in list(_live_states):
        state.shutdown(max(0.0, deadline - time.monotonic()))


def stop_in_background(processor: ForkSafeBatchProcessor) -> None:
    """Stop a discarded app's export thread, dropping what it still holds.

    Called by the garbage collector, possibly on that very thread, so the
    waiting happens on a thread of its own.
    """

    def stop() -> None:
        processor.exporter.shutdown()  # further exports return at once
        processor.shutdown(timeout=SHUTDOWN_TIMEOUT)

    threading.Thread(target=stop, name="otel-discard", daemon=True).start()


class Tracer:
    """Flask extension: `tracer.init_app(app)`; `with tracer.span("charge-card"):` for your own spans."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> TracingState | None:
        config = app.config
        if not config["TRACING_ENABLED"] or config.get("OTEL_SDK_DISABLED"):
            return None
        if EXTENSION_KEY in app.extensions:
            return app.extensions[EXTENSION_KEY]
        if config.get("JAEGER_PORT"):
            logger.warning(
                "JAEGER_PORT is ignored: the Jaeger agent (UDP 6831) is replaced by OTLP; "
                "set JAEGER_HOST or OTEL_EXPORTER_OTLP_ENDPOINT (http://host:4318)"
            )
        make_exporter = make_exporter_factory(config)
        processor = ForkSafeBatchProcessor(make_exporter) if make_exporter else None
        provider = TracerProvider(resource=make_resource(config), shutdown_on_exit=False)
        if processor is not None:
            provider.add_span_processor(processor)
        state = TracingState(provider, processor, traces_endpoint(config) if make_exporter else None)
        app.extensions[EXTENSION_KEY] = state
        _live_states.add(state)
        if processor is not None:
            # An app that is thrown away (tests build dozens) must not leave its export thread behind.
            weakref.finalize(state, stop_in_background, processor).atexit = False

        excluded = excluded_urls(config["TRACING_EXCLUDED_URLS"])
        app.wsgi_app = RequestSpans(app.wsgi_app, state.tracer(FLASK_SCOPE), excluded)
        self._instrument_engines(app, state)
        instrument_process()
        add_trace_ids_to_service_logs()
        logger.info("Tracing on: spans go to %s", state.endpoint or "no exporter")
        return state

    @staticmethod
    def _instrument_engines(app: Flask, state: TracingState) -> None:
        """Trace the SQL of this app's own engines (never every engine in the process)."""
        sqlalchemy = app.extensions.get("sqlalchemy")
        if sqlalchemy is None or not app.config.get("TRACING_SQL_SPANS", True):
            return
        with app.app_context():
            engines = list(sqlalchemy.engines.values())
        skip_unsampled = drops_children_of_unsampled(state.provider)
        for engine in engines:
            SqlSpans(state.tracer(SQLALCHEMY_SCOPE), engine, skip_unsampled)

    @staticmethod
    def state(app: Flask | None = None) -> TracingState | None:
        return (app or current_app).extensions.get(EXTENSION_KEY)

    def provider(self, app: Flask | None = None) -> TracerProvider | None:
        """The app's TracerProvider (None when tracing is off), e.g. to add a span processor."""
        state = self.state(app)
        return state.provider if state is not None else None

    def span(self, name: str, **kwargs):
        """Start a span (and make it current) with the tracer of the app in context."""
        return ROUTING_PROVIDER.get_tracer(__name__).start_as_current_span(name, **kwargs)

    def shutdown(self, app: Flask, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Flush and stop the app's exporter, within `timeout` seconds."""
        state = self.state(app)
        if state is not None:
            state.shutdown(timeout)
            _live_states.discard(state)


def gunicorn_post_fork(server, worker) -> None:
    """In a new gunicorn worker: give apps built before the fork their own export pipeline."""
    for state in list(_live_states):
        if state.processor is not None:
            state.processor.after_fork()

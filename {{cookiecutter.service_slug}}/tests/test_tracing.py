"""Tracing with OpenTelemetry, checked with an in-memory exporter."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import pytest
import requests
from opentelemetry import propagate
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from app.extensions import db, tracer
from app.request_logging import configure_logging
from common_utils import tracing
from common_utils.tracing import (
    TRACE_CONTEXT_FILTER,
    BackoffExporter,
    ForkSafeBatchProcessor,
    traces_endpoint,
)
from tests.conftest import captured_log_lines
from tests.otlp_receiver import OTLPReceiver, free_port

INCOMING_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
INCOMING_PARENT_ID = "b7ad6b7169203331"
INCOMING = {"traceparent": f"00-{INCOMING_TRACE_ID}-{INCOMING_PARENT_ID}-01"}


@pytest.fixture
def traced(make_app):
    """Build an app with tracing on whose spans are kept in memory (nothing is exported)."""

    def build(**overrides):
        app = make_app(TRACING_ENABLED=True, TRACING_EXPORTER="none", **overrides)
        spans = InMemorySpanExporter()
        tracer.provider(app).add_span_processor(SimpleSpanProcessor(spans))
        return app, spans

    return build


@pytest.fixture
def downstream():
    """Another service on loopback that records the headers it receives."""
    received = []

    def wsgi(environ, start_response):
        received.append(dict(Request(environ).headers))
        return Response("ok")(environ, start_response)

    server = make_server("127.0.0.1", 0, wsgi, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


def server_spans(spans: InMemorySpanExporter) -> list:
    return [span for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER]


def status_code(span) -> int:
    """The HTTP status, under the old or the new semantic-convention name."""
    attributes = span.attributes
    return attributes.get("http.response.status_code", attributes.get("http.status_code"))


def hex_ids(span) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def test_request_span_has_route_and_status(traced, collection_url, new_item):
    """Each request is a SERVER span named by its route, with the route and the status code."""
    app, spans = traced()
    client = app.test_client()
    item = client.post(collection_url, json=new_item).get_json()
    spans.clear()

    assert client.get(f"{collection_url}/{item['id']}").status_code == 200
    assert client.get(f"{collection_url}/999999").status_code == 404

    found, missing = server_spans(spans)
    route = found.attributes["http.route"]
    assert route.startswith(f"{collection_url}/<")
    assert found.name == f"GET {route}"
    assert status_code(found) == 200
    assert status_code(missing) == 404
    assert found.resource.attributes["service.name"] == app.config["SERVICE_NAME"]


def sql_statement(span) -> str:
    return span.attributes.get("db.statement") or span.attributes.get("db.query.text")


def test_sql_statements_are_child_spans_of_the_request(traced, collection_url):
    """Each SQL statement a request runs is a CLIENT span under the request's span.

    The first request of a fresh app also runs the driver's connection setup
    (PostgreSQL: `show standard_conforming_strings`...): those are spans too.
    """
    app, spans = traced()
    app.test_client().get(collection_url)
    with app.app_context():
        dialect = app.extensions["sqlalchemy"].engine.dialect.name

    [request_span] = server_spans(spans)
    sql = [span for span in spans.get_finished_spans() if span.kind == SpanKind.CLIENT]
    assert any(sql_statement(span).upper().startswith("SELECT") for span in sql), "the list endpoint runs SQL"
    for span in sql:
        assert span.name.split()[0] == sql_statement(span).split()[0]  # SELECT <database>
        assert span.attributes["db.system"] == dialect
        assert span.parent.span_id == request_span.context.span_id
        assert span.context.trace_id == request_span.context.trace_id


def test_server_errors_mark_the_request_span(traced):
    """A 5xx answer sets the request span's status to ERROR; a 4xx does not."""
    app, spans = traced()

    def broken():
        raise RuntimeError("boom")

    app.add_url_rule("/broken", "broken", broken)
    client = app.test_client()
    assert client.get("/broken").status_code == 500
    assert client.get("/no-such-page").status_code == 404

    failed, missing = server_spans(spans)
    assert (failed.name, status_code(failed), failed.status.status_code) == ("GET /broken", 500, StatusCode.ERROR)
    assert (missing.name, status_code(missing), missing.status.status_code) == ("GET", 404, StatusCode.UNSET)


def test_failed_statement_span_carries_the_error(traced):
    """A statement the database refuses is a CLIENT span with status ERROR; the error still reaches the caller."""
    app, spans = traced()
    with app.app_context(), tracer.span("work"):
        with pytest.raises(DBAPIError):
            db.session.execute(text("SELECT no_such_column FROM no_such_table"))
        db.session.rollback()
        db.session.connection().exec_driver_sql("SELECT 1", execution_options={"no_parameters": True})

    by_statement = {sql_statement(span): span for span in spans.get_finished_spans() if span.kind == SpanKind.CLIENT}
    failed, plain = by_statement["SELECT no_such_column FROM no_such_table"], by_statement["SELECT 1"]
    assert failed.status.status_code == StatusCode.ERROR
    assert "no_such" in failed.status.description
    assert (sql_statement(plain), plain.status.status_code) == ("SELECT 1", StatusCode.UNSET)


def test_outgoing_request_carries_traceparent(traced, downstream):
    """A `requests` call made while serving is a CLIENT span and sends a W3C traceparent for it."""
    url, received = downstream
    app, spans = traced()
    app.add_url_rule("/calls-out", "calls_out", lambda: requests.get(url, timeout=5).text)

    assert app.test_client().get("/calls-out").status_code == 200

    [request_span] = server_spans(spans)
    [outgoing] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert outgoing.parent.span_id == request_span.context.span_id
    version, trace_id, span_id, flags = received[0]["Traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", *hex_ids(outgoing))
    assert int(flags, 16) & 1  # sampled


def test_incoming_traceparent_is_continued(traced, collection_url):
    """A caller's traceparent makes this service's span a child in the caller's trace."""
    app, spans = traced()
    app.test_client().get(collection_url, headers=INCOMING)

    [request_span] = server_spans(spans)
    assert f"{request_span.context.trace_id:032x}" == INCOMING_TRACE_ID
    assert f"{request_span.parent.span_id:016x}" == INCOMING_PARENT_ID
    assert request_span.parent.is_remote


class HeaderPropagator(TraceContextTextMapPropagator):
    """W3C trace context, but read from another header (as B3 or Jaeger propagators would)."""

    def extract(self, carrier, context=None, getter=None):
        value = getter.get(carrier, "x-other-trace")
        return super().extract({"traceparent": value[0]} if value else {}, context)

    @property
    def fields(self):
        return {"x-other-trace"}


def test_a_configured_propagator_is_used(traced, collection_url):
    """The global propagator (OTEL_PROPAGATORS) reads the caller's context, whatever header it uses."""
    app, spans = traced()
    default = propagate.get_global_textmap()
    propagate.set_global_textmap(HeaderPropagator())
    try:
        app.test_client().get(collection_url, headers={"X-Other-Trace": INCOMING["traceparent"]})
    finally:
        propagate.set_global_textmap(default)

    [request_span] = server_spans(spans)
    assert f"{request_span.context.trace_id:032x}" == INCOMING_TRACE_ID


def test_two_apps_keep_their_spans_apart(traced, downstream, collection_url):
    """Each app exports only its own spans, outgoing calls included (no shared global provider)."""
    url, _ = downstream
    first, first_spans = traced()
    second, second_spans = traced()
    first.add_url_rule("/calls-out", "calls_out", lambda: requests.get(url, timeout=5).text)

    first.test_client().get("/calls-out")
    second.test_client().get(collection_url)

    assert {s.kind for s in first_spans.get_finished_spans()} == {SpanKind.SERVER, SpanKind.CLIENT}
    assert [s.name for s in server_spans(second_spans)] == [f"GET {collection_url}"]
    first_traces = {s.context.trace_id for s in first_spans.get_finished_spans()}
    assert first_traces.isdisjoint({s.context.trace_id for s in second_spans.get_finished_spans()})


def test_log_lines_carry_trace_and_span_ids(traced, collection_url):
    """The JSON access line of a traced request has the request span's trace_id and span_id."""
    app, spans = traced()
    with captured_log_lines() as log_lines:
        app.test_client().get(collection_url, headers=INCOMING)

    [request_span] = server_spans(spans)
    [access] = [line for line in log_lines() if line["logger"] == "access"]
    assert (access["trace_id"], access["span_id"]) == hex_ids(request_span)
    assert access["trace_id"] == INCOMING_TRACE_ID


def test_trace_ids_survive_logging_reconfiguration(traced):
    """Reconfiguring logging keeps the trace-id filter; lines outside a span carry nulls."""
    traced()
    configure_logging("INFO")
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "is_service_handler", False))
    assert TRACE_CONTEXT_FILTER in handler.filters

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "outside a span", (), None)
    assert TRACE_CONTEXT_FILTER.filter(record)
    assert (record.trace_id, record.span_id) == (None, None)


def test_spans_record_the_client_behind_a_trusted_proxy(traced):
    """Behind TRUSTED_PROXY_COUNT proxies the request span records the client (X-Forwarded-For), not the proxy.

    ProxyFix rewrites the address before the span is started, whatever order
    the WSGI wrappers are in (it changes the environ in place).
    """
    app, spans = traced(TRUSTED_PROXY_COUNT=1)
    app.test_client().get(
        "/no-such-page", headers={"X-Forwarded-For": "203.0.113.7"}, environ_base={"REMOTE_ADDR": "10.0.0.9"}
    )
    [span] = server_spans(spans)
    assert span.attributes.get("client.address", span.attributes.get("net.peer.ip")) == "203.0.113.7"


def test_health_probes_are_not_traced(traced):
    """Probes (/health, /health/ready) leave no spans, not even for the SQL they run."""
    app, spans = traced()
    client = app.test_client()

    assert client.get("/health").status_code == 200
    client.get("/health/ready")

    assert spans.get_finished_spans() == ()


def test_resource_describes_the_instance(traced):
    """Spans carry service.name, service.version, deployment.environment and an instance id."""
    app, _ = traced(ENVIRONMENT="staging", SERVICE_VERSION="1.2.3")
    attributes = tracer.provider(app).resource.attributes

    assert attributes["service.name"] == app.config["SERVICE_NAME"]
    assert attributes["service.version"] == "1.2.3"
    assert attributes["deployment.environment"] == "staging"
    assert len(attributes["service.instance.id"]) == 36
    other, _ = traced()
    assert tracer.provider(other).resource.attributes["service.instance.id"] != attributes["service.instance.id"]


def test_resource_hashes_and_compares_as_the_sdks_own(traced):
    """The resource spans are grouped by on export hashes (once) and compares as the SDK's Resource does."""
    app, _ = traced()
    resource = tracer.provider(app).resource
    same = Resource(resource.attributes, resource.schema_url)
    assert hash(resource) == hash(same)
    assert resource == same
    assert same == resource
    other = Resource({**resource.attributes, "service.name": "other"}, resource.schema_url)
    assert resource != other


def test_sql_under_suppress_instrumentation_gets_no_span(traced):
    """A view that suppresses instrumentation around a statement hides that statement, and only that one."""
    app, spans = traced()

    @app.get("/quiet")
    def quiet():
        with suppress_instrumentation():
            db.session.execute(text("SELECT 1"))
        db.session.execute(text("SELECT 2"))
        return {}

    assert app.test_client().get("/quiet").status_code == 200
    sql = [span for span in spans.get_finished_spans() if span.kind == SpanKind.CLIENT]
    statements = [sql_statement(span) for span in sql]
    assert "SELECT 2" in statements
    assert "SELECT 1" not in statements


def test_otel_service_name_wins(traced, monkeypatch):
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES take precedence over the service's settings."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed-by-otel")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=from-otel")
    app, _ = traced()
    attributes = tracer.provider(app).resource.attributes

    assert attributes["service.name"] == "renamed-by-otel"
    assert attributes["deployment.environment"] == "from-otel"


def test_otel_traces_sampler_is_honoured(traced, collection_url, monkeypatch):
    """OTEL_TRACES_SAMPLER decides what is recorded (here: nothing)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    app, spans = traced()
    assert app.test_client().get(collection_url).status_code == 200
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize("sampler", ["parentbased_always_off", "parentbased_traceidratio"])
def test_unsampled_requests_start_no_sql_spans(traced, collection_url, monkeypatch, sampler):
    """A request the sampler leaves out starts no span per SQL statement (it would only be dropped)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    app, spans = traced()
    sql_tracer = tracer.state(app).tracer(tracing.SQLALCHEMY_SCOPE)
    started = []
    start_span = sql_tracer.start_span
    monkeypatch.setattr(
        sql_tracer, "start_span", lambda *a, **k: started.append(a) or start_span(*a, **k)
    )

    assert app.test_client().get(collection_url).status_code == 200
    assert spans.get_finished_spans() == ()
    assert started == []


def test_sampled_requests_keep_their_sql_spans(traced, collection_url, monkeypatch):
    """With the default parent-based sampler every statement of a sampled request is a span."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    app, spans = traced()
    assert app.test_client().get(collection_url).status_code == 200
    sql = [span for span in spans.get_finished_spans() if span.kind == SpanKind.CLIENT]
    assert sql
    assert {span.context.trace_id for span in sql} == {server_spans(spans)[0].context.trace_id}


def test_sql_spans_can_be_switched_off(traced, collection_url):
    """TRACING_SQL_SPANS=false: the request span only, no span per statement."""
    app, spans = traced(TRACING_SQL_SPANS=False)
    assert app.test_client().get(collection_url).status_code == 200
    assert [span.kind for span in spans.get_finished_spans()] == [SpanKind.SERVER]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"JAEGER_HOST": "jaeger.internal"}, "http://jaeger.internal:4318/v1/traces"),
        (
            {"JAEGER_HOST": "jaeger.internal", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
            "http://collector:4318/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/otlp/v1/traces",
            },
            "https://traces.example/otlp/v1/traces",
        ),
    ],
)
def test_otel_endpoint_takes_precedence_over_jaeger_host(make_app, monkeypatch, env, expected):
    """Spans go to JAEGER_HOST:4318 unless the standard OTEL_EXPORTER_OTLP_* variables say otherwise."""
    for name in ("JAEGER_HOST", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    app = make_app(TRACING_ENABLED=True, TRACING_EXPORTER="otlp")

    assert traces_endpoint(app.config) == expected
    assert tracer.state(app).endpoint == expected
    assert tracer.state(app).processor.exporter.inner._endpoint == expected
    tracer.shutdown(app)


def test_tracing_can_be_switched_off(make_app, collection_url):
    """TRACING_ENABLED=false: no provider and requests still work."""
    app = make_app(TRACING_ENABLED=False)
    assert tracer.provider(app) is None
    assert app.test_client().get(collection_url, headers=INCOMING).status_code == 200


def test_unknown_exporter_is_refused(make_app):
    """A typo in OTEL_TRACES_EXPORTER stops start-up with the allowed values."""
    with pytest.raises(ValueError, match="otlp, console or none"):
        make_app(TRACING_ENABLED=True, TRACING_EXPORTER="jaeger")


def test_export_pipeline_is_rebuilt_in_a_forked_worker(monkeypatch):
    """After a fork (gunicorn's post_fork) the worker gets its own exporter and batch thread."""
    built = []

    def make_exporter():
        built.append(InMemorySpanExporter())
        return built[-1]

    processor = ForkSafeBatchProcessor(make_exporter)
    inherited = processor._batch
    monkeypatch.setattr(tracing.os, "getpid", lambda: -1)  # now "in the child"

    processor.after_fork()
    processor.after_fork()

    assert len(built) == 2
    assert processor.exporter is built[1]
    assert processor._batch is not inherited
    assert inherited._batch_processor._shutdown  # the master's copy is stopped, not left running


class ScriptedExporter(SpanExporter):
    """Answers each export with `result` and counts the batches it was really given."""

    def __init__(self):
        self.result = SpanExportResult.FAILURE
        self.batches = 0

    def export(self, spans):
        self.batches += 1
        return self.result


def test_failed_exports_back_off_until_the_collector_answers():
    """After a failure, batches are dropped unsent (not encoded) for 2 s, then 4 s...; a success resets it."""
    now = [1000.0]
    inner = ScriptedExporter()
    exporter = BackoffExporter(inner, "http://collector:4318/v1/traces", clock=lambda: now[0])

    assert exporter.export(["a", "b"]) is SpanExportResult.FAILURE
    now[0] += 1.9
    assert exporter.export(["c"]) is SpanExportResult.FAILURE
    assert inner.batches == 1  # inside the first 2 s nothing is sent
    now[0] += 0.2
    exporter.export(["d"])
    now[0] += 3.9
    exporter.export(["e"])
    assert inner.batches == 2  # tried again after 2 s, then waits 4 s
    assert exporter.dropped == 5

    inner.result = SpanExportResult.SUCCESS
    now[0] += 0.2
    assert exporter.export(["f"]) is SpanExportResult.SUCCESS
    assert inner.batches == 3
    assert (exporter.backoff, exporter.dropped) == (0.0, 0)


@contextmanager
def otlp_app(make_app, endpoint: str, **overrides):
    """An app exporting over OTLP to `endpoint`, shut down at the end."""
    app = make_app(
        TRACING_ENABLED=True,
        TRACING_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="",
        **overrides,
    )
    try:
        yield app
    finally:
        tracer.shutdown(app)


def test_the_exporter_is_shut_down_once_even_when_the_collector_hangs(make_app, caplog):
    """Shutdown gives up on a hung collector without "Exporter already shutdown" or ERROR lines."""
    hung = OTLPReceiver(hang=True).start()
    caplog.set_level(logging.DEBUG)
    try:
        with otlp_app(make_app, hung.endpoint, TRACING_EXPORT_TIMEOUT=30) as app:
            assert app.test_client().get("/no-such-page").status_code == 404
            tracer.shutdown(app, timeout=0.2)  # the batch is still waiting on the collector
            tracing.shutdown_all()  # what the process does at exit
    finally:
        hung.stop()
    assert hung.requests >= 1
    assert not [r.getMessage() for r in caplog.records if "already shutdown" in r.getMessage()]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_missing_collector_is_one_warning_and_no_error(make_app, caplog):
    """No collector: one WARNING (with the exporter's reason) for the outage, no ERROR, nothing per batch."""
    caplog.set_level(logging.DEBUG)
    with otlp_app(make_app, f"http://127.0.0.1:{free_port()}") as app:
        client = app.test_client()
        for _ in range(3):
            client.get("/no-such-page")
            tracer.provider(app).force_flush()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings] == ["common_utils.tracing"]
    assert "Span export to" in warnings[0].getMessage()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r.getMessage() for r in caplog.records if "Failed to export" in r.getMessage()]


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_otel_sdk_disabled_switches_tracing_off(make_app, monkeypatch, value):
    """OTEL_SDK_DISABLED=true (any case) turns tracing off whatever TRACING_ENABLED says."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)
    assert tracer.state(make_app(TRACING_ENABLED=True)) is None


def test_otel_sdk_disabled_other_values_leave_tracing_on(make_app, monkeypatch):
    """Only "true" disables, as the specification says; anything else is false."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "no")
    assert tracer.state(make_app(TRACING_ENABLED=True, TRACING_EXPORTER="none")) is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("none", None), ("otlp", ["BackoffExporter"]), ("console", ["ConsoleSpanExporter"]),
     ("otlp,console", ["BackoffExporter", "ConsoleSpanExporter"]), ("console, none", ["ConsoleSpanExporter"])],
)
def test_otel_traces_exporter_takes_a_list(value, expected):
    """OTEL_TRACES_EXPORTER is otlp, console, none or a comma-separated list of them."""
    factory = tracing.make_exporter_factory(
        {"TRACING_EXPORTER": value, "JAEGER_HOST": "localhost", "TRACING_EXPORT_TIMEOUT": 1.0}
    )
    if expected is None:
        assert factory is None
        return
    exporter = factory()
    exporters = getattr(exporter, "exporters", [exporter])
    assert [type(e).__name__ for e in exporters] == expected
    exporter.shutdown()


@pytest.mark.parametrize(
    ("env", "seconds"),
    [({}, 1.0), ({"OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, 2.5),
     ({"OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "250"}, 0.25)],
)
def test_otlp_timeouts_are_milliseconds_and_the_traces_one_wins(make_app, monkeypatch, env, seconds):
    """OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT override TRACING_EXPORT_TIMEOUT, in milliseconds as specified."""
    for name in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = make_app(TRACING_ENABLED=True, TRACING_EXPORTER="none", TRACING_EXPORT_TIMEOUT=1.0)
    assert tracing.export_timeout(app.config) == seconds

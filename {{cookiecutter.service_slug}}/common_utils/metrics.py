"""Prometheus metrics at /metrics, via prometheus-flask-exporter.

Each app gets its own PrometheusMetrics (built with the guide's
`PrometheusMetrics.for_app_factory()`) and its own registry: a single
exporter bound to the global registry would refuse, or silently ignore,
a second app in the same process, which is exactly what tests create.

Label values never come from what a client sends, so no client can grow
/metrics (or the multiprocess files) by inventing URLs: requests are grouped
by route template (`url_rule`, such as `/api/v1/orders/<int:order_id>`), every
path no route matches shares the label UNMATCHED, and a method outside the
standard ones is counted as OTHER_METHOD in this module's counter and not by
the exporter's per-method series at all.

Under gunicorn every worker is a separate process, so the counters live in
files under PROMETHEUS_MULTIPROC_DIR and /metrics sums them over workers;
`gunicorn_on_starting` and `gunicorn_child_exit` keep that folder right.

The exporter's default series (flask_http_request_duration_seconds,
flask_http_request_total, flask_http_request_exceptions_total) keep their
names and labels, but this module records them: the exporter's own hooks
build two label dicts and look both series up on every request. Here one
after_request hook looks up the request's series once per route, method and
status, then does one histogram observe and two counter increments (each a
write to the worker's memory-mapped file). An unhandled exception is counted
from Flask's got_request_exception signal, which costs nothing on the
requests that raise none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from timeit import default_timer

from flask import Flask, Request, got_request_exception, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_flask_exporter import PrometheusMetrics

EXTENSION_KEY = "metrics"
UNMATCHED = "<unmatched>"
OTHER_METHOD = "<other>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Left in the multiprocess folder by gunicorn_on_starting: the folder is ours to empty.
MARKER = ".created-by-gunicorn-on-starting"
PREFIX = "flask"


def url_rule(req: Request) -> str:
    """The label a request is grouped by: its route template, never the raw path."""
    rule = req.url_rule
    return rule.rule if rule is not None else UNMATCHED


class Metrics:
    """Binds a fresh PrometheusMetrics to each app; call init_app after the routes exist."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> PrometheusMetrics | None:
        if not app.config.get("METRICS_ENABLED", True):
            return None
        service = app.config["SERVICE_NAME"]
        exporter = PrometheusMetrics.for_app_factory(
            registry=CollectorRegistry(auto_describe=True),
            default_labels={"service": service},
            export_defaults=False,  # recorded by record_requests, see the module docstring
            defaults_prefix=PREFIX,
        )
        exporter.init_app(app)
        exporter.info(
            f"{PREFIX}_exporter_info",
            "Information about the Prometheus Flask exporter",
            version=exporter.version,
        )
        record_requests(app, exporter, service)
        app.extensions[EXTENSION_KEY] = exporter
        return exporter

    @staticmethod
    def exporter(app: Flask) -> PrometheusMetrics | None:
        return app.extensions.get(EXTENSION_KEY)


def record_requests(app: Flask, exporter: PrometheusMetrics, service: str) -> None:
    """Request duration and counts by route template, method and status, plus by endpoint.

    - flask_http_request_duration_seconds{method, url_rule, status, service}
      and flask_http_request_total{method, status, service}: as the exporter
      records them, for methods in KNOWN_METHODS only (a made-up method would
      be a new series).
    - http_requests_by_endpoint_total{endpoint, method, status, service}: the
      endpoint name is stable across URL parameters and the method is one of
      KNOWN_METHODS or OTHER_METHOD (requests that match no route are not
      counted).
    - flask_http_request_exceptions_total{method, status, service}: requests
      that raised an exception no error handler took.

    A view marked with the exporter's `@metrics.do_not_track()` or
    `@metrics.exclude_all_metrics()` is left out, as the exporter would.
    """
    registry = exporter.registry
    duration = Histogram(
        f"{PREFIX}_http_request_duration_seconds",
        "Flask HTTP request duration in seconds",
        ("method", "url_rule", "status", "service"),
        registry=registry,
    )
    total = Counter(
        f"{PREFIX}_http_request_total",
        "Total number of HTTP requests",
        ("method", "status", "service"),
        registry=registry,
    )
    exceptions = Counter(
        f"{PREFIX}_http_request_exceptions_total",
        "Total number of HTTP requests which resulted in an exception",
        ("method", "status", "service"),
        registry=registry,
    )
    by_endpoint = Counter(
        "http_requests_by_endpoint",
        "Requests served, by endpoint, method and status",
        labelnames=("endpoint", "method", "status", "service"),
        registry=registry,
    )
    cache: dict[tuple, tuple] = {}

    def series(rule: str, endpoint: str | None, method: str, status: int) -> tuple:
        """The request's labelled series, looked up once per (rule, endpoint, method, status)."""
        known = method in KNOWN_METHODS
        return (
            duration.labels(method, rule, str(status), service) if known else None,
            total.labels(method, str(status), service) if known else None,
            by_endpoint.labels(endpoint, method if known else OTHER_METHOD, str(status), service)
            if endpoint is not None
            else None,
        )

    def start() -> None:
        # One context lookup, not a setattr through the proxy.
        request._get_current_object().prom_start_time = default_timer()

    def record(response):
        req = request._get_current_object()
        if hasattr(req, "prom_do_not_track") or hasattr(req, "prom_exclude_all"):
            return response
        rule = req.url_rule
        key = (
            rule.rule if rule is not None else UNMATCHED,
            req.endpoint,
            req.method,
            response.status_code,
        )
        found = cache.get(key)
        if found is None:
            found = cache[key] = series(*key)
        timed, counted, by_name = found
        if timed is not None:
            started = getattr(req, "prom_start_time", None)
            if started is not None:
                timed.observe(max(default_timer() - started, 0))
            counted.inc()
        if by_name is not None:
            by_name.inc()
        return response

    def count_exception(sender: Flask, exception: BaseException, **extra) -> None:
        if request.method in KNOWN_METHODS and not hasattr(request, "prom_exclude_all"):
            exceptions.labels(request.method, "500", service).inc()

    app.before_request(start)
    app.after_request(record)
    got_request_exception.connect(count_exception, app, weak=False)


def gunicorn_on_starting(server) -> None:
    """Start every gunicorn run with an empty multiprocess folder (stale files inflate counts).

    Only a folder this hook created, or found empty and took over (an emptyDir
    volume, say), is ever emptied: it carries MARKER. A folder holding files
    of its own (a mis-set PROMETHEUS_MULTIPROC_DIR=/app/data) stops start-up
    instead, untouched: the collector would read every *.db file in it.
    """
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    path = Path(folder)
    if path.is_dir() and not (path / MARKER).exists() and any(path.iterdir()):
        raise RuntimeError(
            f"{MULTIPROC_ENV}={folder} holds files this service did not create; point it at "
            "an empty or new folder (it is emptied at every start)"
        )
    if path.is_dir():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(
        "Prometheus multiprocess folder of this service's gunicorn; emptied at every start.\n"
    )


def gunicorn_child_exit(server, worker) -> None:
    """Let the multiprocess collector drop a dead worker's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

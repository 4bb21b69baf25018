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
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flask import Flask, Request, request
from prometheus_client import CollectorRegistry, Counter
from prometheus_flask_exporter import PrometheusMetrics

EXTENSION_KEY = "metrics"
UNMATCHED = "<unmatched>"
OTHER_METHOD = "<other>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Left in the multiprocess folder by gunicorn_on_starting: the folder is ours to empty.
MARKER = ".created-by-gunicorn-on-starting"


def url_rule(req: Request) -> str:
    """The label a request is grouped by: its route template, never the raw path."""
    rule = req.url_rule
    return rule.rule if rule is not None else UNMATCHED


def method_label() -> str:
    return request.method if request.method in KNOWN_METHODS else OTHER_METHOD


def skip_unknown_methods() -> None:
    """The exporter labels its series with the raw method: leave made-up ones out of them."""
    if request.method not in KNOWN_METHODS:
        request.prom_do_not_track = True


class Metrics:
    """Binds a fresh PrometheusMetrics to each app; call init_app after the routes exist."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> PrometheusMetrics | None:
        if not app.config.get("METRICS_ENABLED", True):
            return None
        exporter = PrometheusMetrics.for_app_factory(
            registry=CollectorRegistry(auto_describe=True),
            default_labels={"service": app.config["SERVICE_NAME"]},
            group_by=url_rule,
        )
        app.before_request(skip_unknown_methods)
        exporter.init_app(app)
        count_by_endpoint(app, exporter.registry, app.config["SERVICE_NAME"])
        app.extensions[EXTENSION_KEY] = exporter
        return exporter

    @staticmethod
    def exporter(app: Flask) -> PrometheusMetrics | None:
        return app.extensions.get(EXTENSION_KEY)


def count_by_endpoint(app: Flask, registry: CollectorRegistry, service: str) -> None:
    """http_requests_by_endpoint_total: requests by endpoint, method and status.

    The endpoint name is stable across URL parameters and the method is one
    of KNOWN_METHODS or OTHER_METHOD, so the labels stay low-cardinality
    (requests that match no route are not counted).
    Counted in an after_request hook, with each labelled series looked up
    once: prometheus-flask-exporter's own label functions have their
    signatures inspected on every request.
    """
    counter = Counter(
        "http_requests_by_endpoint",
        "Requests served, by endpoint, method and status",
        labelnames=("endpoint", "method", "status", "service"),
        registry=registry,
    )
    series = {}

    def count(response):
        endpoint = request.endpoint
        if endpoint is not None:
            key = (endpoint, method_label(), response.status_code)
            child = series.get(key)
            if child is None:
                child = series[key] = counter.labels(*key[:2], str(key[2]), service)
            child.inc()
        return response

    app.after_request(count)


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

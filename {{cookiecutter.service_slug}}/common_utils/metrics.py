"""Prometheus metrics at /metrics, via prometheus-flask-exporter.

Each app gets its own PrometheusMetrics (built with the guide's
`PrometheusMetrics.for_app_factory()`) and its own registry: a single
exporter bound to the global registry would refuse, or silently ignore,
a second app in the same process, which is exactly what tests create.

Under gunicorn every worker is a separate process, so the counters live in
files under PROMETHEUS_MULTIPROC_DIR and /metrics sums them over workers;
`gunicorn_on_starting` and `gunicorn_child_exit` keep that folder right.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flask import Flask, request
from prometheus_client import CollectorRegistry, Counter
from prometheus_flask_exporter import PrometheusMetrics

EXTENSION_KEY = "metrics"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
        )
        exporter.init_app(app)
        count_by_endpoint(app, exporter.registry, app.config["SERVICE_NAME"])
        app.extensions[EXTENSION_KEY] = exporter
        return exporter

    @staticmethod
    def exporter(app: Flask) -> PrometheusMetrics | None:
        return app.extensions.get(EXTENSION_KEY)


def count_by_endpoint(app: Flask, registry: CollectorRegistry, service: str) -> None:
    """http_requests_by_endpoint_total: requests by endpoint, method and status.

    The endpoint name is stable across URL parameters, so it stays a
    low-cardinality label (requests that match no route are not counted).
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
            key = (endpoint, request.method, response.status_code)
            child = series.get(key)
            if child is None:
                child = series[key] = counter.labels(*key[:2], str(key[2]), service)
            child.inc()
        return response

    app.after_request(count)


def gunicorn_on_starting(server) -> None:
    """Start every gunicorn run with an empty multiprocess folder (stale files inflate counts)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True, exist_ok=True)


def gunicorn_child_exit(server, worker) -> None:
    """Let the multiprocess collector drop a dead worker's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

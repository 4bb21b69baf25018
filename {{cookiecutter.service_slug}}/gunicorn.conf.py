"""gunicorn settings; every value can be overridden from the environment."""

import multiprocessing
import os
{%- if cookiecutter.use_metrics %}
import tempfile
{%- endif %}

from gunicorn.glogging import Logger

from common_utils.json_logging import configure_json_logging

bind = f"0.0.0.0:{os.environ.get('SERVICE_PORT', '{{ cookiecutter.service_port }}')}"
workers = int(os.environ.get("GUNICORN_WORKERS", min(2 * multiprocessing.cpu_count() + 1, 8)))
threads = int(os.environ.get("GUNICORN_THREADS", 4))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 20))
keepalive = 5
accesslog = None  # the app writes its own JSON access log with the request id
errorlog = "-"
wsgi_app = "main:app"


class JsonLogger(Logger):
    """gunicorn's own lines (master and workers) as the service's JSON lines on stdout."""

    def setup(self, cfg):
        super().setup(cfg)
        configure_json_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


logger_class = JsonLogger
{%- if cookiecutter.use_metrics %}

# Workers are separate processes: counters go to files in this folder and
# /metrics adds them up. It must be set before prometheus_client is first
# imported, hence the imports inside the hooks below. One folder per port, so
# two instances on one host never share (and empty) each other's.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"{{ cookiecutter.service_slug }}-metrics-{bind.rsplit(':', 1)[1]}"),
)


def on_starting(server):
    from common_utils.metrics import gunicorn_on_starting

    gunicorn_on_starting(server)


def child_exit(server, worker):
    from common_utils.metrics import gunicorn_child_exit

    gunicorn_child_exit(server, worker)
{%- endif %}
{%- if cookiecutter.use_service_registry %}


def when_ready(server):
    """Register with Consul once, in the master (workers share one host:port).

    It also makes the master deregister as soon as SIGTERM (or SIGINT,
    SIGQUIT) arrives, before closing the sockets and draining the requests
    in flight; compose's stop_grace_period is longer than graceful_timeout.
    """
    from common_utils.service_registry import gunicorn_when_ready
    from config import Config

    gunicorn_when_ready(server, vars(Config()))


def on_exit(server):
    """Deregister from Consul if a stop signal did not already; never when a worker is recycled."""
    from common_utils.service_registry import gunicorn_on_exit

    gunicorn_on_exit(server)
{%- endif %}
{%- if cookiecutter.use_tracing %}


def post_fork(server, worker):
    """Give each worker its own span export thread and HTTP session."""
    from common_utils.tracing import gunicorn_post_fork

    gunicorn_post_fork(server, worker)
{%- endif %}

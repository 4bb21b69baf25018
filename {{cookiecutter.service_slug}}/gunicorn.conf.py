"""gunicorn settings; every value can be overridden from the environment."""

import multiprocessing
import os
{%- if cookiecutter.use_metrics %}
import tempfile
{%- endif %}

bind = f"0.0.0.0:{os.environ.get('SERVICE_PORT', '{{ cookiecutter.service_port }}')}"
workers = int(os.environ.get("GUNICORN_WORKERS", min(2 * multiprocessing.cpu_count() + 1, 8)))
threads = int(os.environ.get("GUNICORN_THREADS", 4))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 20))
keepalive = 5
accesslog = None  # the app writes its own JSON access log with the request id
errorlog = "-"
wsgi_app = "main:app"
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
    """Register with Consul once, in the master: workers share one host:port."""
    from common_utils.service_registry import gunicorn_when_ready
    from config import Config

    gunicorn_when_ready(server, vars(Config()))


def on_exit(server):
    """Deregister from Consul when gunicorn stops (SIGTERM, SIGINT), not when a worker is recycled."""
    from common_utils.service_registry import gunicorn_on_exit

    gunicorn_on_exit(server)
{%- endif %}
{%- if cookiecutter.use_tracing %}


def post_fork(server, worker):
    """Give each worker its own span export thread and HTTP session."""
    from common_utils.tracing import gunicorn_post_fork

    gunicorn_post_fork(server, worker)
{%- endif %}

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
# imported, hence the imports inside the hooks below.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), "{{ cookiecutter.service_slug }}-metrics")
)


def on_starting(server):
    from common_utils.metrics import gunicorn_on_starting

    gunicorn_on_starting(server)


def child_exit(server, worker):
    from common_utils.metrics import gunicorn_child_exit

    gunicorn_child_exit(server, worker)
{%- endif %}

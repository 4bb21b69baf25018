"""The WSGI entry point: `gunicorn main:app` in containers, `flask run` locally."""

from app import create_app
{%- if cookiecutter.outbox != "none" %}
from app.events import processor as outbox_processor
{%- endif %}
{%- if cookiecutter.use_service_registry %}
from app.extensions import service_registry
{%- endif %}

app = create_app()
{%- if cookiecutter.outbox != "none" %}
# The guide's outbox relay thread, once per serving process (each gunicorn
# worker): started by the first request, so commands that import this module
# (`flask db upgrade`, `flask outbox relay`) run no relay thread of their own.
outbox_processor.start_relay_thread(app, on_first_request=True)
{%- endif %}

if __name__ == "__main__":
    # `python main.py`: the development server on SERVICE_PORT.
{%- if cookiecutter.use_service_registry %}
    service_registry.register_process(app)  # gunicorn and `flask run` register by themselves
{%- endif %}
    app.run(host="127.0.0.1", port=app.config["SERVICE_PORT"])

"""The WSGI entry point: `gunicorn main:app` in containers, `flask run` locally."""

from app import create_app

app = create_app()

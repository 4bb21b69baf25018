"""Liveness and readiness."""

from sqlalchemy.exc import OperationalError

from app.extensions import db
from common_utils.health import add_readiness_check


def test_liveness_reports_service_name(client, app):
    """/health answers 200 with the status and the service's name."""
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "healthy", "service": app.config["SERVICE_NAME"]}


def test_readiness_checks_database(client, app):
    """/health/ready is 200 with a passing database check when the database answers."""
    response = client.get("/health/ready")
    body = response.get_json()
    assert response.status_code == 200
    assert body["status"] == "ready"
    assert body["checks"]["database"]["status"] == "up"
    with app.app_context():
        assert body["checks"]["database"]["dialect"] == db.engine.dialect.name


def test_readiness_is_503_when_database_is_down(client, monkeypatch):
    """A failing database makes /health/ready 503 with the error in the check's detail."""

    def broken(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(db.session, "execute", broken)
    response = client.get("/health/ready")
    body = response.get_json()
    assert response.status_code == 503
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["status"] == "down"
    assert "connection refused" in body["checks"]["database"]["error"]


def test_non_critical_check_is_reported_but_does_not_fail_readiness(make_app):
    """A non-critical dependency that is down shows in the body and leaves the status 200."""
    app = make_app()

    def registry_down():
        raise ConnectionError("agent unreachable")

    add_readiness_check(app, "registry", registry_down, critical=False)
    response = app.test_client().get("/health/ready")
    registry = response.get_json()["checks"]["registry"]
    assert response.status_code == 200
    assert registry["status"] == "down"
    assert registry["critical"] is False
    assert registry["error"] == "ConnectionError: agent unreachable"


def test_liveness_does_not_touch_the_database(client, monkeypatch):
    """/health stays 200 while the database is down: liveness must not restart pods for it."""

    def broken(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("down"))

    monkeypatch.setattr(db.session, "execute", broken)
    assert client.get("/health").status_code == 200

"""Liveness and readiness."""

import threading

from sqlalchemy.exc import OperationalError

from app.extensions import db
from common_utils.health import add_readiness_check
from tests.conftest import captured_log_lines


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
    """A failing database makes /health/ready 503; the body names the check, not the driver's error."""

    def broken(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(db.session, "execute", broken)
    response = client.get("/health/ready")
    body = response.get_json()
    assert response.status_code == 503
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["status"] == "down"
    assert body["checks"]["database"]["error"] == "check_failed"
    assert "connection refused" not in response.get_data(as_text=True)


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
    assert registry["error"] == "check_failed"


def test_liveness_does_not_touch_the_database(client, monkeypatch):
    """/health stays 200 while the database is down: liveness must not restart pods for it."""

    def broken(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("down"))

    monkeypatch.setattr(db.session, "execute", broken)
    assert client.get("/health").status_code == 200


class HungCheck:
    """A check that blocks until released (or `limit` seconds), counting its runs."""

    def __init__(self, limit: float = 5.0):
        self.limit = limit
        self.release = threading.Event()
        self.started = 0

    def __call__(self):
        self.started += 1
        self.release.wait(self.limit)
        return {}


def test_hung_checks_are_abandoned_at_the_budget(make_app):
    """Every dependency hung: each check starts at once and is reported as a timeout when the budget ends."""
    app = make_app(READINESS_TIMEOUT=0.2)
    database, cache = HungCheck(), HungCheck()
    add_readiness_check(app, "database", database)
    add_readiness_check(app, "cache", cache, critical=False)
    try:
        response = app.test_client().get("/health/ready")
        # Answered while both checks still hang: nobody waited for either of them.
        assert not database.release.is_set()
        assert not cache.release.is_set()
    finally:
        database.release.set()
        cache.release.set()
    body = response.get_json()
    assert response.status_code == 503
    assert body["checks"]["database"] == {"status": "down", "critical": True, "error": "timeout"}
    assert body["checks"]["cache"] == {"status": "down", "critical": False, "error": "timeout"}
    assert (database.started, cache.started) == (1, 1)


def test_a_hung_check_is_not_started_again_while_it_runs(make_app):
    """Each probe during a hang reports it; the hung check holds one thread, not one per probe."""
    app = make_app(READINESS_TIMEOUT=0.05)
    hung = HungCheck()
    add_readiness_check(app, "cache", hung, critical=False)
    client = app.test_client()
    try:
        for _ in range(3):
            assert client.get("/health/ready").get_json()["checks"]["cache"]["error"] == "timeout"
    finally:
        hung.release.set()
    assert hung.started == 1


def test_the_answer_is_cached_briefly(make_app):
    """Probes within READINESS_CACHE_TTL share one round of checks."""
    app = make_app(READINESS_CACHE_TTL=60)
    runs = []
    add_readiness_check(app, "counted", lambda: runs.append(1) or {})
    client = app.test_client()
    assert client.get("/health/ready").status_code == 200
    assert client.get("/health/ready").status_code == 200
    assert len(runs) == 1


def test_error_details_go_to_the_log_with_the_request_id(make_app):
    """The body says check_failed; the log says why, once, with the request id of the probe."""
    app = make_app()

    def cache_down():
        raise ConnectionError("redis.internal:6379 refused")

    add_readiness_check(app, "cache", cache_down, critical=False)
    client = app.test_client()
    with captured_log_lines() as log_lines:
        response = client.get("/health/ready", headers={"X-Request-ID": "probe-1"})
        client.get("/health/ready", headers={"X-Request-ID": "probe-2"})

    assert "redis.internal" not in response.get_data(as_text=True)
    logged = [line for line in log_lines() if "redis.internal" in line["message"]]
    assert [(line["level"], line["request_id"]) for line in logged] == [("WARNING", "probe-1")]

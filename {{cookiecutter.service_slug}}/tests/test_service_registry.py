"""Consul registration and discovery, against a local stand-in for the agent's HTTP API."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from app.extensions import service_registry
from common_utils import service_registry as registry_module
from common_utils.service_registry import (
    NoHealthyInstanceError,
    Registrar,
    Registration,
    consul_client,
    instance_id,
    process_registrar,
)
from tests.consul_stand_in import ConsulStandIn, HungServer, free_port, wait_for


@pytest.fixture
def consul():
    stand_in = ConsulStandIn().start()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def hung_agent():
    server = HungServer()
    yield server
    server.stop()


@pytest.fixture
def registry_app(make_app, consul):
    """An app whose agent is the stand-in."""

    def build(**overrides):
        # A busy test machine may take a while to answer: discovery's own deadline is tested apart.
        settings = {"CONSUL_HOST": "127.0.0.1", "CONSUL_PORT": consul.port, "SERVICE_DISCOVERY_TIMEOUT": 10, **overrides}
        return make_app(**settings)

    return build


def registrar_for(app, resync_interval: float = 15.0, **overrides) -> Registrar:
    config = {**app.config, **overrides}
    return Registrar(
        consul_client(config),
        Registration.from_config(config),
        agent=f"{config['CONSUL_HOST']}:{config['CONSUL_PORT']}",
        max_delay=0.5,
        resync_interval=resync_interval,
    )


def test_register_payload_is_exact(registry_app, consul):
    """The agent receives id, name, address, port, tags, meta and an HTTP check on /health/ready.

    Readiness, not liveness: an instance whose database is down fails the
    check and leaves discovery until it is ready again.
    """
    app = registry_app(SERVICE_ADDRESS="10.1.2.3", SERVICE_PORT=5050, SERVICE_TAGS=["team-a"])
    registrar = registrar_for(app)

    assert registrar.register_once()

    [call] = consul.registrations()
    name, version = app.config["SERVICE_NAME"], app.config["SERVICE_VERSION"]
    api_versions = [app.config["API_VERSION"]] if "API_VERSION" in app.config else []
    meta = {"version": version, "environment": app.config["ENVIRONMENT"]}
    if api_versions:
        meta["api_versions"] = ",".join(api_versions)
    assert call.body == {
        "name": name,
        "id": f"{name}-{socket.gethostname()}-5050",
        "address": "10.1.2.3",
        "port": 5050,
        "tags": [f"version={version}", *(f"api-{v}" for v in api_versions), "team-a"],
        "meta": meta,
        "checks": [
            {
                "http": "http://10.1.2.3:5050/health/ready",
                "interval": "10s",
                "timeout": "5s",
                "DeregisterCriticalServiceAfter": "1m",
            }
        ],
    }


def test_token_is_sent_to_the_agent(registry_app, consul):
    """CONSUL_TOKEN goes to the agent in the X-Consul-Token header (ACLs)."""
    acl = "test-acl-secret"
    registrar = registrar_for(registry_app(CONSUL_TOKEN=acl))
    assert registrar.register_once()
    assert consul.registrations()[0].headers["X-Consul-Token"] == acl


def test_stop_deregisters_the_instance(registry_app, consul):
    """stop() removes exactly the registered id from the agent, and only once."""
    registrar = registrar_for(registry_app(SERVICE_ID="orders-1"))
    registrar.start()
    wait_for(lambda: registrar.registered, 5, "registration")

    registrar.stop()
    registrar.stop()

    assert [call.path for call in consul.deregistrations()] == ["/v1/agent/service/deregister/orders-1"]
    assert consul.services == {}
    assert not registrar.registered


def test_registration_is_retried_until_consul_comes_up(registry_app):
    """With the agent down at start, registration is retried in the background and succeeds later."""
    late = ConsulStandIn(port=free_port())  # not listening yet
    app = registry_app(CONSUL_PORT=late.port, SERVICE_ID="orders-late")
    registrar = registrar_for(app)
    registrar.start()
    try:
        wait_for(lambda: registrar.attempts >= 2, 5, "two failed attempts")
        assert not registrar.registered
        assert "ConnectionError" in registrar.last_error

        late.start()
        wait_for(lambda: registrar.registered, 5, "registration once the agent is up")
        assert list(late.services) == ["orders-late"]
        assert len(late.registrations()) == 1
    finally:
        registrar.stop()
        late.stop()


def test_registration_is_kept_when_the_agent_restarts_empty(registry_app, consul):
    """An agent restarted with nothing kept (compose runs `consul agent -dev`) gets the instance back."""
    app = registry_app(SERVICE_ID="orders-kept")
    registrar = registrar_for(app, resync_interval=0.05)
    registrar.start()
    try:
        wait_for(lambda: "orders-kept" in consul.services, 5, "the first registration")
        consul.forget()
        wait_for(lambda: "orders-kept" in consul.services, 5, "registration after the agent forgot it")
        assert len(consul.registrations()) == 2
    finally:
        registrar.stop()


def test_an_absent_agent_is_logged_once_then_quietly_retried(registry_app, caplog):
    """One WARNING when the agent cannot be reached, none for each retry, INFO once it answers."""
    late = ConsulStandIn(port=free_port())  # not listening yet
    registrar = registrar_for(registry_app(CONSUL_PORT=late.port, SERVICE_ID="orders-quiet"))
    caplog.set_level("DEBUG", logger=registry_module.__name__)
    registrar.start()
    try:
        wait_for(lambda: registrar.attempts >= 3, 10, "three failed attempts")
        late.start()
        wait_for(lambda: registrar.registered, 10, "registration once the agent is up")
    finally:
        registrar.stop()
        late.stop()
    ours = [r for r in caplog.records if r.name == registry_module.__name__]
    assert [r.levelname for r in ours if r.levelno >= logging.WARNING] == ["WARNING"]
    assert any(r.levelname == "INFO" and "Registered orders-quiet" in r.getMessage() for r in ours)


def test_consul_down_does_not_stop_the_app(make_app):
    """With no agent listening the app starts and serves; readiness shows the registry down, non-critically."""
    port = free_port()
    app = make_app(CONSUL_HOST="127.0.0.1", CONSUL_PORT=port)
    client = app.test_client()

    assert client.get("/health").status_code == 200
    response = client.get("/health/ready")
    check = response.get_json()["checks"]["service_registry"]
    assert response.status_code == 200
    assert check["status"] == "down"
    assert check["critical"] is False
    assert check["error"] == "check_failed"  # the agent's address: in the log, not the body


def test_readiness_reports_an_instance_the_agent_knows(registry_app, consul):
    """In a gunicorn worker, readiness asks the agent whether this instance's id is registered."""
    app = registry_app(SERVICE_ID="orders-in-consul")
    client = app.test_client()
    pending = client.get("/health/ready").get_json()["checks"]["service_registry"]
    assert pending["status"] == "down"
    assert pending["error"] == "check_failed"

    consul.services["orders-in-consul"] = {"name": "orders", "id": "orders-in-consul"}
    check = client.get("/health/ready").get_json()["checks"]["service_registry"]
    assert check["status"] == "up"
    assert check["registered"] is True
    assert check["service_id"] == "orders-in-consul"


def test_readiness_with_auto_register_off_does_not_call_consul(registry_app, consul):
    """AUTO_REGISTER_SERVICE=false: the check says so and never contacts the agent."""
    app = registry_app(AUTO_REGISTER_SERVICE=False)
    check = app.test_client().get("/health/ready").get_json()["checks"]["service_registry"]
    assert check["status"] == "up"
    assert check["auto_register"] is False
    assert consul.requests == []


def test_creating_the_app_never_registers(registry_app, consul):
    """Building the app (import, tests, other commands) registers nothing, even with AUTO_REGISTER_SERVICE on."""
    app = registry_app(AUTO_REGISTER_SERVICE=True)
    app.test_client().get("/health")
    time.sleep(0.3)
    assert consul.registrations() == []
    assert process_registrar() is None


def test_instance_id_defaults_to_name_host_and_port(make_app):
    """Without SERVICE_ID the id is <name>-<hostname>-<port>: unique per instance, stable across restarts."""
    app = make_app(SERVICE_ID="", SERVICE_PORT=6001)
    assert instance_id(app.config) == f"{app.config['SERVICE_NAME']}-{socket.gethostname()}-6001"


def test_forked_child_does_not_deregister(registry_app, consul, monkeypatch):
    """A gunicorn worker inherits the master's registrar (and its atexit hook) but must not deregister."""
    registrar = registrar_for(registry_app(SERVICE_ID="orders-master"))
    assert registrar.register_once()
    monkeypatch.setattr(registry_module.os, "getpid", lambda: -1)  # "another process"

    registrar.stop()

    assert consul.deregistrations() == []
    assert "orders-master" in consul.services


def test_resolve_picks_only_passing_instances_and_spreads_calls(registry_app, consul):
    """resolve() asks for passing instances only and goes round-robin over them."""
    consul.add_instance("payments", "10.0.0.1", 8080)
    consul.add_instance("payments", "10.0.0.2", 8080)
    consul.add_instance("payments", "10.0.0.3", 8080, status="critical")
    app = registry_app()

    with app.app_context():
        urls = [service_registry.resolve("payments") for _ in range(6)]

    assert sorted(set(urls)) == ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
    assert urls.count("http://10.0.0.1:8080") == 3
    assert urls[0] != urls[1]
    [query] = consul.calls("GET", "/v1/health/service/payments")
    assert query.query.get("passing") == "1"


def test_resolve_caches_briefly(registry_app, consul):
    """Lookups within SERVICE_DISCOVERY_CACHE_TTL reuse one answer; after it Consul is asked again."""
    consul.add_instance("payments", "10.0.0.1", 8080)
    app = registry_app(SERVICE_DISCOVERY_CACHE_TTL=0.3)

    for _ in range(5):
        service_registry.resolve("payments", app=app)
    assert len(consul.calls("GET", "/v1/health/service/payments")) == 1

    time.sleep(0.35)
    service_registry.resolve("payments", app=app)
    assert len(consul.calls("GET", "/v1/health/service/payments")) == 2


def test_resolve_raises_a_clear_error_when_none_is_healthy(registry_app, consul):
    """With only failing instances resolve() raises NoHealthyInstanceError naming the service (a 503)."""
    consul.add_instance("payments", "10.0.0.3", 8080, status="critical")
    app = registry_app()

    with pytest.raises(NoHealthyInstanceError) as raised:
        service_registry.resolve("payments", app=app)

    assert raised.value.code == 503
    assert "No healthy instance of 'payments'" in raised.value.description
    assert "no instance passes its checks" in raised.value.description


def test_resolve_uses_the_last_known_instances_while_consul_is_down(registry_app, consul):
    """An expired list beats no answer when the agent is unreachable; with none, the error says why."""
    consul.add_instance("payments", "10.0.0.1", 8080)
    app = registry_app(SERVICE_DISCOVERY_CACHE_TTL=0.0)
    assert service_registry.resolve("payments", app=app) == "http://10.0.0.1:8080"

    consul.stop()

    assert service_registry.resolve("payments", app=app) == "http://10.0.0.1:8080"
    with pytest.raises(NoHealthyInstanceError, match="unreachable"):
        service_registry.resolve("inventory", app=app)


def test_unhandled_discovery_error_is_a_json_503(registry_app, consul):
    """A view that lets NoHealthyInstanceError escape answers 503 in the service's error shape, not 500."""
    app = registry_app()
    app.add_url_rule("/calls-payments", "calls_payments", lambda: service_registry.resolve("payments"))

    response = app.test_client().get("/calls-payments")

    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "dependency_unavailable"
    assert error["details"] == {"service": "payments"}


def test_a_configured_url_is_used_without_asking_consul(registry_app, consul):
    """DOWNSTREAM_SERVICES names the URL: resolve() answers with it and never calls the agent."""
    consul.add_instance("payments", "10.0.0.1", 8080)
    app = registry_app(DOWNSTREAM_SERVICES={"payments": "http://payments.internal:8080"})
    assert [service_registry.resolve("payments", app=app) for _ in range(3)] == ["http://payments.internal:8080"] * 3
    assert consul.requests == []


@pytest.mark.parametrize("timeout", [0.05, None], ids=["caller's deadline", "SERVICE_DISCOVERY_TIMEOUT"])
def test_a_hung_agent_is_abandoned_at_the_deadline_and_the_failure_remembered(
    registry_app, hung_agent, monkeypatch, timeout
):
    """With an agent that accepts and never answers, resolve() gives up at its deadline, not the client's 30 s.

    It fails while its query is still waiting on the agent (abandoned, not
    timed out by the HTTP client); the next caller fails at once, without a
    second query, while the failure is remembered.
    """
    monkeypatch.setattr(registry_module, "FAILED_LOOKUP_TTL", 60.0)
    app = registry_app(CONSUL_PORT=hung_agent.port, CONSUL_TIMEOUT=30, SERVICE_DISCOVERY_TIMEOUT=0.05)

    with pytest.raises(NoHealthyInstanceError):
        service_registry.resolve("payments", app=app, timeout=timeout)
    assert wait_for(hung_agent.open_connections, 5, "the query to reach the agent") == 1  # still waiting

    with pytest.raises(NoHealthyInstanceError):
        service_registry.resolve("payments", app=app, timeout=timeout)
    assert len(hung_agent.connections) == 1


def test_the_last_known_list_is_kept_while_the_agent_hangs(registry_app, consul, monkeypatch):
    """An expired list beats no answer: used, and remembered, while the agent does not answer."""
    monkeypatch.setattr(registry_module, "FAILED_LOOKUP_TTL", 60.0)
    consul.add_instance("payments", "10.0.0.1", 8080)
    app = registry_app(SERVICE_DISCOVERY_CACHE_TTL=0.0)
    assert service_registry.resolve("payments", app=app) == "http://10.0.0.1:8080"

    consul.stop()
    hung = HungServer()
    app.config["CONSUL_PORT"] = hung.port
    service_registry.state(app).client = registry_module.consul_client({**app.config, "CONSUL_TIMEOUT": 30})
    try:
        assert service_registry.resolve("payments", app=app, timeout=0.05) == "http://10.0.0.1:8080"
        assert service_registry.resolve("payments", app=app, timeout=0.05) == "http://10.0.0.1:8080"
        assert len(wait_for(lambda: hung.connections, 5, "the query to reach the agent")) == 1
    finally:
        hung.stop()

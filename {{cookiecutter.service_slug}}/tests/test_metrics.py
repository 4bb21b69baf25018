"""Prometheus metrics at /metrics, one registry per app."""

from prometheus_client.parser import text_string_to_metric_families


def samples(client, name: str) -> dict:
    text = client.get("/metrics").get_data(as_text=True)
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def endpoint_count(client, endpoint: str) -> float:
    return sum(
        value
        for labels, value in samples(client, "http_requests_by_endpoint_total").items()
        if ("endpoint", endpoint) in labels
    )


def test_metrics_endpoint_serves_prometheus_text(client):
    """/metrics answers in the Prometheus text format."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    assert "flask_http_request_total" in response.get_data(as_text=True)


def test_per_endpoint_counter_counts_requests(make_app):
    """Each request to an endpoint adds one to its counter, with method and status labels."""
    client = make_app().test_client()
    for _ in range(3):
        client.get("/health")
    series = samples(client, "http_requests_by_endpoint_total")
    key = tuple(sorted({"endpoint": "health.liveness", "method": "GET", "status": "200", "service": client.application.config["SERVICE_NAME"]}.items()))
    assert series[key] == 3


def test_two_apps_count_separately(make_app):
    """Two apps in one process each have their own registry, and both count."""
    first, second = make_app().test_client(), make_app().test_client()
    first.get("/health")
    second.get("/health")
    second.get("/health")
    assert endpoint_count(first, "health.liveness") == 1
    assert endpoint_count(second, "health.liveness") == 2


def test_metrics_can_be_switched_off(make_app):
    """METRICS_ENABLED=false leaves no /metrics endpoint."""
    client = make_app(METRICS_ENABLED=False).test_client()
    assert client.get("/metrics").status_code == 404

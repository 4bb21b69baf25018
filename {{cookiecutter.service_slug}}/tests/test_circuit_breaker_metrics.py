"""Circuit breaker states on /metrics (projects with both the breaker and metrics)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common_utils.circuit_breaker import CircuitBreakers


class Boom(Exception):
    pass


def gauge_value(metrics_text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "circuit_breaker_state" and sample.labels.get("name") == name:
                return sample.value
    return None


def test_breaker_state_is_exported_as_a_gauge(make_app):
    """circuit_breaker_state{name} is 0 while closed and 2 once the breaker has opened."""
    app = make_app(CIRCUIT_BREAKER_FAILURE_THRESHOLD=1)
    breaker = CircuitBreakers().get("payments", app)
    client = app.test_client()
    assert gauge_value(client.get("/metrics").get_data(as_text=True), "payments") == 0

    def fail():
        raise Boom("down")

    with pytest.raises(Boom):
        breaker.call(fail)
    assert gauge_value(client.get("/metrics").get_data(as_text=True), "payments") == 2

"""Prometheus metrics at /metrics, one registry per app."""

import os
import runpy
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common_utils.metrics import gunicorn_on_starting

PROJECT = Path(__file__).resolve().parent.parent
# Requests to invented URLs in the cardinality test; METRICS_JUNK_REQUESTS=1000 (or more) tries harder.
JUNK_REQUESTS = int(os.environ.get("METRICS_JUNK_REQUESTS", "400"))


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


def test_gunicorn_start_never_wipes_a_folder_it_did_not_create(monkeypatch, tmp_path):
    """A mis-set PROMETHEUS_MULTIPROC_DIR (say, the data folder) is refused, and its files stay."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "orders.db").write_text("the user's own data")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(data))
    with pytest.raises(RuntimeError, match=r"PROMETHEUS_MULTIPROC_DIR.*did not create"):
        gunicorn_on_starting(None)
    assert (data / "orders.db").read_text() == "the user's own data"


def test_gunicorn_start_empties_its_own_folder(monkeypatch, tmp_path):
    """A folder made (or found empty) by an earlier start is emptied of stale counters at the next."""
    folder = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    gunicorn_on_starting(None)
    (folder / "counter_4242.db").write_bytes(b"stale")
    gunicorn_on_starting(None)
    assert [path.name for path in folder.iterdir() if path.suffix == ".db"] == []
    mounted = tmp_path / "empty-volume"  # an emptyDir, say: empty, so it is taken over
    mounted.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mounted))
    gunicorn_on_starting(None)
    (mounted / "gauge_livesum_7.db").write_bytes(b"stale")
    gunicorn_on_starting(None)
    assert not (mounted / "gauge_livesum_7.db").exists()


def test_instances_on_one_host_get_their_own_default_folder(monkeypatch):
    """Without PROMETHEUS_MULTIPROC_DIR, gunicorn's default folder differs per port."""
    folders = set()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # restored (unset) after the test
    for port in ("5001", "5002"):
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        monkeypatch.setenv("SERVICE_PORT", port)
        runpy.run_path(str(PROJECT / "gunicorn.conf.py"))
        folders.add(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert len(folders) == 2, folders


def series_count(client) -> int:
    text = client.get("/metrics").get_data(as_text=True)
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


def test_invented_urls_and_methods_add_no_series(make_app, collection_url):
    """Requests to made-up paths, item ids and methods leave the number of series unchanged."""
    # Tracing and limits (ignored where absent) only make the 1,000 requests slower.
    client = make_app(TRACING_ENABLED=False, RATELIMIT_ENABLED=False).test_client()

    def junk(n: int):
        kind = n % 20
        if kind < 17:
            return client.get(f"/junk/{n}/x{n * 7919}")  # no route at all
        if kind < 19:
            return client.get(f"{collection_url}/{100000 + n}")  # a route, an id that does not exist
        return client.open("/health", method=f"X{'ABCDEFGHIJ'[n % 7]}{n}")  # a method nobody uses

    for n in range(20):  # every kind once: the series they need exist now
        junk(n)
    series_count(client)  # and the scrape's own
    before = series_count(client)
    for n in range(20, 20 + JUNK_REQUESTS):
        assert junk(n).status_code in (404, 405)
    after = series_count(client)
    print(f"\nmetrics series: {before} before, {after} after {JUNK_REQUESTS} invented URLs, ids and methods")
    assert after == before
    labels = {key for key in samples(client, "flask_http_request_duration_seconds_count")}
    rules = {dict(key)["url_rule"] for key in labels}
    assert "<unmatched>" in rules
    assert not [rule for rule in rules if "junk" in rule or "100020" in rule]
    assert {dict(key)["method"] for key in samples(client, "http_requests_by_endpoint_total")} <= {
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "<other>",
    }

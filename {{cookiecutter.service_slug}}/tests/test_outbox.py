"""The transactional outbox: atomic events, the guide's processor API, retries, order, operations."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
{%- if cookiecutter.use_metrics %}
from prometheus_client.parser import text_string_to_metric_families
{%- endif %}
from sqlalchemy import select

from app.events import processor
from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from common_utils.outbox import FAILED, PENDING, PROCESSED, OutboxEvent, utcnow
from common_utils.outbox.consumer import ProcessedMessage, idempotent_consumer
from common_utils.outbox.relay import OutboxSettings, backoff_delay
from tests.outbox_support import (
    Recorder,
    check_once_and_in_order,
    outbox_app_with,
    registered_handler,
    wait_until,
    write_streams,
)

CREATED = "{{ cookiecutter.resource_name }}.created"
UPDATED = "{{ cookiecutter.resource_name }}.updated"
DELETED = "{{ cookiecutter.resource_name }}.deleted"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def outbox_app(app, make_app):
    """An app whose relay runs the in-process handlers, with fast retries."""
    with outbox_app_with(
        make_app, OUTBOX_TRANSPORT="in_process", OUTBOX_BACKOFF_BASE=0.01, OUTBOX_BACKOFF_MAX=0.05, OUTBOX_MAX_RETRY=3
    ) as built:
        yield built


def all_events(app) -> list[OutboxEvent]:
    with app.app_context():
        events = db.session.scalars(select(OutboxEvent).order_by(OutboxEvent.position)).all()
        db.session.expunge_all()
        return events


def drain(app, rounds: int = 50) -> int:
    """Run process_pending_events until nothing more is processed."""
    total = 0
    with app.app_context():
        for _ in range(rounds):
            processed = processor.process_pending_events(limit=100)
            total += processed
            if processed == 0:
                break
    return total


def add_event(app, aggregate_id: str, seq: int, **values) -> str:
    with app.app_context():
        event = OutboxEvent.create_event(db.session, "test.happened", "test", aggregate_id, {"seq": seq})
        for name, value in values.items():
            setattr(event, name, value)
        db.session.commit()
        return event.id


# -- atomicity -----------------------------------------------------------------


def test_creating_writes_a_created_event_with_the_resource_as_payload(outbox_app, collection_url, new_item):
    """POST writes one `created` event whose payload is the resource as the API returns it."""
    response = outbox_app.test_client().post(collection_url, json=new_item)
    assert response.status_code == 201
    [event] = all_events(outbox_app)
    assert (event.event_type, event.aggregate_type, event.aggregate_id) == (CREATED, "{{ cookiecutter.resource_name }}", str(response.json["id"]))
    # (MySQL keeps the resource's timestamps to the second, the payload has them as written.)
    assert {key: value for key, value in event.data.items() if not key.endswith("_at")} == {
        key: value for key, value in response.json.items() if not key.endswith("_at")
    }
    assert event.data["created_at"][:19] == response.json["created_at"][:19]
    assert event.status == PENDING
    assert event.retry_count == 0


def test_update_and_delete_write_events_in_commit_order(outbox_app, collection_url, new_item):
    """PATCH then DELETE write `updated` then `deleted`; the deleted payload is the last state."""
    client = outbox_app.test_client()
    item_id = client.post(collection_url, json=new_item).json["id"]
    assert client.patch(f"{collection_url}/{item_id}", json={"quantity": 42}).status_code == 200
    assert client.delete(f"{collection_url}/{item_id}").status_code == 204
    events = all_events(outbox_app)
    assert [event.event_type for event in events] == [CREATED, UPDATED, DELETED]
    assert events[0].position < events[1].position < events[2].position
    assert events[1].data["quantity"] == 42
    assert events[2].data["quantity"] == 42
    assert {event.ordering_key for event in events} == {f"{{ cookiecutter.resource_name }}:{item_id}"}


def test_a_rolled_back_transaction_leaves_no_event(outbox_app):
    """The event is written by the flush, so a rollback removes it with the row."""
    with outbox_app.app_context():
        db.session.add({{ cookiecutter.__resource_class }}(name="never committed"))
        db.session.flush()
        assert db.session.scalar(select(OutboxEvent.event_type)) == CREATED  # visible inside
        db.session.rollback()
    assert all_events(outbox_app) == []


def test_a_failed_commit_writes_no_event(outbox_app, collection_url, new_item):
    """A write refused by the database (409 duplicate name) leaves no event behind."""
    client = outbox_app.test_client()
    assert client.post(collection_url, json=new_item).status_code == 201
    assert client.post(collection_url, json=new_item).status_code == 409
    assert [event.event_type for event in all_events(outbox_app)] == [CREATED]


def test_an_update_that_changes_nothing_writes_no_event(outbox_app, collection_url, new_item):
    """Setting a field to its current value is not a change and publishes nothing."""
    client = outbox_app.test_client()
    item_id = client.post(collection_url, json=new_item).json["id"]
    assert client.patch(f"{collection_url}/{item_id}", json={"quantity": new_item["quantity"]}).status_code == 200
    assert [event.event_type for event in all_events(outbox_app)] == [CREATED]


def test_create_event_joins_the_session_transaction(outbox_app):
    """OutboxEvent.create_event is written on commit and discarded on rollback."""
    with outbox_app.app_context():
        OutboxEvent.create_event(db.session, "payment.failed", "payment", 7, {"amount": "9.99"})
        db.session.rollback()
        OutboxEvent.create_event(db.session, "payment.settled", "payment", 7, {"amount": "9.99"})
        db.session.commit()
    [event] = all_events(outbox_app)
    assert (event.event_type, event.aggregate_id, event.data) == ("payment.settled", "7", {"amount": "9.99"})


def test_outbox_disabled_writes_no_events(app, make_app, collection_url, new_item):
    """OUTBOX_ENABLED=false: the model writes no events."""
    disabled = make_app(OUTBOX_ENABLED=False)
    assert disabled.test_client().post(collection_url, json=new_item).status_code == 201
    assert all_events(disabled) == []


# -- the guide's processor -------------------------------------------------------


def test_process_pending_events_runs_handlers_and_marks_events_processed(outbox_app, collection_url, new_item):
    """The guide's API: handlers get (aggregate_id, payload, event); the count is returned."""
    calls = []
    item_id = outbox_app.test_client().post(collection_url, json=new_item).json["id"]
    with registered_handler(CREATED, lambda aggregate_id, payload, event: calls.append((aggregate_id, payload["name"], event.id))):
        assert drain(outbox_app) == 1
    [event] = all_events(outbox_app)
    assert calls == [(str(item_id), new_item["name"], event.id)]
    assert event.status == PROCESSED
    assert event.processed_at is not None
    assert event.error is None


def test_events_without_a_handler_are_marked_processed(outbox_app):
    """With no handler for its type an event is done, as in the guide."""
    add_event(outbox_app, "a", 0)
    assert drain(outbox_app) == 1
    assert [event.status for event in all_events(outbox_app)] == [PROCESSED]


def test_a_failing_event_is_retried_with_backoff_then_dead_lettered(outbox_app):
    """After OUTBOX_MAX_RETRY failed attempts the event is `failed` with its error; others flow."""

    def poison(aggregate_id, payload, event):
        if aggregate_id == "poison":
            raise ValueError("cannot handle this one")

    poison_id = add_event(outbox_app, "poison", 0)
    other_ids = [add_event(outbox_app, f"fine-{index}", 0) for index in range(3)]
    with registered_handler("test.happened", poison), outbox_app.app_context():
        state = outbox_app.extensions["outbox"]
        assert processor.process_pending_events() == 3  # the others go through at once
        first = db.session.get(OutboxEvent, all_events(outbox_app)[0].position)
        assert (first.status, first.retry_count) == (PENDING, 1)
        assert first.next_attempt_at > utcnow() - timedelta(seconds=1)
        db.session.rollback()
        wait_until(lambda: state.run_batch().dead_lettered, timeout=5, what="the dead letter")
    events = {event.id: event for event in all_events(outbox_app)}
    assert events[poison_id].status == FAILED
    assert events[poison_id].retry_count == 3
    assert "ValueError: cannot handle this one" in events[poison_id].error
    assert all(events[event_id].status == PROCESSED for event_id in other_ids)


def test_a_failing_event_holds_back_its_aggregate_only(outbox_app):
    """Later events of the failing aggregate wait; other aggregates are not delayed."""
    calls = []

    def handler(aggregate_id, payload, event):
        if aggregate_id == "stuck" and payload["seq"] == 0:
            raise RuntimeError("not yet")
        calls.append((aggregate_id, payload["seq"]))

    for seq in range(3):
        add_event(outbox_app, "stuck", seq)
        add_event(outbox_app, "free", seq)
    with registered_handler("test.happened", handler):
        drain(outbox_app)
    assert calls == [("free", 0), ("free", 1), ("free", 2)]
    statuses = [(event.aggregate_id, event.status) for event in all_events(outbox_app) if event.aggregate_id == "stuck"]
    assert statuses == [("stuck", PENDING)] * 3


def test_requeue_needs_to_be_told_which_events(outbox_app):
    """`flask outbox requeue` with no selection is a usage error, not a requeue of everything."""
    result = outbox_app.test_cli_runner().invoke(args=["outbox", "requeue"])
    assert result.exit_code == 2
    assert "--all" in result.output


def test_backoff_is_exponential_with_jitter_and_capped():
    """Attempt n waits between half and all of base * 2**(n-1), never more than the cap."""
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (20, 60.0)]:
        delays = {backoff_delay(attempt, base=1.0, cap=60.0) for _ in range(50)}
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(delays) > 1  # jittered


def test_an_unknown_transport_is_refused_at_start():
    """OUTBOX_TRANSPORT must name a transport this project has."""
    with pytest.raises(ValueError, match="OUTBOX_TRANSPORT"):
        OutboxSettings.from_config({"OUTBOX_TRANSPORT": "carrier-pigeon"})


# -- order and the relay -----------------------------------------------------------


def test_one_relay_publishes_interleaved_streams_in_aggregate_order(outbox_app):
    """A relay running while events are written keeps every aggregate's commit order."""
    recorder = Recorder(fail_once_every=7)
    state = outbox_app.extensions["outbox"]
    with registered_handler("test.happened", recorder):
        state.settings.batch_size = 25
        relay = state.relay()
        thread = threading.Thread(target=relay.run)
        thread.start()
        try:
            aggregates = write_streams(outbox_app, aggregates=10, per_aggregate=20)
            wait_until(lambda: len({call[2] for call in recorder.calls}) == 200, timeout=30, what="every event")
        finally:
            relay.stop()
            thread.join(10)
    check_once_and_in_order(recorder.calls, aggregates, 20)


def test_the_relay_thread_publishes_right_after_a_commit(outbox_app, collection_url, new_item):
    """A commit in this process wakes the relay thread: no waiting for the polling interval."""
    settings = outbox_app.extensions["outbox"].settings
    settings.interval = settings.min_interval = 30.0  # polling alone would take 30 s
    seen = threading.Event()
    with registered_handler(CREATED, lambda *args: seen.set()):
        processor.start_relay_thread(outbox_app)
        time.sleep(0.3)  # let it find nothing and go to sleep
        started = time.monotonic()
        assert outbox_app.test_client().post(collection_url, json=new_item).status_code == 201
        assert seen.wait(5)
    assert time.monotonic() - started < 2.0


def test_the_relay_thread_starts_with_the_first_request_once(outbox_app):
    """main.py's relay: no thread for commands that never serve, one per serving process."""
    state = outbox_app.extensions["outbox"]
    processor.start_relay_thread(outbox_app, on_first_request=True)
    assert state._thread is None
    client = outbox_app.test_client()
    client.get("/health")
    first = state._thread
    client.get("/health")
    assert first is not None
    assert first.is_alive()
    assert state._thread is first


def test_the_relay_thread_respects_outbox_relay_in_app(app, make_app):
    """OUTBOX_RELAY_IN_APP=false (compose runs a separate relay) starts no thread."""
    built = make_app(OUTBOX_TRANSPORT="in_process", OUTBOX_RELAY_IN_APP=False)
    processor.start_relay_thread(built)
    assert built.extensions["outbox"]._thread is None


def test_relay_command_once_publishes_the_backlog(outbox_app):
    """`flask outbox relay --once` publishes everything due and exits."""
    calls = []
    for seq in range(5):
        add_event(outbox_app, "a", seq)
    with registered_handler("test.happened", lambda aggregate_id, payload, event: calls.append(payload["seq"])):
        result = outbox_app.test_cli_runner().invoke(args=["outbox", "relay", "--once"])
    assert result.exit_code == 0, result.output
    assert "published 5 event(s)" in result.output
    assert calls == [0, 1, 2, 3, 4]


def test_status_command_reports_counts_and_lag(outbox_app):
    """`flask outbox status` prints pending, failed and the age of the oldest pending event."""
    add_event(outbox_app, "a", 0, created_at=utcnow() - timedelta(seconds=90))
    result = outbox_app.test_cli_runner().invoke(args=["outbox", "status"])
    status = json.loads(result.output)
    assert status["pending"] == 1
    assert status["failed"] == 0
    assert 89 <= status["lag_seconds"] < 200


def test_cleanup_deletes_old_processed_events_in_small_batches(outbox_app):
    """Processed rows past retention go (in batches); recent, pending and failed rows stay."""
    old = utcnow() - timedelta(days=30)
    old_ids = [add_event(outbox_app, "a", seq, status=PROCESSED, processed_at=old) for seq in range(7)]
    keep = [
        add_event(outbox_app, "a", 7, status=PROCESSED, processed_at=utcnow()),
        add_event(outbox_app, "b", 0, created_at=old),
        add_event(outbox_app, "c", 0, status=FAILED, processed_at=None, created_at=old),
    ]
    with outbox_app.app_context():
        db.session.add(ProcessedMessage(consumer="billing", message_id="old", processed_at=old))
        db.session.add(ProcessedMessage(consumer="billing", message_id="new"))
        db.session.commit()
    state = outbox_app.extensions["outbox"]
    state.settings.cleanup_batch_size = 3
    assert state.cleanup() == len(old_ids)
    assert [event.id for event in all_events(outbox_app)] == keep
    with outbox_app.app_context():
        assert db.session.scalars(select(ProcessedMessage.message_id)).all() == ["new"]


def test_readiness_reports_relay_lag_without_failing_the_service(outbox_app):
    """An old pending event marks the outbox check down; the service stays ready (non-critical)."""
    client = outbox_app.test_client()
    body = client.get("/health/ready").json
    assert body["checks"]["outbox"]["status"] == "up"
    assert body["checks"]["outbox"]["critical"] is False
    add_event(outbox_app, "a", 0, created_at=utcnow() - timedelta(minutes=10))
    response = client.get("/health/ready")
    assert response.json["checks"]["outbox"]["status"] == "down"
    assert response.json["checks"]["outbox"]["error"] == "check_failed"  # the lag: in the log
    assert response.status_code == 200


# -- trace context -------------------------------------------------------------


def test_the_callers_trace_context_travels_with_the_event(outbox_app, collection_url, new_item):
    """A request's W3C traceparent is stored with its event and reaches the handler."""
    received = []
    response = outbox_app.test_client().post(collection_url, json=new_item, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 201
    [event] = all_events(outbox_app)
    traceparent = event.header_map["traceparent"]
    assert traceparent.split("-")[1] == TRACEPARENT.split("-")[1]  # same trace
    with registered_handler(CREATED, lambda aggregate_id, payload, event: received.append(event.header_map)):
        drain(outbox_app)
    ordering_key = f"{{ cookiecutter.resource_name }}:{response.json['id']}"
    assert received == [{"traceparent": traceparent, "aggregate-version": "1", "ordering-key": ordering_key}]


def test_a_malformed_traceparent_is_not_stored(outbox_app, collection_url, new_item):
    """Only a valid W3C traceparent is passed through; junk from a caller is dropped."""
    response = outbox_app.test_client().post(collection_url, json=new_item, headers={"traceparent": "00-zz-not-valid"})
    assert response.status_code == 201
    [event] = all_events(outbox_app)
    assert "zz" not in (event.headers or "")
{%- if cookiecutter.use_tracing %}


def test_the_consumer_span_is_a_child_of_the_span_that_wrote_the_event(outbox_app):
    """The in-process handler runs in a CONSUMER span whose parent is the writing request's span."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    outbox_app.extensions["outbox"].tracer = tracer
    with outbox_app.app_context():
        with tracer.start_as_current_span("POST /{{ cookiecutter.resource_plural }}") as request_span:
            db.session.add({{ cookiecutter.__resource_class }}(name="traced"))
            db.session.commit()
        with registered_handler(CREATED, lambda *args: None):
            assert processor.process_pending_events() == 1
    [consumer] = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.CONSUMER]
    assert consumer.name == f"{CREATED} process"
    assert consumer.context.trace_id == request_span.get_span_context().trace_id
    assert consumer.parent.span_id == request_span.get_span_context().span_id
{%- endif %}


# -- the idempotent consumer ------------------------------------------------------


def test_idempotent_consumer_runs_a_redelivered_message_once(outbox_app):
    """The same event delivered twice runs the handler once; the mark commits with its writes."""
    runs = []

    @idempotent_consumer("audit")
    def handle(aggregate_id, payload, event):
        runs.append(event.id)
        db.session.add({{ cookiecutter.__resource_class }}(name=f"from {event.id}"))

    add_event(outbox_app, "a", 0)
    [event] = all_events(outbox_app)
    with outbox_app.app_context():
        handle("a", {"seq": 0}, event)
        assert handle("a", {"seq": 0}, event) is None
        assert runs == [event.id]
        assert db.session.scalar(select({{ cookiecutter.__resource_class }}.name)) == f"from {event.id}"


def test_idempotent_consumer_forgets_a_message_whose_handler_failed(outbox_app):
    """A handler that raises rolls back its mark, so the redelivery runs it again."""
    attempts = []

    @idempotent_consumer("audit")
    def handle(message_id):
        attempts.append(message_id)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    with outbox_app.app_context():
        with pytest.raises(RuntimeError):
            handle(message_id="m-1")
        handle(message_id="m-1")
        handle(message_id="m-1")
    assert attempts == ["m-1", "m-1"]
{%- if cookiecutter.use_metrics %}


# -- metrics -----------------------------------------------------------------------


def metric_total(client, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include `labels`."""
    text = client.get("/metrics").get_data(as_text=True)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_metrics_count_published_and_dead_lettered_events_and_show_the_backlog(outbox_app):
    """/metrics has published and failed counters, and pending, dead-letter and lag gauges."""
    client = outbox_app.test_client()
    add_event(outbox_app, "late", 0, created_at=utcnow() - timedelta(seconds=120))
    for seq in range(3):
        add_event(outbox_app, "fine", seq)
    add_event(outbox_app, "poison", 0)
    assert metric_total(client, "outbox_events_pending") == 5
    assert metric_total(client, "outbox_relay_lag_seconds") >= 119

    def handler(aggregate_id, payload, event):
        if aggregate_id == "poison":
            raise RuntimeError("poison")

    with registered_handler("test.happened", handler), outbox_app.app_context():
        state = outbox_app.extensions["outbox"]
        wait_until(lambda: state.run_batch().dead_lettered, timeout=5, what="the dead letter")
    assert metric_total(client, "outbox_events_published_total", event_type="test.happened") == 4
    assert metric_total(client, "outbox_events_failed_total", event_type="test.happened") == 1
    assert metric_total(client, "outbox_publish_errors_total", event_type="test.happened") == 3
    assert metric_total(client, "outbox_events_pending") == 0
    assert metric_total(client, "outbox_events_dead_lettered") == 1
    assert metric_total(client, "outbox_relay_lag_seconds") == 0
{%- endif %}

"""Helpers shared by the outbox tests: writing event streams and recording what was published."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.events import processor
from app.extensions import db
from app.models import {{ cookiecutter.__resource_class }}
from common_utils.outbox import PENDING, OutboxEvent

PROJECT = Path(__file__).resolve().parent.parent


def write_streams(app, aggregates: int, per_aggregate: int, *, writers: int = 1, per_transaction: int = 10) -> list[str]:
    """Write `per_aggregate` events for each of `aggregates` aggregates, from `writers` threads.

    Each writer owns some aggregates and commits their events in rounds, so
    every aggregate's events are committed in sequence order (payload "seq").
    Returns the ids of the aggregates.
    """
    names = [f"agg-{index:04d}" for index in range(aggregates)]

    def write(owned: list[str]) -> None:
        with app.app_context():
            for seq in range(per_aggregate):
                for start in range(0, len(owned), per_transaction):
                    for aggregate_id in owned[start : start + per_transaction]:
                        OutboxEvent.create_event(
                            db.session, "test.happened", "test", aggregate_id, {"seq": seq, "aggregate": aggregate_id}
                        )
                    db.session.commit()
            db.session.remove()

    threads = [threading.Thread(target=write, args=(names[index::writers],)) for index in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return names


def count_pending(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.status == PENDING))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Recorder:
    """An in-process handler that records (aggregate, seq, event id) in call order."""

    def __init__(self, fail_once_every: int = 0):
        self.calls: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()
        self.fail_once_every = fail_once_every
        self.failed: set[str] = set()

    def __call__(self, aggregate_id: str, payload: dict, event) -> None:
        with self.lock:
            if (
                self.fail_once_every
                and payload["seq"] % self.fail_once_every == self.fail_once_every - 1
                and event.id not in self.failed
            ):
                self.failed.add(event.id)
                raise RuntimeError("a transient failure, once")
            self.calls.append((aggregate_id, payload["seq"], event.id))


def check_once_and_in_order(deliveries: list[tuple[str, int, str]], aggregates: list[str], per_aggregate: int) -> None:
    """Every event delivered exactly once, and each aggregate's in sequence order."""
    counts = Counter(event_id for _, _, event_id in deliveries)
    duplicated = {event_id: count for event_id, count in counts.items() if count > 1}
    assert not duplicated, f"{len(duplicated)} events delivered more than once"
    assert len(counts) == len(aggregates) * per_aggregate, "some events were never delivered"
    by_aggregate: dict[str, list[int]] = defaultdict(list)
    for aggregate_id, seq, _ in deliveries:
        by_aggregate[aggregate_id].append(seq)
    out_of_order = [name for name in aggregates if by_aggregate[name] != list(range(per_aggregate))]
    assert not out_of_order, f"out of order: {out_of_order[:3]}, e.g. {by_aggregate[out_of_order[0]][:20] if out_of_order else ''}"


@contextmanager
def registered_handler(event_type: str, handler):
    """Register a handler on the app's processor for one test, then remove it."""
    processor.register_handler(event_type)(handler)
    try:
        yield handler
    finally:
        processor.handlers[event_type].remove(handler)


def subprocess_env(database_url: str, **extra: str) -> dict[str, str]:
    """Environment for a relay started as its own process, quiet and offline."""
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "DATABASE_URL": database_url,
        "FLASK_APP": "main.py",
        "TRACING_ENABLED": "false",
        "OTEL_TRACES_EXPORTER": "none",
        "AUTO_REGISTER_SERVICE": "false",
        "METRICS_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


PYTHON = sys.executable


@contextmanager
def outbox_app_with(make_app, **config):
    """An app with these outbox settings; its relay and connections are closed afterwards."""
    built = make_app(**config)
    try:
        yield built
    finally:
        built.extensions["outbox"].close()
        with built.app_context():
            db.engine.dispose()


def events_of(app, aggregate_id) -> list[OutboxEvent]:
    with app.app_context():
        events = db.session.scalars(
            select(OutboxEvent).where(OutboxEvent.aggregate_id == str(aggregate_id)).order_by(OutboxEvent.position)
        ).all()
        db.session.expunge_all()
        return events


def stored_row(app, item_id: int) -> dict:
    """The row as the database has it now, in the payload's shape."""
    with app.app_context(), Session(db.engine) as session:
        return session.get({{ cookiecutter.__resource_class }}, item_id).to_dict()


def create_item(app, client, collection_url, new_item) -> int:
    response = client.post(collection_url, json=new_item)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]

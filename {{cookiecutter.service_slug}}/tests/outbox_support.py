"""Helpers shared by the outbox tests: writing event streams, recording what was published, starting relays."""

from __future__ import annotations

import os
import signal
import subprocess
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
from common_utils.outbox import PENDING, OutboxEvent, event_values

PROJECT = Path(__file__).resolve().parent.parent


def write_streams(
    app, aggregates: int, per_aggregate: int, *, writers: int = 1, per_transaction: int = 10, first_seq: int = 0
) -> list[str]:
    """Write `per_aggregate` events for each of `aggregates` aggregates, from `writers` threads.

    Each writer owns some aggregates and commits their events in rounds, so
    every aggregate's events are committed in sequence order (payload "seq",
    from `first_seq`). Returns the ids of the aggregates.
    """
    names = [f"agg-{index:04d}" for index in range(aggregates)]

    def write(owned: list[str]) -> None:
        with app.app_context():
            for seq in range(first_seq, first_seq + per_aggregate):
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


def write(app, events: list[tuple[str, int]]) -> list[str]:
    """Commit (aggregate id, seq) events in one transaction, in list order; their ids."""
    rows = [event_values("test.happened", "test", aggregate_id, {"seq": seq}) for aggregate_id, seq in events]
    with app.app_context():
        db.session.execute(OutboxEvent.__table__.insert(), rows)
        db.session.commit()
        db.session.remove()
    return [row["id"] for row in rows]


def statuses(app) -> dict[str, str]:
    with app.app_context():
        return dict(db.session.execute(select(OutboxEvent.id, OutboxEvent.status)).all())


def run_relay(app, workers: int | None = None) -> tuple:
    """A long-running relay in a thread (as `flask outbox relay` runs it); returns (relay, thread)."""
    relay = app.extensions["outbox"].relay(workers=workers)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    return relay, thread


def stop_relay(relay, thread) -> None:
    relay.stop()
    thread.join(10)


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


def holds_for(check, seconds: float, interval: float = 0.05) -> None:
    """Run `check` (which asserts) again and again for `seconds`: what it asserts holds throughout."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(interval)


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


# Answers commands on stdin, one line each: "start" forks a relay and
# answers its pid; "poll PID" answers "running" or its exit status, "wait
# PID" waits for it to end and answers its exit status (-N: killed by signal N).
LAUNCHER = """
import importlib, os, sys
from flask.cli import cli

# The service (FLASK_APP), imported once for every relay.
importlib.import_module(os.environ["FLASK_APP"].removesuffix(".py"))

ended = {}

def status(pid, block):
    if pid not in ended:
        done, code = os.waitpid(pid, 0 if block else os.WNOHANG)
        if not done:
            return "running"
        ended[pid] = os.waitstatus_to_exitcode(code)
    return ended[pid]

for line in sys.stdin:
    command, *argument = line.split()
    if command == "start":
        answer = os.fork()
        if answer == 0:  # the relay: its output goes to stderr, the answers' pipe is the launcher's
            os.dup2(2, 1)
            try:
                cli.main(["outbox", "relay"], prog_name="flask")
            except SystemExit as end:
                os._exit(end.code if isinstance(end.code, int) else 1)
            os._exit(0)
    else:
        answer = status(int(argument[0]), block=command == "wait")
    print(answer, flush=True)
"""


class Launcher:
    """Starts `flask outbox relay` processes, each forked from one that imported the service.

    Importing the service is what takes time (seconds of CPU), not relaying:
    the launcher imports it once, as gunicorn's --preload does, so starting
    or restarting a relay costs a fork. In the child, Flask's CLI runs the
    command as `flask` would. `env` is the relays' environment (see
    `subprocess_env`); `relay_app`, if given, is the source of the module
    they run instead of main.py (the service's app plus what the test records).
    """

    def __init__(self, folder: Path, env: dict[str, str], relay_app: str | None = None):
        (folder / "launcher.py").write_text(LAUNCHER)
        env = {**env, "PYTHONPATH": f"{PROJECT}{os.pathsep}{folder}"}
        if relay_app is not None:
            (folder / "relay_app.py").write_text(relay_app)
            env["FLASK_APP"] = "relay_app"
        self.process = subprocess.Popen(
            [PYTHON, str(folder / "launcher.py")],
            cwd=PROJECT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.relays: list[int] = []

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"the launcher exited with {self.process.wait(10)}"
        return answer

    def start(self) -> int:
        pid = int(self.ask("start"))
        self.relays.append(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        answer = self.ask(f"poll {pid}")
        return None if answer == "running" else int(answer)

    def stop(self, pid: int, signum: int) -> int:
        """Send `signum` to the relay and wait until it has ended; its exit status."""
        os.kill(pid, signum)
        return int(self.ask(f"wait {pid}"))

    def close(self) -> None:
        """No relay outlives the test, whatever failed."""
        for pid in self.relays:
            if self.process.poll() is None and self.poll(pid) is None:
                self.stop(pid, signal.SIGKILL)
        self.process.kill()  # nothing of its own to finish: skip the interpreter's shutdown
        self.process.wait(10)
        self.process.stdin.close()
        self.process.stdout.close()

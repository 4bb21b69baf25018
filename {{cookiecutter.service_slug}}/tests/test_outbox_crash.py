"""`flask outbox relay`, the process compose and Kubernetes run, killed with SIGKILL mid-stream.

The relay is the real long-running command (no `--once`), started twice
and killed while it publishes, then started a third time and stopped with
SIGTERM once the outbox is empty. Each kill provably lands mid-stream:
some but not all events had been delivered when it landed. After the
kills no event is lost, every aggregate's events were first delivered in
order, and duplicates come only from the batches in flight.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter, defaultdict

import pytest

from app.extensions import db
from common_utils.outbox import OutboxEvent, event_values
from common_utils.outbox.relay import check_relays
from tests.outbox_support import PROJECT, PYTHON, count_pending, subprocess_env, wait_until

AGGREGATES, PER_AGGREGATE = 20, 30
TOTAL = AGGREGATES * PER_AGGREGATE
BATCH, WORKERS = 50, 2
KILL_AFTER = 100  # deliveries each relay makes before it is killed

# The service's own app (main.py) with one recording handler: what runs is
# the `flask outbox relay` command itself.
RELAY_APP = """
import os, time
from main import app
from app.events import processor

log = os.open(os.environ["DELIVERY_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

@processor.register_handler("test.happened")
def record(aggregate_id, payload, event):
    os.write(log, f"{event.id} {aggregate_id} {payload['seq']}\\n".encode())
    time.sleep(0.001)  # slow enough that a kill lands inside a batch
"""


def start_relay(app_file, log, database_url) -> subprocess.Popen:
    env = subprocess_env(
        database_url,
        FLASK_APP=str(app_file),
        DELIVERY_LOG=str(log),
        OUTBOX_TRANSPORT="in_process",
        OUTBOX_BATCH_SIZE=str(BATCH),
        OUTBOX_RELAY_WORKERS=str(WORKERS),
        OUTBOX_LEASE_SECONDS="1",
        OUTBOX_MIN_POLL_INTERVAL="0.01",
        OUTBOX_PROCESSING_INTERVAL="0.05",
    )
    return subprocess.Popen([PYTHON, "-m", "flask", "outbox", "relay"], cwd=PROJECT, env=env)


def deliveries(log) -> list[tuple[str, str, int]]:
    if not log.exists():
        return []
    return [(event_id, aggregate, int(seq)) for event_id, aggregate, seq in (line.split() for line in log.read_text().splitlines())]


def delivered_while_running(process, log, at_least: int) -> int:
    """Wait until the log has `at_least` deliveries; the running relay must still be alive."""

    def reached():
        assert process.poll() is None, f"the relay exited with {process.returncode}"
        return len(deliveries(log)) >= at_least

    wait_until(reached, timeout=30, what=f"{at_least} deliveries", interval=0.005)
    return len(deliveries(log))


def test_the_relay_command_killed_mid_stream_loses_nothing_and_keeps_order(app, make_app, database_url, tmp_path):
    """SIGKILL `flask outbox relay` twice mid-stream, restart it: all delivered, in order per aggregate."""
    writer = make_app(OUTBOX_RELAY_STALE_AFTER=0.5)
    with writer.app_context():
        db.session.execute(
            OutboxEvent.__table__.insert(),
            [
                event_values("test.happened", "test", f"agg-{index:02d}", {"seq": seq})
                for seq in range(PER_AGGREGATE)
                for index in range(AGGREGATES)
            ],
        )
        db.session.commit()
        db.session.remove()
    app_file = tmp_path / "relay_app.py"
    app_file.write_text(RELAY_APP)
    log = tmp_path / "delivered.log"

    started: list[subprocess.Popen] = []
    kills = []
    try:
        for _ in range(2):
            process = start_relay(app_file, log, database_url)
            started.append(process)
            delivered_while_running(process, log, len(deliveries(log)) + KILL_AFTER)
            process.send_signal(signal.SIGKILL)
            assert process.wait(10) == -signal.SIGKILL
            kills.append(len(deliveries(log)))
            assert kills[-1] < TOTAL, f"the kill landed after the stream ended: {kills}"

        final = start_relay(app_file, log, database_url)
        started.append(final)
        wait_until(lambda: count_pending(writer) == 0, timeout=30, what="the backlog to drain")
        assert final.poll() is None, "the relay must still be running, not exited"
        final.send_signal(signal.SIGTERM)
        assert final.wait(10) == 0
    finally:
        for process in started:  # none outlives the test, whatever failed
            if process.poll() is None:
                process.kill()
                process.wait(10)

    delivered = deliveries(log)
    counts = Counter(event_id for event_id, _, _ in delivered)
    assert len(counts) == TOTAL, "an event was lost"
    duplicated = sum(count - 1 for count in counts.values())
    assert duplicated <= len(kills) * BATCH * WORKERS, "more duplicates than the batches in flight"
    seen: dict[str, set[int]] = defaultdict(set)
    for _, aggregate, seq in delivered:
        assert seq == 0 or seq - 1 in seen[aggregate], f"{aggregate}: {seq} delivered before {seq - 1}"
        seen[aggregate].add(seq)
    # The killed relays left heartbeats that went silent: they show as dead.
    state = writer.extensions["outbox"]
    loops = WORKERS if state.locks_rows() else 1  # one relay loop on SQLite
    wait_until(lambda: state.relay_health()["stale"] == len(kills) * loops, timeout=5, what="the dead relays")
    with pytest.raises(RuntimeError, match="dead or stuck"):
        check_relays(state)
    print(f"\ncrash test: kills at deliveries {kills}; {TOTAL} events, 0 lost, {duplicated} redelivered")

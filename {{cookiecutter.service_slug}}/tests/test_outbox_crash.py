"""`flask outbox relay`, the process compose and Kubernetes run, killed with SIGKILL mid-stream.

The relay is the real long-running command (`flask outbox relay`, no
`--once`), run three times in turn: the first two are killed while they
publish, the third is stopped with SIGTERM once the outbox is empty. Each
kill provably lands mid-stream: the relay it killed had delivered events,
and some were left for the next one. After the kills no event is lost,
every aggregate's events were first delivered in order, and duplicates come
only from the batches in flight.

Importing the service is what takes time, not relaying, so a launcher
process imports it once and forks each relay from there (as gunicorn's
--preload does); in the child, Flask's CLI runs the command as `flask`
would. Restarts then cost a fork, and the test waits only on conditions.
"""

from __future__ import annotations

import signal
from collections import Counter, defaultdict

import pytest

from app.extensions import db
from common_utils.outbox import OutboxEvent, event_values
from common_utils.outbox.relay import check_relays
from tests.outbox_support import Launcher, count_pending, subprocess_env, wait_until

# More aggregates than a killed relay's batches in flight can hold (BATCH *
# WORKERS keys at most), so the next relay goes on with the others at once
# while the dead one's leases run out.
AGGREGATES, PER_AGGREGATE = 60, 8
TOTAL = AGGREGATES * PER_AGGREGATE
BATCH, WORKERS = 20, 2
KILL_AFTER = 80  # deliveries each relay makes before it is killed

# The service's own app (main.py) with one recording handler.
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

def relay_launcher(folder, log, database_url) -> Launcher:
    """Relays of RELAY_APP, short leases and polls so that restarts go on at once."""
    env = subprocess_env(
        database_url,
        DELIVERY_LOG=str(log),
        OUTBOX_TRANSPORT="in_process",
        OUTBOX_BATCH_SIZE=str(BATCH),
        OUTBOX_RELAY_WORKERS=str(WORKERS),
        OUTBOX_LEASE_SECONDS="1",
        OUTBOX_MIN_POLL_INTERVAL="0.01",
        OUTBOX_PROCESSING_INTERVAL="0.05",
    )
    return Launcher(folder, env, relay_app=RELAY_APP)


def deliveries(log) -> list[tuple[str, str, int]]:
    if not log.exists():
        return []
    return [(event_id, aggregate, int(seq)) for event_id, aggregate, seq in (line.split() for line in log.read_text().splitlines())]


def delivered_while_running(launcher: Launcher, relay: int, log, at_least: int) -> int:
    """Wait until the log has `at_least` deliveries; the running relay must still be alive."""

    def reached():
        assert launcher.poll(relay) is None, f"the relay exited with {launcher.poll(relay)}"
        return len(deliveries(log)) >= at_least

    wait_until(reached, timeout=30, what=f"{at_least} deliveries", interval=0.005)
    return len(deliveries(log))


def test_the_relay_command_killed_mid_stream_loses_nothing_and_keeps_order(app, make_app, database_url, tmp_path):
    """SIGKILL `flask outbox relay` twice mid-stream, restart it: all delivered, in order per aggregate."""
    log = tmp_path / "delivered.log"
    launcher = relay_launcher(tmp_path, log, database_url)  # imports the service while the events are written
    kills = []
    try:
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

        for _ in range(2):
            before = len(deliveries(log))
            relay = launcher.start()
            delivered_while_running(launcher, relay, log, before + KILL_AFTER)
            assert launcher.stop(relay, signal.SIGKILL) == -signal.SIGKILL
            kills.append(len(deliveries(log)))
            assert kills[-1] < TOTAL, f"the kill landed after the stream ended: {kills}"

        final = launcher.start()
        wait_until(lambda: count_pending(writer) == 0, timeout=30, what="the backlog to drain", interval=0.01)
        assert launcher.poll(final) is None, "the relay must still be running, not exited"
        assert len(deliveries(log)) > kills[-1], "the last relay delivered nothing"
        assert launcher.stop(final, signal.SIGTERM) == 0
    finally:
        launcher.close()

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

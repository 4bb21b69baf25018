"""A relay process killed with SIGKILL at random moments loses nothing.

Duplicates are allowed only for the batch in flight at each kill, and the
idempotent consumer helper turns every duplicate into a single handler run.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter

from app.extensions import db
from common_utils.outbox.consumer import idempotent_consumer
from tests.outbox_support import PROJECT, PYTHON, count_pending, subprocess_env, write_streams

ROUNDS = 6
BATCH = 50
AGGREGATES, PER_AGGREGATE = 40, 60
TOTAL = AGGREGATES * PER_AGGREGATE

RELAY_SCRIPT = """
import os, sys, time
from app import create_app
from app.events import processor

log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

@processor.register_handler("test.happened")
def record(aggregate_id, payload, event):
    os.write(log, f"{event.id} {aggregate_id} {payload['seq']}\\n".encode())
    time.sleep(0.0005)  # slow enough that a kill lands inside a batch

app = create_app({"OUTBOX_TRANSPORT": "in_process", "OUTBOX_BATCH_SIZE": %d, "OUTBOX_PROCESSING_INTERVAL": 0.1})
print("ready", flush=True)
app.extensions["outbox"].relay().run(once=len(sys.argv) > 2)
"""


def start_relay(script, log, database_url, *extra) -> subprocess.Popen:
    process = subprocess.Popen(
        [PYTHON, str(script), str(log), *extra],
        cwd=PROJECT,
        env=subprocess_env(database_url),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def read_log(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_relay_killed_at_random_moments_loses_nothing(app, make_app, database_url, tmp_path):
    """SIGKILL a relay several times mid-run: no event lost, duplicates only from in-flight batches."""
    writer = make_app()
    write_streams(writer, aggregates=AGGREGATES, per_aggregate=PER_AGGREGATE, per_transaction=AGGREGATES)
    script = tmp_path / "relay.py"
    script.write_text(RELAY_SCRIPT % BATCH)
    log = tmp_path / "delivered.log"
    rng = random.Random(20240607)  # noqa: S311 - reproducible kill times, not secrets
    kills = []
    for _ in range(ROUNDS):
        process = start_relay(script, log, database_url)
        time.sleep(rng.uniform(0.05, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process.stdout.close()
        kills.append(len(read_log(log)))
    final = start_relay(script, log, database_url, "--once")
    assert final.wait(120) == 0
    final.stdout.close()

    lines = read_log(log)
    ids = [line.split()[0] for line in lines]
    counts = Counter(ids)
    assert count_pending(writer) == 0
    assert len(counts) == TOTAL, "an event was lost"
    first_seen = {}
    for index, event_id in enumerate(ids):
        first_seen.setdefault(event_id, index)
    duplicated = [event_id for event_id, count in counts.items() if count > 1]
    for event_id in duplicated:
        # Delivered first within the last batch before some kill: the batch in flight.
        assert any(kill - BATCH <= first_seen[event_id] < kill for kill in kills), event_id
    assert len(duplicated) <= ROUNDS * BATCH
    assert sum(1 for kill in kills if 0 < kill < TOTAL) >= 3, f"the kills missed the run: {kills}"
    print(f"\ncrash test: {ROUNDS} kills at deliveries {kills}; {TOTAL} events, 0 lost, {len(duplicated)} duplicated")

    # Every delivery of the duplicated events, and of a sample of the others,
    # through the consumer helper: one handler run per event.
    sample = set(duplicated) | set(random.Random(7).sample(sorted(counts), 200))  # noqa: S311
    runs = Counter()

    @idempotent_consumer("crash-test")
    def consume(message_id):
        runs[message_id] += 1

    with writer.app_context():
        for event_id in ids:
            if event_id in sample:
                consume(message_id=event_id)
        db.session.remove()
    assert set(runs) == sample
    assert set(runs.values()) == {1}

"""Outbox relay benchmarks on a real PostgreSQL and RabbitMQ, all measured in one run.

Renders a project (postgresql, outbox with the rabbitmq transport), migrates
a scratch database and measures:

1. raw: the relay's own claim-and-update statements with a transport that
   publishes nothing, over a backlog: the database's limit on this machine;
2. relay: the same backlog relayed to RabbitMQ with publisher confirms
   (one relay, then two), as events/s and as a share of the raw rate;
3. latency: commit-to-confirm with events offered at a steady rate
   (one transaction per event, NOTIFY wake-ups), p50/p99/max;
4. guide: the migration guide's algorithm on the same setup: one thread,
   `process_pending_events(limit=10)` with a per-event publish and commit
   (pika BlockingConnection, confirm per message), timed without its 10 s
   sleep; with the sleep it moves at most limit/interval = 1 event/s.

Prints a table and one JSON line; asserts nothing. Needs the rendered
project's requirements (Flask, SQLAlchemy, psycopg, pika) and cookiecutter
in the running Python. The database is emptied: give it a scratch one.

    python bench/bench_outbox.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/outbox_bench \\
        --amqp-url amqp://guest:guest@127.0.0.1:5672/%2F [--events 100000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parent.parent


def render(output: Path) -> Path:
    cookiecutter(
        str(TEMPLATE),
        no_input=True,
        output_dir=str(output),
        extra_context={"database": "postgresql", "outbox": "rabbitmq"},
    )
    [project] = [path for path in output.iterdir() if path.is_dir()]
    return project


def write_events(project: str, environ: dict, rate: float, seconds: float, start_at: float) -> dict[str, float]:
    """A writer process: one event per transaction at `rate`/s; {event id: commit time}.

    It issues the SQL the service's session hooks issue (the event row and,
    on PostgreSQL, the NOTIFY) through a bare SQLAlchemy engine: the Flask
    app's per-request overhead would only compete with the relay for this
    machine's two cores without changing the commit-to-confirm interval.
    """
    os.environ.update(environ)
    sys.path.insert(0, project)
    from common_utils.outbox import NOTIFY_CHANNEL, OutboxEvent, event_values
    from config import normalise_database_url
    from sqlalchemy import create_engine, text

    engine = create_engine(normalise_database_url(environ["DATABASE_URL"]))
    insert = OutboxEvent.__table__.insert()
    notify = text("SELECT pg_notify(:channel, '')")
    committed = {}
    next_at = start_at
    with engine.connect() as connection:
        for index in range(int(rate * seconds)):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            values = event_values("bench.happened", "bench", f"{os.getpid()}-{index % 50}", {"index": index})
            with connection.begin():
                connection.execute(insert, values)
                connection.execute(notify, {"channel": NOTIFY_CHANNEL})
            committed[values["id"]] = time.monotonic()
            next_at += 1 / rate
    engine.dispose()
    return committed


class NullTransport:
    """Publishes nothing: what is left is the relay's database work."""

    name = "null"

    def publish(self, rows: list) -> list:
        return [None] * len(rows)

    def status(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class Bench:
    def __init__(self, project: Path, database_url: str, amqp_url: str):
        self.project = str(project)
        os.environ.update(
            DATABASE_URL=database_url,
            AMQP_URL=amqp_url,
            ENVIRONMENT="development",  # unset would be production, which refuses local defaults
            TRACING_ENABLED="false",
            OTEL_TRACES_EXPORTER="none",
            METRICS_ENABLED="false",
            AUTO_REGISTER_SERVICE="false",
            RATELIMIT_ENABLED="false",
            LOG_LEVEL="WARNING",
        )
        from app import create_app
        from app.extensions import db
        from flask_migrate import upgrade
        from sqlalchemy import MetaData

        self.db = db
        self.exchange = f"outbox-bench-{uuid.uuid4().hex[:8]}"
        self.app = create_app({"OUTBOX_EXCHANGE": self.exchange, "OUTBOX_BATCH_SIZE": 500})
        with self.app.app_context():
            metadata = MetaData()
            metadata.reflect(db.engine)
            metadata.drop_all(db.engine)
            upgrade()
        self.state = self.app.extensions["outbox"]
        self.amqp_url = amqp_url
        self.sink = self.bind_sink_queue()

    def bind_sink_queue(self):
        """A queue on the exchange, so published messages are really routed and stored."""
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        channel.exchange_declare(self.exchange, "topic", durable=True)
        # Bounded like a queue with a live consumer: old messages are dropped, not piled up.
        queue = channel.queue_declare("", exclusive=True, arguments={"x-max-length": 10_000}).method.queue
        channel.queue_bind(queue, self.exchange, "#")
        return connection, channel, queue

    def purge_sink(self) -> None:
        _, channel, queue = self.sink
        channel.queue_purge(queue)

    def close(self) -> None:
        connection, channel, _ = self.sink
        channel.exchange_delete(self.exchange)
        connection.close()
        self.state.close()

    # -- data ------------------------------------------------------------------

    def fill_backlog(self, events: int, aggregates: int = 10_000) -> None:
        from common_utils.outbox import OutboxEvent, event_values

        table = OutboxEvent.__table__
        rows = []
        with self.app.app_context(), self.db.engine.begin() as connection:
            connection.execute(table.delete())
            for index in range(events):
                aggregate = index % aggregates
                rows.append(
                    event_values("bench.happened", "bench", aggregate, {"seq": index // aggregates, "padding": "x" * 200})
                )
                if len(rows) == 5000:
                    connection.execute(table.insert(), rows)
                    rows = []
            if rows:
                connection.execute(table.insert(), rows)

    def pending(self) -> int:
        return self.state.stats()["pending"]

    # -- scenarios ---------------------------------------------------------------

    def drain(self, workers: int) -> float:
        """Relay the backlog with one relay of `workers` workers; events per second."""
        total = self.pending()
        started = time.perf_counter()
        while self.pending():  # a worker that found only held-back events stops early
            self.state.relay(workers).run(once=True)
        return total / (time.perf_counter() - started)

    def raw_rate(self, events: int, workers: int) -> float:
        self.fill_backlog(events)
        real, self.state._transport = self.state._transport, NullTransport()
        try:
            return self.drain(workers)
        finally:
            self.state._transport = real

    def relay_rate(self, events: int, workers: int) -> float:
        self.fill_backlog(events)
        self.purge_sink()
        self.state.transport.publish([])  # connect before the clock starts
        rate = self.drain(workers)
        self.purge_sink()
        return rate

    def latency(self, rate: int, seconds: float, writers: int = 6) -> dict:
        """Commit-to-confirm latency of events written one per transaction at `rate`/s.

        The writers are separate processes (as web workers would be), so they
        do not share this process's interpreter lock with the relay; times are
        CLOCK_MONOTONIC, which all processes of the machine share.
        """
        self.fill_backlog(0)
        confirmed: dict[str, float] = {}
        transport = self.state.transport
        publish = transport.publish

        def timed_publish(rows):
            results = publish(rows)
            now = time.monotonic()
            for row, result in zip(rows, results, strict=True):
                if result is None:
                    confirmed.setdefault(row.id, now)
            return results

        transport.publish = timed_publish
        relay = self.state.relay()
        relay_thread = threading.Thread(target=relay.run)
        relay_thread.start()
        start_at = time.monotonic() + 5.0  # the writer processes need a moment to start
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(writers, mp_context=context) as pool:
            futures = [
                pool.submit(write_events, self.project, dict(os.environ), rate / writers, seconds, start_at + index / rate)
                for index in range(writers)
            ]
            committed = {}
            for future in futures:
                committed.update(future.result())
        offered_for = max(committed.values()) - start_at
        deadline = time.monotonic() + 30
        while len(confirmed) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.05)
        relay.stop()
        relay_thread.join()
        transport.publish = publish
        latencies = sorted((confirmed[event_id] - at) * 1000 for event_id, at in committed.items() if event_id in confirmed)
        self.purge_sink()
        return {
            "offered_per_s": round(len(committed) / offered_for),
            "events": len(committed),
            "confirmed": len(latencies),
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 1),
            "max_ms": round(latencies[-1], 1),
        }

    def guide_rate(self, events: int) -> float:
        """The guide's processor: query 10 pending, publish each (confirm), commit each; no sleep."""
        import pika
        from common_utils.outbox import PENDING, PROCESSED, OutboxEvent, utcnow
        from sqlalchemy import select

        self.fill_backlog(events)
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        channel.confirm_delivery()

        def process_pending_events(limit: int = 10) -> int:
            session = self.db.session
            pending = session.scalars(select(OutboxEvent).where(OutboxEvent.status == PENDING).limit(limit)).all()
            for event in pending:
                channel.basic_publish(
                    self.exchange,
                    event.event_type,
                    event.payload.encode(),
                    pika.BasicProperties(message_id=event.id, delivery_mode=2, content_type="application/json"),
                )
                event.status = PROCESSED
                event.processed_at = utcnow()
                session.commit()
            return len(pending)

        started = time.perf_counter()
        done = 0
        with self.app.app_context():
            while processed := process_pending_events(limit=10):
                done += processed
            self.db.session.remove()
        elapsed = time.perf_counter() - started
        connection.close()
        self.purge_sink()
        return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--events", type=int, default=100_000, help="backlog size")
    parser.add_argument("--rate", type=int, default=1000, help="offered events/s for the latency run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency run")
    parser.add_argument("--guide-events", type=int, default=5000, help="backlog for the guide's loop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        project = render(Path(folder))
        sys.path.insert(0, str(project))
        os.chdir(project)  # Flask-Migrate finds migrations/ from here
        bench = Bench(project, args.database_url, args.amqp_url)
        try:
            raw = {workers: bench.raw_rate(args.events, workers) for workers in (1, 2)}
            relay = {workers: bench.relay_rate(args.events, workers) for workers in (1, 2)}
            latency = bench.latency(args.rate, args.seconds)
            guide = bench.guide_rate(args.guide_events)
        finally:
            bench.close()

    best_raw, best_relay = max(raw.values()), max(relay.values())
    results = {
        "backlog_events": args.events,
        "raw_claim_and_update_per_s": {f"{workers}_workers": round(rate) for workers, rate in raw.items()},
        "relay_rabbitmq_confirms_per_s": {f"{workers}_workers": round(rate) for workers, rate in relay.items()},
        "relay_share_of_raw": round(best_relay / best_raw, 3),
        "latency": latency,
        "guide_loop_without_sleep_per_s": round(guide, 1),
        "guide_with_10s_sleep_per_s": 1.0,
    }
    print(f"backlog of {args.events} events, PostgreSQL -> RabbitMQ with confirms, batches of 500")
    for workers in (1, 2):
        print(f"  raw claim-and-update, no publish, {workers} worker(s)  {raw[workers]:8.0f} events/s")
    for workers in (1, 2):
        print(
            f"  relay with confirms, {workers} worker(s)             {relay[workers]:8.0f} events/s"
            f"  ({relay[workers] / best_raw:.0%} of the best raw rate)"
        )
    print(
        f"  latency at {latency['offered_per_s']} events/s offered (1 per transaction): p50 {latency['p50_ms']} ms, "
        f"p99 {latency['p99_ms']} ms, max {latency['max_ms']} ms ({latency['confirmed']}/{latency['events']} confirmed)"
    )
    print(f"  guide's loop, no sleep                   {guide:8.1f} events/s  ({best_relay / guide:.0f}x slower than the relay)")
    print("  guide's loop as written (limit=10 every 10 s): at most 1 event/s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

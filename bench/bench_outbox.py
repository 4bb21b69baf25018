"""Outbox relay benchmarks on a real PostgreSQL and RabbitMQ, all measured in one run.

Renders a project (postgresql, outbox with the rabbitmq transport), migrates
a scratch database and measures:

1. raw claim: the relay's own claim, lease and mark statements with a
   transport that publishes nothing, over a backlog: the database's limit;
2. raw publish: the same RabbitMQ client publishing the same rows in
   batches with publisher confirms to a durable queue, no database: the
   broker's limit on this machine;
3. relay: the backlog relayed to RabbitMQ with confirms (one relay, then
   two workers), as events/s and as a share of the slower raw rate;
4. latency: commit-to-confirm with events offered at a steady rate by
   several writer processes (one transaction per event, woken as the
   service wakes relays: after commit, a debounced NOTIFY), p50/p99/max,
   and the cores the writers, the relay, PostgreSQL and RabbitMQ kept busy
   meanwhile (a run whose parts need more than the machine has measures the
   machine, not the relay);
   and commit-to-publish of single events to an idle relay;
5. writers: 16 writer processes each doing the PATCH handler's database
   work (load, change, versioned commit, reload for the ETag) as fast as
   they can, with the outbox off (the same service rendered with
   outbox=none) and on (the row, its event, the after-commit wake-up), in
   interleaved rounds; commits/s and the ratio on/off per round, median;
   and, counted in one writer of each, Python calls and SQL statements
   per commit (no load on the machine changes these);
6. retention: processed events deleted per second by `cleanup()`;
7. guide: the migration guide's algorithm on the same setup, measured:
   `process_pending_events(limit=10)` with a per-event publish and
   commit (pika BlockingConnection, confirm per message), without its
   10 s sleep, and as written (with the sleep) for a few rounds.

Prints a table and one JSON line; asserts nothing. Needs the rendered
project's requirements (Flask, SQLAlchemy, psycopg, pika) and cookiecutter
in the running Python. The database is emptied: give it a scratch one.

    python bench/bench_outbox.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/outbox_bench \\
        --amqp-url amqp://guest:guest@127.0.0.1:5672/%2F [--events 100000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import contextlib
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


def render(output: Path, outbox: str = "rabbitmq") -> Path:
    """The PostgreSQL service with this outbox (outbox=none is what "outbox off" is), in `output`."""
    cookiecutter(
        str(TEMPLATE),
        no_input=True,
        output_dir=str(output),
        extra_context={"database": "postgresql", "outbox": outbox},
    )
    [project] = [path for path in output.iterdir() if path.is_dir()]
    return project


def write_events(project: str, environ: dict, rate: float, seconds: float, offset: float, barrier) -> dict[str, float]:
    """A writer process: one event per transaction at `rate`/s; {event id: commit time}.

    It issues what the service's session hooks issue (the event row, then
    after the commit a wake-up: the debounced NOTIFY of common_utils.outbox)
    through a bare SQLAlchemy engine, the INSERT in autocommit (it is its
    own transaction, without BEGIN and COMMIT round trips): the Flask app's
    per-request overhead would only compete with the relay for this
    machine's cores without changing the commit-to-confirm interval (a
    writer process committing 83 events/s here already takes 1.3 ms of CPU
    per event, 1.5 ms with BEGIN and COMMIT). One event before the clock
    starts connects, compiles the INSERT and starts the notifier; then all
    writers start together, each `offset` s into its schedule, so the run
    does not open with the burst of writers catching up on a late start.
    """
    os.environ.update(environ)
    sys.path.insert(0, project)
    from common_utils.outbox import OutboxEvent, event_values
    from common_utils.outbox.relay import notifier_for
    from config import normalise_database_url
    from sqlalchemy import create_engine

    engine = create_engine(normalise_database_url(environ["DATABASE_URL"]))
    notifier = notifier_for(engine.url, float(environ.get("OUTBOX_NOTIFY_INTERVAL", "0.02")))
    insert = OutboxEvent.__table__.insert()
    committed = {}

    def commit_one(index: int) -> tuple[str, float]:
        """Write one event; its id and its commit time (taken before the wake-up, as a writer's is)."""
        values = event_values("bench.happened", "bench", f"{os.getpid()}-{index % 50}", {"index": index})
        connection.execute(insert, values)  # autocommit: the INSERT is its transaction
        committed_at = time.monotonic()
        notifier.wake(engine.url)
        return values["id"], committed_at

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        commit_one(-1)
        barrier.wait()
        next_at = time.monotonic() + 0.5 + offset  # the warm-up events are relayed meanwhile
        for index in range(int(rate * seconds)):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event_id, committed_at = commit_one(index)
            committed[event_id] = committed_at
            next_at += 1 / rate
    time.sleep(0.2)  # the notifier thread sends the last wake-up
    engine.dispose()
    return committed


#: Rows each writer process of the writers run changes in turn (its own: writers never wait on each other's locks).
ROWS_PER_WRITER = 20


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process of this machine (a PostgreSQL backend), in nanoseconds' precision.

    /proc/<pid>/schedstat rather than /proc/<pid>/stat, whose clock ticks
    (10 ms) are as long as a few of a backend's commits.
    """
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def all_threads_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its threads (/proc/<pid>/stat; schedstat counts one thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(writer_pids: list[int]) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of the latency run's parts: writers, relay (this process), PostgreSQL, RabbitMQ."""
    roles = {pid: "writers" for pid in writer_pids}
    roles[os.getpid()] = "relay"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in roles:
            with contextlib.suppress(OSError):
                program = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
                if program.startswith(b"postgres") or program.endswith(b"/postgres"):
                    roles[int(entry.name)] = "postgresql"
                elif program.endswith(b"beam.smp"):
                    roles[int(entry.name)] = "rabbitmq"
    seconds = {}
    for pid, role in roles.items():
        with contextlib.suppress(OSError):  # ended meanwhile
            seconds[pid] = (role, all_threads_cpu_seconds(pid))
    return seconds


def cores_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], elapsed: float) -> dict:
    """Cores each role kept busy between two readings (processes started meanwhile count from zero)."""
    cores = dict.fromkeys(("writers", "relay", "postgresql", "rabbitmq"), 0.0)
    for pid, (role, seconds) in after.items():
        cores[role] += (seconds - before.get(pid, (role, 0.0))[1]) / elapsed
    return {role: round(value, 2) for role, value in cores.items()}


def service_writer(project: str, environ: dict, first_id: int, commands, results) -> None:
    """A writer process: the PATCH handler's database work, as fast as it can, for each command.

    Each iteration is one request's write, by the service's own functions in
    a request context (so its session lives and ends as a request's does):
    get_or_404, check_if_match, the attribute change, commit_or_409 and the
    ETag read that reloads the row after the commit. With the outbox on, the
    session hooks add the event and the after-commit wake-up. A command is
    the number of seconds to write (None ends the process); the answer is
    (commits, this process's CPU seconds, its PostgreSQL backend's CPU
    seconds): on a machine shared with other work the CPU per commit is the
    steadier measure.
    """
    os.environ.update(environ)
    sys.path.insert(0, project)
    from app import create_app
    from app.api import check_if_match, commit_or_409, etag, get_or_404
    from app.extensions import db

    app = create_app()
    ids = range(first_id, first_id + ROWS_PER_WRITER)

    def backend_pid() -> int:
        with app.app_context():  # the pool hands this single thread the same connection every time
            return db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()

    def write(commits: int) -> None:
        with app.test_request_context(method="PATCH"):
            item = get_or_404(ids[commits % ROWS_PER_WRITER])
            check_if_match(item)
            item.quantity = commits
            commit_or_409(item)
            etag(item)

    backend_pid()
    results.put(None)  # ready
    while (command := commands.get()) is not None:
        if command == "calls":
            results.put(calls_per_write(app, db, write))
            continue
        commits = 0
        backend = backend_pid()
        started = (time.process_time(), process_cpu_seconds(backend))
        end = time.monotonic() + command
        while time.monotonic() < end:
            write(commits)
            commits += 1
        client, server = time.process_time() - started[0], process_cpu_seconds(backend) - started[1]
        results.put((commits, client, server if backend_pid() == backend else float("nan")))


def calls_per_write(app, db, write, writes: int = 500) -> tuple[float, float]:
    """Python function calls and SQL statements per write: figures no load on the machine changes."""
    import cProfile
    import pstats

    from sqlalchemy import event

    statements = []

    def count(*args) -> None:
        statements.append(None)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    profile = cProfile.Profile()
    try:
        profile.runcall(lambda: [write(index) for index in range(writes)])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    calls = sum(entry[1] for entry in pstats.Stats(profile).stats.values())
    return calls / writes, len(statements) / writes


class WriterGroup:
    """`processes` writer processes of one project, started once and told to write in rounds."""

    def __init__(self, context, project: Path, processes: int):
        self.commands = [context.Queue() for _ in range(processes)]
        self.results = context.Queue()
        # A web worker of the service does not relay (compose runs the relay on its own).
        environ = {**os.environ, "OUTBOX_RELAY_IN_APP": "false"}
        self.processes = [
            context.Process(
                target=service_writer,
                args=(str(project), environ, 1 + index * ROWS_PER_WRITER, commands, self.results),
            )
            for index, commands in enumerate(self.commands)
        ]
        for process in self.processes:
            process.start()

    def wait_ready(self) -> None:
        for _ in self.processes:
            self.results.get(timeout=1800)  # a loaded machine imports slowly

    def calls(self) -> dict[str, float]:
        """Python calls and SQL statements per commit, counted in one writer process."""
        self.commands[0].put("calls")
        calls, statements = self.results.get(timeout=1800)
        return {"calls": round(calls), "statements": statements}

    def run(self, seconds: float) -> dict[str, float]:
        """Write for `seconds`: commits/s, and client and PostgreSQL backend CPU per commit (µs)."""
        for commands in self.commands:
            commands.put(seconds)
        answers = [self.results.get(timeout=seconds + 600) for _ in self.processes]
        commits, client, server = (sum(column) for column in zip(*answers, strict=True))
        return {
            "commits_per_s": commits / seconds,
            "client_cpu_us": client / commits * 1e6,
            "server_cpu_us": server / commits * 1e6,
        }

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(30)


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
            upgrade(revision="heads")
            db.session.commit()
        self.state = self.app.extensions["outbox"]
        self.amqp_url = amqp_url
        self.sink = self.bind_sink_queue()

    @contextlib.contextmanager
    def sink_channel(self):
        """A short-lived broker channel: a BlockingConnection left idle through a long run misses heartbeats."""
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            yield connection.channel()
        finally:
            connection.close()

    def bind_sink_queue(self) -> str:
        """A queue on the exchange, so published messages are really routed and stored."""
        with self.sink_channel() as channel:
            channel.exchange_declare(self.exchange, "topic", durable=True)
            # Durable, so confirms wait for the disk as they would for a real consumer's
            # queue; bounded like a queue with a live consumer (old messages dropped).
            queue = channel.queue_declare(
                f"{self.exchange}-sink", durable=True, arguments={"x-max-length": 10_000}
            ).method.queue
            channel.queue_bind(queue, self.exchange, "#")
        return queue

    def purge_sink(self) -> None:
        with self.sink_channel() as channel:
            channel.queue_purge(self.sink)

    def close(self) -> None:
        with self.sink_channel() as channel:
            channel.queue_delete(self.sink)
            channel.exchange_delete(self.exchange)
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

    def latency(self, rate: int, seconds: float, writers: int = 3) -> dict:
        """Commit-to-confirm latency of events written one per transaction at `rate`/s.

        The writers are separate processes (as web workers would be), so they
        do not share this process's interpreter lock with the relay; times are
        CLOCK_MONOTONIC, which all processes of the machine share. Each keeps
        to a schedule (its n-th commit is due at start + n / its rate, a late
        one is followed at once by the next), so the rate offered is the one
        asked unless the machine cannot commit that fast: both are reported.
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
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(writers, mp_context=context) as pool:
            barrier = manager.Barrier(writers)  # every writer process started and imported: none starts late
            writer_pids = list(pool.map(warm_up, [self.project] * writers, [barrier] * writers))
            start = manager.Barrier(writers)  # and connected, with its first event written
            futures = [
                pool.submit(write_events, self.project, dict(os.environ), rate / writers, seconds, index / rate, start)
                for index in range(writers)
            ]
            cpu_before, clock_before = cpu_by_process(writer_pids), time.monotonic()
            committed = {}
            for future in futures:
                committed.update(future.result())
            cores = cores_by_role(cpu_before, cpu_by_process(writer_pids), time.monotonic() - clock_before)
        start_at = min(committed.values())
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
            "asked_per_s": rate,
            "writers": writers,
            "offered_per_s": round(len(committed) / offered_for),
            "events": len(committed),
            "confirmed": len(latencies),
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 1),
            "max_ms": round(latencies[-1], 1),
            # Cores each part kept busy while the writers ran (the machine has os.cpu_count()).
            "cores": cores,
        }

    def raw_publish_rate(self, events: int, batch: int = 500) -> float:
        """The relay's RabbitMQ client alone: the backlog's rows published in batches with confirms."""
        from common_utils.outbox import OutboxEvent
        from sqlalchemy import select

        self.fill_backlog(events)
        table = OutboxEvent.__table__
        columns = [table.c[name] for name in (
            "position", "id", "event_type", "aggregate_type", "aggregate_id",
            "ordering_key", "payload", "headers", "created_at", "retry_count",
        )]
        with self.app.app_context(), self.db.engine.connect() as connection:
            rows = connection.execute(select(*columns).order_by(table.c.position)).all()
        self.purge_sink()
        transport = self.state.transport
        transport.publish([])  # connect before the clock starts
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            results = transport.publish(rows[start : start + batch])
            assert all(result is None for result in results), results[:3]
        rate = len(rows) / (time.perf_counter() - started)
        self.purge_sink()
        return rate

    def writers(self, processes: int, seconds: float, rounds: int) -> dict:
        """Commits/s of `processes` concurrent service writers, outbox off and on, in interleaved rounds.

        "off" is the same service rendered with outbox=none, "on" this one;
        both change the same rows of the same table. Every process of both
        groups is started (and its app created) before the first round; in
        each round one group writes while the other waits, the first group
        alternating, so drift in the machine's load falls on both alike.
        """
        from sqlalchemy import text

        columns = "name, description, quantity, unit_price, status, created_at, updated_at, version"
        with self.app.app_context(), self.db.engine.begin() as connection:
            connection.execute(text("TRUNCATE orders RESTART IDENTITY"))
            connection.execute(
                text(
                    f"INSERT INTO orders ({columns}) SELECT 'bench-' || n, 'a row the writers change', 0, 9.99,"
                    " 'active', now(), now(), 1 FROM generate_series(1, :rows) AS n"
                ),
                {"rows": processes * ROWS_PER_WRITER},
            )
        context = multiprocessing.get_context("spawn")
        with tempfile.TemporaryDirectory() as folder:
            groups = {"off": render(Path(folder), outbox="none"), "on": Path(self.project)}
            groups = {mode: WriterGroup(context, project, processes) for mode, project in groups.items()}
            try:
                for group in groups.values():
                    group.wait_ready()
                per_round = []
                for index in range(rounds):
                    runs = {}
                    for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                        with self.app.app_context(), self.db.engine.begin() as connection:
                            connection.execute(text("TRUNCATE outbox_events"))
                        runs[mode] = groups[mode].run(seconds)
                    cpu = {mode: run["client_cpu_us"] + run["server_cpu_us"] for mode, run in runs.items()}
                    result = {
                        **{f"{mode}_{key}": round(value, 1) for mode, run in runs.items() for key, value in run.items()},
                        "ratio": round(runs["on"]["commits_per_s"] / runs["off"]["commits_per_s"], 3),
                        # What the ratio is when the writers have the CPU to themselves.
                        "cpu_ratio": round(cpu["off"] / cpu["on"], 3),
                    }
                    progress(f"writers round {index + 1}", result)
                    per_round.append(result)
                counted = {mode: group.calls() for mode, group in groups.items()}
                progress("writers' calls and statements per commit", counted)
            finally:
                for group in groups.values():
                    group.close()
        self.fill_backlog(0)
        summary = {
            key: statistics.median(result[key] for result in per_round)
            for key in per_round[0]
            if key.startswith(("off_", "on_"))
        }
        return {
            "rounds": per_round,
            **summary,
            "ratio_median": statistics.median(result["ratio"] for result in per_round),
            "cpu_ratio_median": statistics.median(result["cpu_ratio"] for result in per_round),
            **{f"{mode}_{key}": value for mode, count in counted.items() for key, value in count.items()},
            "calls_ratio": round(counted["off"]["calls"] / counted["on"]["calls"], 3),
        }

    def retention_rate(self, events: int) -> float:
        """Processed events past retention deleted per second by the relay's cleanup."""
        from sqlalchemy import text

        self.fill_backlog(events)
        with self.app.app_context(), self.db.engine.begin() as connection:
            connection.execute(
                text("UPDATE outbox_events SET status = 'processed', processed_at = now() - interval '30 days'")
            )
            connection.execute(text("ANALYZE outbox_events"))
        started = time.perf_counter()
        deleted = self.state.cleanup(max_batches=10_000)
        rate = deleted / (time.perf_counter() - started)
        assert deleted == events, (deleted, events)
        return rate

    def guide_as_written(self, rounds: int, interval: float = 10.0) -> float:
        """The guide's loop with its sleep: `process_pending_events(limit=10)` every `interval` s."""
        process_pending_events, close = self.guide_processor()
        started = time.perf_counter()
        done = 0
        with self.app.app_context():
            for round_ in range(rounds):
                done += process_pending_events(limit=10)
                if round_ < rounds - 1:
                    time.sleep(interval)
            self.db.session.remove()
        elapsed = max(time.perf_counter() - started, interval * (rounds - 1))
        close()
        return done / elapsed

    def guide_processor(self):
        """The guide's process_pending_events on this setup, and a function that closes its broker connection."""
        import pika
        from common_utils.outbox import PENDING, PROCESSED, OutboxEvent, utcnow
        from sqlalchemy import select

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

        def close():
            connection.close()
            self.purge_sink()

        return process_pending_events, close

    def guide_rate(self, events: int) -> float:
        """The guide's processor: query 10 pending, publish each (confirm), commit each; no sleep."""
        self.fill_backlog(events)
        process_pending_events, close = self.guide_processor()
        started = time.perf_counter()
        done = 0
        with self.app.app_context():
            while processed := process_pending_events(limit=10):
                done += processed
            self.db.session.remove()
        elapsed = time.perf_counter() - started
        close()
        return done / elapsed


def run_subset(args, only: set[str]) -> int:
    """Run some measurements only (to repeat one); prints them as JSON."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        project = render(Path(folder))
        sys.path.insert(0, str(project))
        os.chdir(project)
        bench = Bench(project, args.database_url, args.amqp_url)
        try:
            if "raw" in only:
                results["raw_claim_2_workers_per_s"] = bench.raw_rate(args.events, 2)
                results["raw_publish_per_s"] = bench.raw_publish_rate(args.events)
            if "relay" in only:
                results["relay_2_workers_per_s"] = bench.relay_rate(args.events, 2)
            if "latency" in only:
                results["latency"] = bench.latency(args.rate, args.seconds, args.latency_writers)
                results["idle_latency"] = bench.latency(5, 8.0, writers=1)
            if "writers" in only:
                results["writers"] = bench.writers(args.writers, args.writer_seconds, args.writer_rounds)
            if "retention" in only:
                results["retention_deleted_per_s"] = bench.retention_rate(args.events)
            if "guide" in only:
                results["guide_loop_without_sleep_per_s"] = bench.guide_rate(args.guide_events)
                bench.fill_backlog(args.guide_events)
                results["guide_loop_as_written_per_s"] = bench.guide_as_written(args.guide_rounds)
        finally:
            bench.close()
    print(json.dumps(results))
    return 0


def progress(name: str, value):
    print(f"[bench] {name}: {value}", file=sys.stderr, flush=True)
    return value


def warm_up(project: str, barrier) -> int:
    """Import what a writer needs, then wait until every process of the pool has; the process id."""
    sys.path.insert(0, project)
    import common_utils.outbox.relay  # noqa: F401
    import sqlalchemy  # noqa: F401

    barrier.wait()
    return os.getpid()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--events", type=int, default=100_000, help="backlog size")
    parser.add_argument("--rate", type=int, default=1000, help="offered events/s for the latency run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency run")
    parser.add_argument(
        "--latency-writers",
        type=int,
        default=3,
        # 12 processes committing 83 events/s each took 1.15 cores on their own on the 2-core
        # bench machine (a process that sleeps between commits pays about 1.3 ms of CPU each).
        help="writer processes offering --rate together",
    )
    parser.add_argument("--writers", type=int, default=16, help="writer processes for the commit throughput run")
    parser.add_argument("--writer-seconds", type=float, default=8.0, help="length of each commit throughput run")
    parser.add_argument("--writer-rounds", type=int, default=7, help="rounds of the commit throughput run (off and on each)")
    parser.add_argument("--guide-events", type=int, default=5000, help="backlog for the guide's loop")
    parser.add_argument("--guide-rounds", type=int, default=3, help="rounds of the guide's loop as written (10 s apart)")
    parser.add_argument("--only", help="comma-separated subset: raw,relay,latency,writers,retention,guide")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if only is not None:
        return run_subset(args, only)

    with tempfile.TemporaryDirectory() as folder:
        project = render(Path(folder))
        sys.path.insert(0, str(project))
        os.chdir(project)  # Flask-Migrate finds migrations/ from here
        bench = Bench(project, args.database_url, args.amqp_url)
        try:
            raw = {workers: progress(f"raw claim, {workers} worker(s)", bench.raw_rate(args.events, workers)) for workers in (1, 2)}
            raw_publish = progress("raw publish", bench.raw_publish_rate(args.events))
            relay = {workers: progress(f"relay, {workers} worker(s)", bench.relay_rate(args.events, workers)) for workers in (1, 2)}
            latency = progress("latency", bench.latency(args.rate, args.seconds, args.latency_writers))
            idle = progress("idle latency", bench.latency(5, 8.0, writers=1))
            writers = progress("writers", bench.writers(args.writers, args.writer_seconds, args.writer_rounds))
            retention = progress("retention", bench.retention_rate(args.events))
            guide = progress("guide, no sleep", bench.guide_rate(args.guide_events))
            bench.fill_backlog(args.guide_events)
            guide_written = progress("guide as written", bench.guide_as_written(args.guide_rounds))
        finally:
            bench.close()

    best_raw, best_relay = max(raw.values()), max(relay.values())
    slower_raw = min(best_raw, raw_publish)
    results = {
        "backlog_events": args.events,
        "raw_claim_and_update_per_s": {f"{workers}_workers": round(rate) for workers, rate in raw.items()},
        "raw_confirmed_publish_durable_per_s": round(raw_publish),
        "relay_rabbitmq_confirms_per_s": {f"{workers}_workers": round(rate) for workers, rate in relay.items()},
        "relay_share_of_slower_raw": round(best_relay / slower_raw, 3),
        "latency": latency,
        "idle_latency": idle,
        "writers": writers,
        "retention_deleted_per_s": round(retention),
        "guide_loop_without_sleep_per_s": round(guide, 1),
        "guide_loop_as_written_per_s": round(guide_written, 2),
    }
    print(f"backlog of {args.events} events, PostgreSQL -> RabbitMQ (durable queue) with confirms, batches of 500")
    for workers in (1, 2):
        print(f"  raw claim-lease-mark, no publish, {workers} worker(s)  {raw[workers]:8.0f} events/s")
    print(f"  raw confirmed publish, no database        {raw_publish:8.0f} events/s")
    for workers in (1, 2):
        print(
            f"  relay with confirms, {workers} worker(s)             {relay[workers]:8.0f} events/s"
            f"  ({relay[workers] / slower_raw:.0%} of the slower raw rate; target >= 80%)"
        )
    for name, run in (("latency", latency), ("idle relay", idle)):
        print(
            f"  {name} at {run['offered_per_s']} events/s offered of {run['asked_per_s']} asked by {run['writers']} writer(s) "
            f"(1 per transaction): p50 {run['p50_ms']} ms, "
            f"p99 {run['p99_ms']} ms, max {run['max_ms']} ms ({run['confirmed']}/{run['events']} confirmed); "
            f"cores busy: {', '.join(f'{role} {cores:.2f}' for role, cores in run['cores'].items())} "
            f"of {os.cpu_count()}"
        )
    print(
        f"  {args.writers} writers (PATCH's writes), medians of {args.writer_rounds} rounds: commits/s outbox off "
        f"{writers['off_commits_per_s']:.0f}, on {writers['on_commits_per_s']:.0f}; ratio on/off per round "
        f"{', '.join(format(result['ratio'], '.2f') for result in writers['rounds'])}, "
        f"median {writers['ratio_median']:.2f} (target >= 0.90); CPU per commit (client + PostgreSQL) off "
        f"{writers['off_client_cpu_us'] + writers['off_server_cpu_us']:.0f} µs, on "
        f"{writers['on_client_cpu_us'] + writers['on_server_cpu_us']:.0f} µs, ratio {writers['cpu_ratio_median']:.2f}; "
        f"Python calls per commit off {writers['off_calls']}, on {writers['on_calls']}, ratio {writers['calls_ratio']:.2f}; "
        f"SQL statements off {writers['off_statements']:.1f}, on {writers['on_statements']:.1f}"
    )
    print(f"  retention: {retention:8.0f} processed events deleted/s (target >= 10,000)")
    print(f"  guide's loop, no sleep                   {guide:8.1f} events/s  ({best_relay / guide:.0f}x slower than the relay)")
    print(f"  guide's loop as written (limit=10, 10 s sleep), {args.guide_rounds} rounds: {guide_written:.2f} events/s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

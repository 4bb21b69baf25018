"""Waking relays when events are committed, without slowing the writers' commits.

A `pg_notify` inside the writing transaction takes PostgreSQL's global
notify lock at commit, which serialises every writer's commit. Here the
writer's transaction does nothing extra: after a commit that wrote events,
the session hook wakes relays in this process at once and asks the
`Notifier`, which sends one NOTIFY from its own connection, outside any
writer's transaction, at most once per OUTBOX_NOTIFY_INTERVAL however many
commits happened meanwhile. Relays in other processes `LISTEN` for it
(`PostgresListener`); everywhere they also poll, up to
OUTBOX_PROCESSING_INTERVAL apart, which is the only wake-up on MySQL and
SQLite across processes.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from common_utils.outbox.model import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)


def libpq_conninfo(url) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Notifier:
    """Sends NOTIFY for commits of this process, coalesced to one per `interval`."""

    def __init__(self, url, interval: float):
        self.url = url
        self.interval = interval
        self.pending = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid: int | None = None
        self.lock = threading.Lock()

    def wake(self, url=None) -> None:
        if url is not None and url != self.url:
            return
        if not self.pending.is_set():  # else the next NOTIFY is already due: no lock, no thread switch
            self.pending.set()
        if self.thread is None or self.pid != os.getpid():  # first use, or a forked child
            with self.lock:
                if self.thread is None or self.pid != os.getpid():
                    self.pid = os.getpid()
                    self.thread = threading.Thread(target=self.run, name="outbox-notify", daemon=True)
                    self.thread.start()

    def run(self) -> None:
        import psycopg

        wait = 0.5
        while True:
            try:
                with psycopg.connect(libpq_conninfo(self.url), autocommit=True, connect_timeout=5) as connection:
                    wait = 0.5
                    while True:
                        self.pending.wait()
                        self.pending.clear()
                        connection.execute(f"NOTIFY {NOTIFY_CHANNEL}")
                        time.sleep(self.interval)  # commits meanwhile share the next NOTIFY
            except Exception as error:  # the relays' polling covers the gap
                logger.warning("outbox notifier: %s; retrying in %.1fs", error, wait)
                time.sleep(wait)
                wait = min(wait * 2, 30.0)


class PostgresListener:
    """LISTEN on the outbox channel in a thread; a notification wakes the relay."""

    def __init__(self, relay):
        self.relay = relay
        self.thread = threading.Thread(target=self.run, name="outbox-listen", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.join(2.0)

    def run(self) -> None:
        import psycopg

        wait = 0.5
        while not self.relay.stopping.is_set():
            try:
                with psycopg.connect(libpq_conninfo(self.relay.url), autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    wait = 0.5
                    self.relay.wake()  # catch up on what came in while not listening
                    while not self.relay.stopping.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            self.relay.wake()
            except Exception as error:  # keep listening through database restarts
                logger.warning("outbox LISTEN connection lost, reconnecting in %.1fs: %s", wait, error)
                self.relay.stopping.wait(wait)
                wait = min(wait * 2, 30.0)

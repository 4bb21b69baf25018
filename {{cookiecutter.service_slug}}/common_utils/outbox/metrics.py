"""The outbox's Prometheus series, on the app's own registry.

The gauges are read from the database at each scrape, so every process of
the service reports the same backlog and relay health, wherever the relay
runs; the counters count what the relaying process itself did.
"""

from __future__ import annotations

from common_utils.outbox.transport import SKIPPED, TransportUnavailable


class OutboxMetrics:
    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        def gauge(name: str, description: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, description, labels, registry=registry, multiprocess_mode="livemostrecent")

        self.pending = gauge("outbox_events_pending", "Events waiting to be published")
        self.dead = gauge("outbox_events_dead_lettered", "Events in the dead letter state (failed), each parking its key")
        self.lag = gauge("outbox_relay_lag_seconds", "Age of the oldest pending event")
        self.relays = gauge(
            "outbox_relays", "Relay loops by heartbeat: live, or stale (dead or stuck)", ("state",)
        )
        self.heartbeat_age = gauge(
            "outbox_relay_heartbeat_age_seconds", "Seconds since the freshest relay heartbeat (-1: no relay)"
        )
        self.published = Counter(
            "outbox_events_published", "Events published (confirmed by the broker or run in process)",
            ["event_type"], registry=registry,
        )
        self.failed = Counter(
            "outbox_events_failed", "Events dead-lettered after OUTBOX_MAX_RETRY attempts",
            ["event_type"], registry=registry,
        )
        self.errors = Counter(
            "outbox_publish_errors", "Failed publish attempts (each is retried with backoff)",
            ["event_type"], registry=registry,
        )
        self.restarts = Counter(
            "outbox_relay_restarts", "Relay loop iterations that raised and were restarted after a backoff",
            registry=registry,
        )

    def count(self, rows: list, results: list) -> None:
        for row, result in zip(rows, results, strict=True):
            if result is None:
                self.published.labels(row.event_type).inc()
            elif result is not SKIPPED and not isinstance(result, TransportUnavailable):
                self.errors.labels(row.event_type).inc()

    def dead_lettered(self, event_type: str) -> None:
        self.failed.labels(event_type).inc()

    def observe(self, stats: dict) -> None:
        self.pending.set(stats["pending"])
        self.dead.set(stats["failed"])
        self.lag.set(stats["lag_seconds"])

    def observe_relays(self, health: dict) -> None:
        self.relays.labels("live").set(health["live"])
        self.relays.labels("stale").set(health["stale"])
        age = health["heartbeat_age_seconds"]
        self.heartbeat_age.set(-1 if age is None else age)

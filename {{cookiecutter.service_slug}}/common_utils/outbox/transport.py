"""What a transport promises the relay, and the outcomes it reports per event.

A transport has `publish(rows) -> list`, one outcome per row in the same
order: None (the broker accepted the event: it is marked processed),
SKIPPED (not attempted: it stays pending, unchanged), a
TransportUnavailable (the broker cannot be reached: the batch waits and no
retry is counted) or any other exception (this event failed: it counts
toward its retries and dead letter). It also has `status() -> dict` for
/health/ready and `close()`.
"""

from __future__ import annotations


class TransportUnavailable(Exception):
    """The broker cannot be reached: the batch waits, no retry is counted."""


class Skipped:
    """A result meaning "not attempted": the event stays pending, unchanged."""

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED = Skipped()

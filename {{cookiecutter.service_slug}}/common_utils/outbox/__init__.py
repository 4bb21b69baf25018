"""The transactional outbox, one module per job.

- model: the OutboxEvent table, OutboxMixin and the session hooks that
  write events in the writer's own transaction;
- payload: the row an event's payload is built from, exactly as written
  (from memory where that is provably the row, else read back);
- relay: claims due events, hands them to a transport, marks the outcome;
- processor: the guide's OutboxProcessor, which holds the event handlers
  and binds the relay to an app;
- transport: the contract between the relay and a transport;
- rabbitmq: the RabbitMQ transport (publisher confirms);
- consumer: idempotent consumers (ProcessedMessage) and the version check
  that tells a consumer about gaps and reordering.

The migration guide's names are importable from here.
"""

from common_utils.outbox.consumer import (
    ProcessedMessage,
    VersionOrder,
    check_version,
    idempotent_consumer,
)
from common_utils.outbox.model import (
    FAILED,
    PENDING,
    PROCESSED,
    OutboxEvent,
    OutboxMixin,
    continue_trace,
    event_values,
    utcnow,
)
from common_utils.outbox.processor import OutboxProcessor

__all__ = [
    "FAILED",
    "PENDING",
    "PROCESSED",
    "OutboxEvent",
    "OutboxMixin",
    "OutboxProcessor",
    "ProcessedMessage",
    "VersionOrder",
    "check_version",
    "continue_trace",
    "event_values",
    "idempotent_consumer",
    "utcnow",
]

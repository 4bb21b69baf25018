"""The service's outbox processor and its in-process event handlers.

Changing a {{ cookiecutter.resource_name.replace('_', ' ') }} writes `{{ cookiecutter.resource_name }}.created`, `{{ cookiecutter.resource_name }}.updated` or
`{{ cookiecutter.resource_name }}.deleted` to the outbox in the same transaction (OutboxMixin on the
model). The relay then publishes each event: to RabbitMQ with
OUTBOX_TRANSPORT=rabbitmq, or to the handlers registered below with
OUTBOX_TRANSPORT=in_process. A handler is called as
`handler(aggregate_id, payload, event)`; one that raises is retried with
backoff and, after OUTBOX_MAX_RETRY attempts, dead-lettered.

The processor lives here rather than in app/extensions.py because it needs
the OutboxEvent model, which itself needs `db` from app/extensions.py.
"""

import logging

from app.extensions import db
from common_utils.outbox import OutboxEvent, OutboxProcessor

logger = logging.getLogger(__name__)

processor = OutboxProcessor(db, OutboxEvent)


@processor.register_handler("{{ cookiecutter.resource_name }}.created")
def log_{{ cookiecutter.resource_name }}_created(aggregate_id: str, payload: dict, event: OutboxEvent) -> None:
    """An example reaction to this service's own event: replace with real work."""
    logger.info(
        "{{ cookiecutter.resource_name }} %s created", aggregate_id, extra={"event_id": event.id, "event_type": event.event_type}
    )

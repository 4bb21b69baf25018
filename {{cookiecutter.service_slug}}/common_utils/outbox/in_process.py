"""The `in_process` transport: the processor's registered handlers, run by the relay.

This is the migration guide's behaviour: `handler(aggregate_id, payload,
event)` for each event of a registered type. Events of one ordering key run
in order; once one fails, the later events of that key in the batch are
not attempted (SKIPPED), so they cannot overtake it. A handler runs outside
any transaction of the relay; keep it shorter than OUTBOX_LEASE_SECONDS, or
another relay may take the batch again meanwhile (a duplicate, as after a
crash).
"""

from __future__ import annotations

import json
import logging

from flask import Flask

from common_utils.outbox.model import continue_trace
from common_utils.outbox.transport import SKIPPED

logger = logging.getLogger(__name__)


class InProcessTransport:
    name = "in_process"

    def __init__(self, processor, app: Flask, tracer=None):
        self.processor = processor
        self.app = app
        self.tracer = tracer

    def publish(self, rows: list) -> list:
        results: list = []
        failed_keys: set[str] = set()
        for row in rows:
            if row.ordering_key in failed_keys:
                results.append(SKIPPED)
                continue
            event = self.processor.model(**row._asdict())
            handlers = self.processor.handlers.get(row.event_type, []) + self.processor.handlers.get("*", [])
            try:
                if handlers:
                    payload = json.loads(row.payload)
                    with continue_trace(
                        event.header_map,
                        f"{row.event_type} process",
                        tracer=self.tracer,
                        **{"messaging.message.id": row.id, "messaging.system": "in_process"},
                    ):
                        for handler in handlers:
                            handler(row.aggregate_id, payload, event)
                results.append(None)
            except Exception as error:  # a handler's failure is the event's, retried later
                logger.warning("outbox handler failed for %s %s: %r", row.event_type, row.id, error)
                failed_keys.add(row.ordering_key)
                results.append(error)
            finally:
                self.processor.db.session.remove()  # a handler's session work never leaks into the next
        return results

    def status(self) -> dict:
        return {"transport": self.name}

    def close(self) -> None:
        pass

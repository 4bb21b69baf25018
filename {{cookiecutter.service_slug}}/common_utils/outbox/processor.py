"""The migration guide's OutboxProcessor: the service's event handlers, and its relay bound to an app.

It sits above both the model and the relay, which it needs, so neither of
them has to import it: model.py knows nothing of relaying, and the relay is
handed its processor by `init_app`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app

from common_utils.outbox.model import OutboxEvent
from common_utils.outbox.relay import EXTENSION_KEY, init_outbox

Handler = Callable[[str, Any, Any], Any]


class OutboxProcessor:
    """The guide's processor: handlers by event type, and the relay that runs them.

    Like a blueprint, it is made once (`OutboxProcessor(db, OutboxEvent)`)
    and bound to each app with `init_app(app)`, which reads the OUTBOX_*
    settings and keeps the app's transport, metrics and relay in
    `app.extensions["outbox"]`. Handlers are called as
    `handler(aggregate_id, payload, event)` by the `in_process` transport.
    """

    def __init__(self, db, model=None, app: Flask | None = None):
        self.db = db
        self.model = model if model is not None else OutboxEvent
        self.handlers: dict[str, list[Handler]] = defaultdict(list)
        if app is not None:
            self.init_app(app)

    def register_handler(self, event_type: str) -> Callable[[Handler], Handler]:
        """Decorator: run the function for every event of `event_type` ("*" for all)."""

        def decorator(handler: Handler) -> Handler:
            self.handlers[event_type].append(handler)
            return handler

        return decorator

    def init_app(self, app: Flask) -> None:
        init_outbox(app, self)

    def process_pending_events(self, limit: int | None = None) -> int:
        """Publish one batch of due events (in the current app); return how many were processed."""
        return self.state().process_batch(limit)

    def start_relay_thread(self, app: Flask, *, on_first_request: bool = False) -> None:
        """Run the relay in a background thread of this process (once per process)."""
        self.state(app).start_thread(on_first_request=on_first_request)

    def state(self, app: Flask | None = None):
        return (app or current_app).extensions[EXTENSION_KEY]

"""The service's log format: one JSON object a line on stdout.

The app (app/request_logging.py) adds the request id to each line; gunicorn's
master, which never builds the app, uses the same handler for its own lines
(gunicorn.conf.py), so everything the service prints parses as JSON.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

FIELDS = "{asctime}{levelname}{name}{message}{request_id}"


class StdoutHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stdout is when a line is written.

    A plain StreamHandler(sys.stdout) keeps the stream of the moment it was
    made: under pytest, which swaps sys.stdout per test and closes its
    replacements, later lines (at exit, say) would go to a closed file.
    `setStream` still pins a stream; `setStream(None)` follows sys.stdout again.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self._pinned = None

    @property
    def stream(self):
        return self._pinned if self._pinned is not None else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        self._pinned = value

    def setStream(self, stream):
        """Pin `stream` (None: follow sys.stdout); returns the previous pin, None when there was none."""
        previous = self._pinned
        self.flush()
        self._pinned = stream
        return previous


def json_formatter() -> JsonFormatter:
    """timestamp, level, logger, message and request_id (null outside a request), plus any `extra`."""
    return JsonFormatter(
        FIELDS,
        style="{",
        rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
    )


def configure_json_logging(level: str | int = "INFO", *filters: logging.Filter) -> None:
    """Put the service's JSON handler on the root logger. Safe to call again: it is replaced, not added.

    Features add fields to every line by adding a logging.Filter to the
    handler marked `is_service_handler` (tracing adds trace_id and span_id);
    a replaced handler hands those filters on to its successor.
    """
    root = logging.getLogger()
    kept = []
    for handler in list(root.handlers):
        if getattr(handler, "is_service_handler", False):
            kept += [f for f in handler.filters if not any(type(f) is type(new) for new in filters)]
            root.removeHandler(handler)
    handler = StdoutHandler()
    handler.is_service_handler = True
    for log_filter in (*filters, *kept):
        handler.addFilter(log_filter)
    handler.setFormatter(json_formatter())
    root.addHandler(handler)
    root.setLevel(level)

"""`flask outbox ...`: run the relay, inspect the outbox, repair parked keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

logger = logging.getLogger(__name__)

outbox_cli = AppGroup("outbox", help="Publish, inspect and repair the transactional outbox.")


def current_state():
    return current_app.extensions["outbox"]


@outbox_cli.command("relay")
@click.option("--once", is_flag=True, help="Publish everything due, then exit.")
@click.option("--heartbeat-file", type=click.Path(dir_okay=False, path_type=Path), help="Touched after every loop (for container health checks).")
def relay_command(once: bool, heartbeat_file: Path | None) -> None:
    """Run the relay in the foreground (compose runs it as the outbox-relay service)."""
    import signal

    state = current_state()
    if not state.settings.enabled:
        raise click.ClickException("OUTBOX_ENABLED is false")
    relay = state.relay()
    relay.heartbeat_file = heartbeat_file
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: relay.stop())
    logger.info("outbox relay started (transport %s)", state.transport_name)
    try:
        total = relay.run(once=once)
    finally:
        state.close()
    click.echo(f"published {total} event(s)")


@outbox_cli.command("requeue")
@click.argument("ids", nargs=-1)
@click.option("--id", "event_ids", multiple=True, help="A dead-lettered event's id (repeatable).")
@click.option("--event-type", help="Only events of this type.")
@click.option("--all", "everything", is_flag=True, help="Every dead-lettered event.")
def requeue_command(ids: tuple[str, ...], event_ids: tuple[str, ...], event_type: str | None, everything: bool) -> None:
    """Retry dead-lettered events. Each is published before the later events of its key,
    which were parked behind it, so the key's order is kept."""
    selected = [*ids, *event_ids]
    if not (selected or event_type or everything):
        raise click.UsageError("say which events: their ids, --event-type or --all")
    count = current_state().requeue(selected, event_type)
    click.echo(f"requeued {count} event(s)")


@outbox_cli.command("skip")
@click.argument("ids", nargs=-1, required=True)
def skip_command(ids: tuple[str, ...]) -> None:
    """Give up on dead-lettered events: they are never published, and the later events
    of their keys, parked behind them, go on. Consumers see a gap in those keys."""
    count = current_state().skip(list(ids))
    click.echo(f"skipped {count} event(s)")


@outbox_cli.command("status")
def status_command() -> None:
    """Pending and dead-lettered counts, the relay lag, and the relays' heartbeats."""
    state = current_state()
    click.echo(json.dumps({**state.stats(), "relays": state.relay_health()}))


@outbox_cli.command("cleanup")
def cleanup_command() -> None:
    """Delete finished events older than OUTBOX_RETENTION_HOURS now."""
    click.echo(f"deleted {current_state().cleanup()} finished event(s)")

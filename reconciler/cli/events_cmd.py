"""``reconciler events``: the fleet's event stream (started, crashed, backing off...).

Without ``--follow`` it prints the stored events that match and exits; with it, it
keeps printing new events as the Manager stores them, one line each (one JSON object
per line with ``-o json``), resuming after the last one seen when the connection
drops, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import click
import grpc

from reconciler.api.agent.v1 import event_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.client import FleetClient, recent_events, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.get_cmd import enum_word
from reconciler.cli.output import OutputFormat, output_option, print_records
from reconciler.convert import message_to_dict, timestamp

__all__ = ["event_line", "event_row", "events"]

#: Seconds before a dropped --follow stream is opened again.
RECONNECT_S: Final = 1.0


def event_row(event: event_pb2.Event) -> dict[str, Any]:
    """One table row of an event."""
    when = datetime.fromtimestamp(event.time.ToNanoseconds() / 1e9, UTC)
    return {
        "time": when.strftime("%Y-%m-%d %H:%M:%S"),
        "type": enum_word(event_pb2.EventType.Name(event.type), "EVENT_TYPE_"),
        "node": event.node_id or "-",
        "agent": event.agent_id or "-",
        "message": event.message,
    }


def event_line(event: event_pb2.Event) -> str:
    """One event as a line of text for --follow."""
    row = event_row(event)
    return f"{row['time']}  {row['type']:<18} {row['node']:<16} {row['agent']:<16} {row['message']}"


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--node", metavar="NODE", help="Only events of this node.")
@click.option("--agent", "agent_id", metavar="ID", help="Only events of this agent.")
@manager_options
@output_option()
@click.pass_context
def events(
    ctx: click.Context,
    follow: bool,
    node: str | None,
    agent_id: str | None,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """List recent events, newest last."""
    client = FleetClient(connection)
    if follow:
        run(_follow(client, node or "", agent_id or "", output), address=client.address)
        return
    found = run(_stored(client, node or "", agent_id or ""), address=client.address)
    if output is OutputFormat.TABLE:
        print_records([event_row(e) for e in found], output)
    else:
        print_records([message_to_dict(e) for e in found], output)


async def _stored(client: FleetClient, node_id: str, agent_id: str) -> Sequence[event_pb2.Event]:
    async with client:
        return await recent_events(client, node_id=node_id, agent_id=agent_id)


def _print_one(event: event_pb2.Event, output: OutputFormat) -> None:
    if output is OutputFormat.TABLE:
        click.echo(event_line(event))
    elif output is OutputFormat.JSON:
        click.echo(json.dumps(message_to_dict(event), separators=(",", ":")))
    else:
        print_records([message_to_dict(event)], output)


async def _follow(client: FleetClient, node_id: str, agent_id: str, output: OutputFormat) -> None:
    """Stored events, then new ones; resume after the last sequence on UNAVAILABLE."""
    last = 0
    async with client:
        while True:
            request = fleet_pb2.WatchEventsRequest(node_id=node_id, agent_id=agent_id)
            if last:
                request.after_sequence = last
            else:
                request.since.CopyFrom(timestamp(0))
            try:
                async for event in client.fleet.WatchEvents(request):
                    last = event.sequence
                    _print_one(event, output)
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.UNAVAILABLE or not last:
                    raise
            await asyncio.sleep(RECONNECT_S)

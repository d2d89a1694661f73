"""``reconciler delete agentset NAME`` removes an AgentSet (its agents are stopped);
``reconciler delete node NODE`` makes the Manager forget a node gone for good."""

from __future__ import annotations

import click

from reconciler.api.agent.v1 import node_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.apply_cmd import describe_change
from reconciler.cli.client import FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.get_cmd import enum_word

__all__ = ["agentset", "delete", "node"]


@click.group()
def delete() -> None:
    """Delete an AgentSet, or a node the Manager should forget."""


@delete.command()
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="Show what would change, change nothing.")
@manager_options
@click.pass_context
def agentset(ctx: click.Context, name: str, dry_run: bool, connection: ManagerConnection) -> None:
    """Delete AgentSet NAME; the nodes it selected stop its agents."""
    client = FleetClient(connection)
    response = run(_delete(client, name, dry_run=dry_run), address=client.address)
    click.echo(f"agentset/{name} deleted{' (dry run)' if dry_run else ''}")
    for change in response.node_changes:
        click.echo(describe_change(change))


async def _delete(
    client: FleetClient, name: str, *, dry_run: bool
) -> fleet_pb2.DeleteAgentSetResponse:
    async with client:
        request = fleet_pb2.DeleteAgentSetRequest(name=name, dry_run=dry_run)
        response: fleet_pb2.DeleteAgentSetResponse = await client.fleet.DeleteAgentSet(
            request, timeout=client.timeout_s
        )
        return response


@delete.command()
@click.argument("node_id", metavar="NODE")
@manager_options
@click.pass_context
def node(ctx: click.Context, node_id: str, connection: ManagerConnection) -> None:
    """Forget NODE and its observed agents (for a node gone for good).

    Nothing on the node is stopped. A daemon still running there registers again at
    its next heartbeat and gets its agents back.
    """
    client = FleetClient(connection)
    response = run(_delete_node(client, node_id), address=client.address)
    status = enum_word(node_pb2.NodeStatus.Name(response.node.status), "NODE_STATUS_")
    click.echo(f"node/{node_id} deleted (was {status})")


async def _delete_node(client: FleetClient, node_id: str) -> fleet_pb2.DeleteNodeResponse:
    async with client:
        response: fleet_pb2.DeleteNodeResponse = await client.fleet.DeleteNode(
            fleet_pb2.DeleteNodeRequest(node_id=node_id), timeout=client.timeout_s
        )
        return response

"""``reconciler delete agentset NAME``: remove an AgentSet; its agents are stopped."""

from __future__ import annotations

import click

from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.apply_cmd import describe_change
from reconciler.cli.client import FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options

__all__ = ["agentset", "delete"]


@click.group()
def delete() -> None:
    """Delete an AgentSet."""


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

"""``reconciler events``: the fleet's event stream (started, crashed, backing off...)."""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import not_implemented
from reconciler.cli.output import OutputFormat, output_option

__all__ = ["events"]


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
    not_implemented(ctx)

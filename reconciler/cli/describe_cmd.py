"""``reconciler describe node|agent NAME``: one object in detail, with recent events."""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import not_implemented
from reconciler.cli.output import OutputFormat, output_option

__all__ = ["agent", "describe", "node"]


@click.group()
def describe() -> None:
    """Show one node or agent in detail."""


@describe.command()
@click.argument("name")
@manager_options
@output_option()
@click.pass_context
def node(
    ctx: click.Context, name: str, connection: ManagerConnection, output: OutputFormat
) -> None:
    """Show node NAME: labels, readiness, generations, agents."""
    not_implemented(ctx)


@describe.command()
@click.argument("name")
@click.option("--node", "node_name", metavar="NODE", help="The node the agent runs on.")
@manager_options
@output_option()
@click.pass_context
def agent(
    ctx: click.Context,
    name: str,
    node_name: str | None,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """Show agent NAME: spec, phase, restarts, backoff, last exit, heartbeats."""
    not_implemented(ctx)

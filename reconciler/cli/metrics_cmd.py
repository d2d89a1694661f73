"""``reconciler metrics ID``: an agent's CPU and memory samples (GetAgentMetrics)."""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import DURATION, Target, not_implemented, target_options
from reconciler.cli.output import OutputFormat, output_option

__all__ = ["metrics"]


@click.command()
@click.argument("agent_id", metavar="ID")
@target_options
@click.option(
    "--since",
    type=DURATION,
    default="10m",
    show_default=True,
    help="How far back (e.g. 30s, 10m, 1h).",
)
@manager_options
@output_option()
@click.pass_context
def metrics(
    ctx: click.Context,
    agent_id: str,
    target: Target,
    since: float,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """Show the resource samples of agent ID."""
    not_implemented(ctx)

"""``reconciler apply -f FILE``: send AgentSets to the Manager (FleetService)."""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import DURATION, not_implemented
from reconciler.cli.output import OutputFormat, output_option

__all__ = ["apply"]


@click.command()
@click.option(
    "-f",
    "--file",
    "files",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    required=True,
    help="AgentSet YAML file. Repeatable.",
)
@click.option("--dry-run", is_flag=True, help="Validate on the Manager, change nothing.")
@click.option("--wait", is_flag=True, help="Wait until every selected node has converged.")
@click.option(
    "--timeout",
    type=DURATION,
    default="120s",
    show_default=True,
    help="How long --wait waits (e.g. 90s, 5m).",
)
@manager_options
@output_option()
@click.pass_context
def apply(
    ctx: click.Context,
    files: tuple[str, ...],
    dry_run: bool,
    wait: bool,
    timeout: float,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """Create or update the AgentSets in FILE."""
    not_implemented(ctx)

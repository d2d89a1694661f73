"""``reconciler get nodes|agents|agentsets``: list fleet objects.

Through the Manager by default; ``get agents --daemon ADDR`` asks one daemon directly.
"""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import KEY_VALUE, Target, not_implemented, target_options
from reconciler.cli.output import OutputFormat, output_option

__all__ = ["agents", "agentsets", "get", "nodes"]


def _selector(func: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "-l",
        "--selector",
        "selector",
        type=KEY_VALUE,
        multiple=True,
        help="Only objects with this label (key=value). Repeatable; all must match.",
    )(func)


def _watch(func: click.decorators.FC) -> click.decorators.FC:
    return click.option("--watch", is_flag=True, help="Keep printing changes.")(func)


@click.group()
def get() -> None:
    """List nodes, agents or AgentSets."""


@get.command()
@click.option("--node", metavar="NODE", help="Only this node.")
@_selector
@_watch
@manager_options
@output_option()
@click.pass_context
def nodes(
    ctx: click.Context,
    node: str | None,
    selector: tuple[tuple[str, str], ...],
    watch: bool,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """List the nodes known to the Manager."""
    not_implemented(ctx)


@get.command()
@target_options
@_selector
@_watch
@manager_options
@output_option()
@click.pass_context
def agents(
    ctx: click.Context,
    target: Target,
    selector: tuple[tuple[str, str], ...],
    watch: bool,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """List agents with their observed state (all nodes, one node, or one daemon)."""
    not_implemented(ctx)


@get.command()
@click.option("--node", metavar="NODE", help="Only AgentSets that select this node.")
@_selector
@_watch
@manager_options
@output_option()
@click.pass_context
def agentsets(
    ctx: click.Context,
    node: str | None,
    selector: tuple[tuple[str, str], ...],
    watch: bool,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """List the AgentSets stored in the Manager."""
    not_implemented(ctx)

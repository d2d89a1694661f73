"""``reconciler delete agentset NAME``: remove an AgentSet; its agents are stopped."""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import not_implemented

__all__ = ["agentset", "delete"]


@click.group()
def delete() -> None:
    """Delete an AgentSet."""


@delete.command()
@click.argument("name")
@manager_options
@click.pass_context
def agentset(ctx: click.Context, name: str, connection: ManagerConnection) -> None:
    """Delete AgentSet NAME; the nodes it selected stop its agents."""
    not_implemented(ctx)

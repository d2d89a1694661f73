"""``reconciler agent start|stop|restart ID``: operate one agent (OperateAgent).

``restart`` is imperative and clears backoff; ``stop``/``start`` are a local override
kept until the next newer generation. ``--operation-id`` makes a retried call act once.
"""

from __future__ import annotations

import click

from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import Target, not_implemented, target_options

__all__ = ["OPERATIONS", "agent"]

#: The operations, with their help text.
OPERATIONS = {
    "start": "Start agent ID (an override until the next newer desired state).",
    "stop": "Stop agent ID (an override until the next newer desired state).",
    "restart": "Restart agent ID once now, clearing any crash backoff.",
}


@click.group()
def agent() -> None:
    """Start, stop or restart one agent."""


def _operation(name: str, help_text: str) -> click.Command:
    @click.argument("agent_id", metavar="ID")
    @target_options
    @click.option(
        "--operation-id",
        metavar="ID",
        help="Idempotency key: a retried call with the same id acts once.",
    )
    @manager_options
    @click.pass_context
    def run(
        ctx: click.Context,
        agent_id: str,
        target: Target,
        operation_id: str | None,
        connection: ManagerConnection,
    ) -> None:
        not_implemented(ctx)

    return click.command(name=name, help=help_text)(run)


for _name, _help in OPERATIONS.items():
    agent.add_command(_operation(_name, _help))

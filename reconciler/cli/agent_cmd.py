"""``reconciler agent start|stop|restart ID``: operate one agent (OperateAgent).

``restart`` is imperative and clears backoff; ``stop``/``start`` are a local override
kept until the next newer generation. ``--operation-id`` makes a retried call act once
(one is made up when not given).

Through the Manager, which proxies the call to the node's daemon: ``--node NODE``
names the node; without it the agent's node is looked up (it must be on exactly one).
``--daemon ADDR`` talks to one daemon directly.

``reconciler agent update ID --version V --daemon ADDR [-- ARGV...]`` rolls one agent
on one daemon to a new version (PushUpdate): it waits for the rollout, which the daemon
reverts when the new version is not healthy within ``--health-deadline``, and exits 1
unless the update succeeded (or there was nothing to change). Fleet-wide versions
change through AgentSets instead.
"""

from __future__ import annotations

import uuid
from typing import Final

import click

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.client import DaemonClient, FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import DURATION, CliError, Target, target_options
from reconciler.cli.output import OutputFormat, output_option, print_records
from reconciler.convert import message_to_dict, operation_to_proto

__all__ = ["OPERATIONS", "agent", "find_node"]

#: The operations, with their help text.
OPERATIONS = {
    "start": "Start agent ID (an override until the next newer desired state).",
    "stop": "Stop agent ID (an override until the next newer desired state).",
    "restart": "Restart agent ID once now, clearing any crash backoff.",
}


#: Seconds the update call may take beyond the health deadline (the stop of the old
#: version, the start of the new one, and a rollback when it comes to that).
_UPDATE_SLACK_S: Final = 60.0

_GOOD_OUTCOMES: Final = (daemon_pb2.UPDATE_OUTCOME_SUCCEEDED, daemon_pb2.UPDATE_OUTCOME_UNCHANGED)


#: ``--operation-id``, shared by every command that acts on an agent.
_operation_id = click.option(
    "--operation-id",
    metavar="ID",
    help="Idempotency key: a retried call with the same id acts once.",
)


@click.group()
def agent() -> None:
    """Start, stop, restart or update one agent."""


def _operation(name: str, help_text: str) -> click.Command:
    @click.argument("agent_id", metavar="ID")
    @target_options
    @_operation_id
    @manager_options
    @click.pass_context
    def run_operation(
        ctx: click.Context,
        agent_id: str,
        target: Target,
        operation_id: str | None,
        connection: ManagerConnection,
    ) -> None:
        request = agent_pb2.AgentOperationRequest(
            agent_id=agent_id,
            operation=operation_to_proto(name),
            operation_id=operation_id or uuid.uuid4().hex,
        )
        if target.daemon is not None:
            _operate_on_daemon(target.daemon, request, connection=connection)
            return
        _operate_through_manager(target.node, request, connection=connection)

    return click.command(name=name, help=help_text)(run_operation)


for _name, _help in OPERATIONS.items():
    agent.add_command(_operation(_name, _help))


async def find_node(client: FleetClient, agent_id: str) -> str:
    """The node the Manager knows ``agent_id`` on; CliError when none or several."""
    listed = await client.fleet.ListAgents(fleet_pb2.ListAgentsRequest(), timeout=client.timeout_s)
    nodes = sorted({a.node_id for a in listed.agents if agent_id in (a.spec.id, a.info.agent_id)})
    if not nodes:
        raise CliError(f"agent {agent_id!r} is on no node the Manager knows")
    if len(nodes) > 1:
        raise CliError(f"agent {agent_id!r} is on several nodes ({', '.join(nodes)}): use --node")
    return nodes[0]


def _operate_through_manager(
    node: str | None, request: agent_pb2.AgentOperationRequest, *, connection: ManagerConnection
) -> None:
    client = FleetClient(connection)
    node_id, response = run(_operate(client, node, request), address=client.address)
    _report(node_id, response)


def _report(where: str, response: agent_pb2.AgentOperationResponse) -> None:
    operation = agent_pb2.Operation.Name(response.operation).removeprefix("OPERATION_").lower()
    summary = f": {response.message}" if response.message else ""
    again = " (already done: this operation id was seen before)" if response.duplicate else ""
    click.echo(f"agent {response.agent_id} on {where}: {operation}{summary}{again}")


async def _operate(
    client: FleetClient, node: str | None, request: agent_pb2.AgentOperationRequest
) -> tuple[str, agent_pb2.AgentOperationResponse]:
    async with client:
        node_id = node or await find_node(client, request.agent_id)
        wrapped = fleet_pb2.OperateAgentRequest(node_id=node_id, request=request)
        response: agent_pb2.AgentOperationResponse = await client.fleet.OperateAgent(
            wrapped, timeout=client.timeout_s
        )
        return node_id, response


def _operate_on_daemon(
    address: str, request: agent_pb2.AgentOperationRequest, *, connection: ManagerConnection
) -> None:
    """``--daemon ADDR``: DaemonService.OperateAgent on one daemon directly."""

    async def operate(client: DaemonClient) -> agent_pb2.AgentOperationResponse:
        async with client:
            response: agent_pb2.AgentOperationResponse = await client.daemon.OperateAgent(
                request, timeout=client.timeout_s
            )
            return response

    response = run(operate(DaemonClient(address, connection)), address=address, peer="the daemon")
    _report(address, response)


@agent.command()
@click.argument("agent_id", metavar="ID")
@click.argument("command", nargs=-1, metavar="[-- ARGV...]")
@click.option("--version", "version", required=True, help="The new version.")
@click.option(
    "--health-deadline",
    type=DURATION,
    default="60s",
    show_default=True,
    help="How long the new version has to become healthy before it is rolled back.",
)
@click.option(
    "--daemon",
    metavar="ADDR",
    required=True,
    help="The daemon (host:port or unix:PATH) that runs the agent.",
)
@_operation_id
@manager_options
@output_option()
@click.pass_context
def update(
    ctx: click.Context,
    agent_id: str,
    command: tuple[str, ...],
    version: str,
    health_deadline: float,
    daemon: str,
    operation_id: str | None,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """Roll agent ID to --version (and ARGV, when given), behind a health gate.

    The daemon stops the agent, starts the new version and waits until it is healthy;
    when it is not within --health-deadline, the previous version runs again. The
    change lasts until the next newer desired state.
    """
    request = daemon_pb2.PushUpdateRequest(
        agent_id=agent_id,
        version=version,
        command=list(command),
        health_deadline_seconds=health_deadline,
        operation_id=operation_id or uuid.uuid4().hex,
    )

    async def push(client: DaemonClient) -> daemon_pb2.PushUpdateResponse:
        async with client:
            response: daemon_pb2.PushUpdateResponse = await client.daemon.PushUpdate(
                request, timeout=client.timeout_s
            )
            return response

    client = DaemonClient(daemon, connection, timeout_s=health_deadline + _UPDATE_SLACK_S)
    response = run(push(client), address=daemon, peer="the daemon")
    name = daemon_pb2.UpdateOutcome.Name(response.outcome)
    outcome = name.removeprefix("UPDATE_OUTCOME_").lower().replace("_", " ")  # "rolled back"
    if output is not OutputFormat.TABLE:
        print_records([message_to_dict(response)], output)
    else:
        versions = f"{response.previous_version or '-'} -> {response.current_version or '-'}"
        again = " (already done: this operation id was seen before)" if response.duplicate else ""
        click.echo(f"agent {response.agent_id} on {daemon}: {outcome}, {versions}{again}")
        if response.message:
            click.echo(f"  {response.message}")
    if response.outcome not in _GOOD_OUTCOMES:
        raise CliError(f"agent {agent_id}: update {outcome}")

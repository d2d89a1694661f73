"""``reconciler agent start|stop|restart ID``: operate one agent (OperateAgent).

``restart`` is imperative and clears backoff; ``stop``/``start`` are a local override
kept until the next newer generation. ``--operation-id`` makes a retried call act once
(one is made up when not given).

Through the Manager, which proxies the call to the node's daemon: ``--node NODE``
names the node; without it the agent's node is looked up (it must be on exactly one).
``--daemon ADDR`` talks to one daemon directly.
"""

from __future__ import annotations

import uuid

import click

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.client import DaemonClient, FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import CliError, Target, target_options
from reconciler.convert import operation_to_proto

__all__ = ["OPERATIONS", "agent", "find_node"]

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

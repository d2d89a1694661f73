"""``reconciler get nodes|agents|agentsets``: list fleet objects.

Through the Manager by default; ``get agents --daemon ADDR`` asks one daemon directly.
``-o json`` / ``-o yaml`` print the API messages (NodeInfo, AgentState, AgentSet) in
protobuf's canonical JSON mapping; the table is for people. ``--watch`` polls and
prints again whenever the answer changes, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import click
from google.protobuf import timestamp_pb2

from reconciler.api.agent.v1 import agent_pb2, node_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.client import DaemonClient, FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import KEY_VALUE, Target, target_options
from reconciler.cli.output import OutputFormat, output_option, print_records
from reconciler.convert import message_to_dict
from reconciler.manager.plan import NodeSelector

__all__ = [
    "age",
    "agent_row",
    "agents",
    "agentsets",
    "enum_word",
    "get",
    "node_row",
    "nodes",
]

Client = TypeVar("Client", FleetClient, DaemonClient)

#: Seconds between two polls of --watch.
WATCH_INTERVAL_S: Final = 2.0


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


# ---------------------------------------------------------------------- formatting


def age(stamp: timestamp_pb2.Timestamp, *, now: float | None = None) -> str:
    """How long ago ``stamp`` was, shortly: ``12s``, ``5m``, ``3h``, ``2d``; ``-`` unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - stamp.ToNanoseconds() / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def enum_word(name: str, prefix: str) -> str:
    """``AGENT_PHASE_RUNNING`` -> ``Running``; ``NODE_STATUS_NOT_READY`` -> ``NotReady``."""
    words = name.removeprefix(prefix).split("_")
    return "".join(word.capitalize() for word in words)


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def node_row(node: node_pb2.NodeInfo) -> dict[str, Any]:
    """One table row of a node."""
    return {
        "node": node.node_id,
        "status": enum_word(node_pb2.NodeStatus.Name(node.status), "NODE_STATUS_"),
        "agents": node.agent_count,
        "desired": node.desired_generation,
        "observed": node.observed_generation,
        "heartbeat": age(node.last_heartbeat_at),
        "address": node.daemon_address or "-",
        "labels": _labels(node.labels),
    }


def agent_row(state: agent_pb2.AgentState) -> dict[str, Any]:
    """One table row of an agent."""
    info, spec = state.info, state.spec
    phase = agent_pb2.AgentPhase.Name(info.phase) if state.HasField("info") else ""
    desired = agent_pb2.DesiredState.Name(spec.state) if state.HasField("spec") else ""
    return {
        "node": state.node_id,
        "agent": spec.id or info.agent_id,
        "phase": enum_word(phase, "AGENT_PHASE_") if phase else "-",
        "desired": enum_word(desired, "DESIRED_STATE_") if desired else "unmanaged",
        "pid": info.pid or "-",
        "restarts": info.restart_count,
        "version": info.reported_version or spec.version or "-",
        "age": age(info.started_at) if info.pid else "-",
        "message": info.message,
    }


def _agent_set_row(agent_set: fleet_pb2.AgentSet) -> dict[str, Any]:
    selector = agent_set.spec.node_selector
    where = [_labels(selector.match_labels)] if selector.match_labels else []
    where += [f"nodes={','.join(selector.node_ids)}"] if selector.node_ids else []
    return {
        "name": agent_set.metadata.name,
        "revision": agent_set.metadata.revision,
        "agents": len(agent_set.spec.agents),
        "selector": " or ".join(where) or "<every node>",
        "updated": age(agent_set.metadata.updated_at),
    }


# ------------------------------------------------------------------------- printing


def _show(
    messages: Sequence[Any], rows: Callable[[Any], dict[str, Any]], output: OutputFormat
) -> None:
    if output is OutputFormat.TABLE:
        print_records([rows(m) for m in messages], output)
    else:
        print_records([message_to_dict(m) for m in messages], output)


async def _fetch_and_show(
    client: Client,
    fetch: Callable[[Client], Awaitable[Sequence[Any]]],
    rows: Callable[[Any], dict[str, Any]],
    output: OutputFormat,
    *,
    watch: bool,
) -> None:
    async with client:
        last = None
        while True:
            messages = await fetch(client)
            if not watch:
                _show(messages, rows, output)
                return
            fingerprint = _fingerprint(messages)
            if fingerprint != last:
                if last is not None:
                    click.echo()
                _show(messages, rows, output)
                last = fingerprint
            await asyncio.sleep(WATCH_INTERVAL_S)


def _fingerprint(messages: Sequence[Any]) -> list[bytes]:
    """What --watch compares: the messages without their clocks."""
    prints = []
    for message in messages:
        copy = type(message)()
        copy.CopyFrom(message)
        if isinstance(copy, node_pb2.NodeInfo):
            copy.ClearField("last_heartbeat_at")
        prints.append(copy.SerializeToString(deterministic=True))
    return prints


# ------------------------------------------------------------------------ commands


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

    async def fetch(client: FleetClient) -> Sequence[node_pb2.NodeInfo]:
        request = fleet_pb2.ListNodesRequest(label_selector=dict(selector))
        listed = await client.fleet.ListNodes(request, timeout=client.timeout_s)
        return [n for n in listed.nodes if node in (None, n.node_id)]

    client = FleetClient(connection)
    run(_fetch_and_show(client, fetch, node_row, output, watch=watch), address=client.address)


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
    if target.daemon is not None:
        _agents_from_daemon(
            target.daemon, selector, watch=watch, connection=connection, output=output
        )
        return
    _agents_from_manager(target.node, selector, watch=watch, connection=connection, output=output)


def _agents_from_manager(
    node: str | None,
    selector: tuple[tuple[str, str], ...],
    *,
    watch: bool,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    async def fetch(client: FleetClient) -> Sequence[agent_pb2.AgentState]:
        request = fleet_pb2.ListAgentsRequest(node_id=node or "", label_selector=dict(selector))
        listed = await client.fleet.ListAgents(request, timeout=client.timeout_s)
        return list(listed.agents)

    client = FleetClient(connection)
    run(_fetch_and_show(client, fetch, agent_row, output, watch=watch), address=client.address)


def _agents_from_daemon(
    address: str,
    selector: tuple[tuple[str, str], ...],
    *,
    watch: bool,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """``get agents --daemon ADDR``: DaemonService.ListAgents on one daemon."""

    async def fetch(client: DaemonClient) -> Sequence[agent_pb2.AgentState]:
        request = daemon_pb2.ListAgentsRequest(label_selector=dict(selector))
        listed = await client.daemon.ListAgents(request, timeout=client.timeout_s)
        return list(listed.agents)

    client = DaemonClient(address, connection)
    run(
        _fetch_and_show(client, fetch, agent_row, output, watch=watch),
        address=address,
        peer="the daemon",
    )


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
    """List the AgentSets stored in the Manager.

    -l matches the labels of the AgentSet's node selector.
    """

    async def fetch(client: FleetClient) -> Sequence[fleet_pb2.AgentSet]:
        listed = await client.fleet.ListAgentSets(
            fleet_pb2.ListAgentSetsRequest(), timeout=client.timeout_s
        )
        found = [s for s in listed.agent_sets if _selects_labels(s, dict(selector))]
        if node is None:
            return found
        known = await client.fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=client.timeout_s)
        labels = next((dict(n.labels) for n in known.nodes if n.node_id == node), None)
        if labels is None:
            return []
        return [s for s in found if _selector_of(s).selects(node, labels)]

    client = FleetClient(connection)
    run(
        _fetch_and_show(client, fetch, _agent_set_row, output, watch=watch),
        address=client.address,
    )


def _selector_of(agent_set: fleet_pb2.AgentSet) -> NodeSelector:
    selector = agent_set.spec.node_selector
    return NodeSelector(dict(selector.match_labels), frozenset(selector.node_ids))


def _selects_labels(agent_set: fleet_pb2.AgentSet, labels: Mapping[str, str]) -> bool:
    wanted = agent_set.spec.node_selector.match_labels
    return all(wanted.get(key) == value for key, value in labels.items())

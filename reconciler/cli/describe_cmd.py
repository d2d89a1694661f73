"""``reconciler describe node|agent NAME``: one object in detail, with recent events.

``describe node`` shows the node's registration, readiness, generations, its agents
and its recent events. ``describe agent`` shows the agent's spec and observed status
(phase, restarts, backoff, last exit, heartbeats), a summary of its resource samples
over the last ten minutes and its recent events; ``--daemon ADDR`` asks one daemon
directly, which keeps no event history (a standalone daemon logs its events). ``-o
json|yaml`` prints the same as one document whose parts are API messages in canonical
JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import click
import grpc
from google.protobuf import timestamp_pb2

from reconciler.api.agent.v1 import agent_pb2, event_pb2, metrics_pb2, node_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.agent_cmd import find_node
from reconciler.cli.client import DaemonClient, FleetClient, recent_events, rpc_error_line, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.events_cmd import event_row
from reconciler.cli.get_cmd import age, agent_row, enum_word
from reconciler.cli.metrics_cmd import human_bytes
from reconciler.cli.options import CliError, Target, target_options
from reconciler.cli.output import OutputFormat, output_option, print_document, print_records
from reconciler.convert import message_to_dict

__all__ = ["agent", "describe", "node"]

#: Events shown per object.
RECENT_EVENTS: Final = 10
#: Seconds of resource samples summarised by ``describe agent``.
METRICS_WINDOW_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class _NodeView:
    info: node_pb2.NodeInfo
    agents: Sequence[agent_pb2.AgentState]
    events: Sequence[event_pb2.Event]


@dataclass(frozen=True, slots=True)
class _AgentView:
    state: agent_pb2.AgentState
    events: Sequence[event_pb2.Event] | None
    """None when asked of a daemon, which keeps no event history."""
    metrics: metrics_pb2.AgentMetricsResponse | None
    metrics_error: str


@click.group()
def describe() -> None:
    """Show one node or agent in detail."""


# ---------------------------------------------------------------------------- node


@describe.command()
@click.argument("name")
@manager_options
@output_option()
@click.pass_context
def node(
    ctx: click.Context, name: str, connection: ManagerConnection, output: OutputFormat
) -> None:
    """Show node NAME: labels, readiness, generations, agents."""
    client = FleetClient(connection)
    view = run(_node_view(client, name), address=client.address)
    if output is not OutputFormat.TABLE:
        document = {
            "node": message_to_dict(view.info),
            "agents": [message_to_dict(a) for a in view.agents],
            "events": [message_to_dict(e) for e in view.events],
        }
        print_document(document, output)
        return
    info = view.info
    status = enum_word(node_pb2.NodeStatus.Name(info.status), "NODE_STATUS_")
    _fields(
        [
            ("Node", info.node_id),
            ("Status", f"{status} (last heartbeat {age(info.last_heartbeat_at)} ago)"),
            ("Hostname", info.hostname or "-"),
            ("IP", info.ip or "-"),
            ("Daemon address", info.daemon_address or "- (the node pulls its desired state)"),
            ("Version", info.version or "-"),
            ("Labels", _pairs(info.labels)),
            ("Capabilities", ", ".join(info.capabilities) or "-"),
            ("Registered", _when(info.registered_at)),
            (
                "Generations",
                f"desired {info.desired_generation}, observed {info.observed_generation}",
            ),
        ]
    )
    _table(f"Agents ({len(view.agents)})", [agent_row(a) for a in view.agents])
    _table("Events", [event_row(e) for e in view.events])


async def _node_view(client: FleetClient, name: str) -> _NodeView:
    async with client:
        listed = await client.fleet.ListNodes(
            fleet_pb2.ListNodesRequest(), timeout=client.timeout_s
        )
        found = [n for n in listed.nodes if n.node_id == name]
        if not found:
            raise CliError(f"NOT_FOUND: node {name!r} not found")
        agents = await client.fleet.ListAgents(
            fleet_pb2.ListAgentsRequest(node_id=name), timeout=client.timeout_s
        )
        events = await recent_events(client, node_id=name, limit=RECENT_EVENTS)
        return _NodeView(found[0], list(agents.agents), events)


# --------------------------------------------------------------------------- agent


@describe.command()
@click.argument("name")
@target_options
@manager_options
@output_option()
@click.pass_context
def agent(
    ctx: click.Context,
    name: str,
    target: Target,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """Show agent NAME: spec, phase, restarts, backoff, last exit, heartbeats."""
    if target.daemon is not None:
        daemon = DaemonClient(target.daemon, connection)
        view = run(_daemon_agent_view(daemon, name), address=daemon.address, peer="the daemon")
    else:
        client = FleetClient(connection)
        view = run(_agent_view(client, name, target.node), address=client.address)
    if output is not OutputFormat.TABLE:
        events = None if view.events is None else [message_to_dict(e) for e in view.events]
        document = {
            "agent": message_to_dict(view.state),
            "events": events,
            "metrics": message_to_dict(view.metrics) if view.metrics else None,
        }
        print_document(document, output)
        return
    _fields(_agent_fields(view))
    if view.events is None:
        click.echo("\nEvents: not kept by a daemon (a standalone daemon logs them)")
    else:
        _table("Events", [event_row(e) for e in view.events])


async def _agent_view(client: FleetClient, name: str, node_name: str | None) -> _AgentView:
    async with client:
        node_id = node_name or await find_node(client, name)
        listed = await client.fleet.ListAgents(
            fleet_pb2.ListAgentsRequest(node_id=node_id), timeout=client.timeout_s
        )
        found = [a for a in listed.agents if name in (a.spec.id, a.info.agent_id)]
        if not found:
            raise CliError(f"NOT_FOUND: agent {name!r} not found on node {node_id!r}")
        events = await recent_events(client, node_id=node_id, agent_id=name, limit=RECENT_EVENTS)
        query = metrics_pb2.AgentMetricsRequest(agent_id=name, duration_seconds=METRICS_WINDOW_S)
        request = fleet_pb2.GetAgentMetricsRequest(node_id=node_id, request=query)
        try:
            metrics = await client.fleet.GetAgentMetrics(request, timeout=client.timeout_s)
        except grpc.aio.AioRpcError as error:
            return _AgentView(found[0], events, None, rpc_error_line(error, address=node_id))
        return _AgentView(found[0], events, metrics, "")


async def _daemon_agent_view(client: DaemonClient, name: str) -> _AgentView:
    async with client:
        request = daemon_pb2.ListAgentsRequest(agent_ids=[name])
        listed = await client.daemon.ListAgents(request, timeout=client.timeout_s)
        if not listed.agents:
            raise CliError(f"NOT_FOUND: agent {name!r} not found on the daemon at {client.address}")
        query = metrics_pb2.AgentMetricsRequest(agent_id=name, duration_seconds=METRICS_WINDOW_S)
        try:
            metrics = await client.daemon.GetAgentMetrics(query, timeout=client.timeout_s)
        except grpc.aio.AioRpcError as error:
            failed = rpc_error_line(error, address=client.address, peer="the daemon")
            return _AgentView(listed.agents[0], None, None, failed)
        return _AgentView(listed.agents[0], None, metrics, "")


def _agent_fields(view: _AgentView) -> list[tuple[str, str]]:
    state, spec, info = view.state, view.state.spec, view.state.info
    fields = [("Agent", spec.id or info.agent_id), ("Node", state.node_id)]
    if state.HasField("spec"):
        fields += _spec_fields(spec)
    else:
        fields.append(("Spec", "none: the node reports this agent but no AgentSet places it"))
    if state.HasField("info"):
        fields += _status_fields(info)
    else:
        fields.append(("Phase", "not reported by the node yet"))
    fields.append(("Metrics", _metrics_summary(view)))
    return fields


def _spec_fields(spec: agent_pb2.AgentSpec) -> list[tuple[str, str]]:
    desired = enum_word(agent_pb2.DesiredState.Name(spec.state), "DESIRED_STATE_")
    policy = enum_word(agent_pb2.RestartPolicy.Name(spec.restart_policy), "RESTART_POLICY_")
    heartbeat = (
        f"every {spec.heartbeat.interval_seconds:g}s, timeout {spec.heartbeat.timeout_seconds:g}s"
        if spec.HasField("heartbeat")
        else "none (judged by its process alone)"
    )
    return [
        ("Command", " ".join(spec.command)),
        ("Desired", f"{desired}, restart policy {policy}, version {spec.version or '-'}"),
        ("Heartbeat", heartbeat),
        ("Working dir", spec.working_dir or "-"),
        ("User", spec.user or "-"),
        ("Labels", _pairs(spec.labels)),
    ]


def _status_fields(info: agent_pb2.AgentInfo) -> list[tuple[str, str]]:
    phase = enum_word(agent_pb2.AgentPhase.Name(info.phase), "AGENT_PHASE_")
    override = enum_word(agent_pb2.Override.Name(info.override), "OVERRIDE_")
    fields = [
        ("Phase", f"{phase}{f' ({info.message})' if info.message else ''}"),
        ("PID", f"{info.pid} (started {age(info.started_at)} ago)" if info.pid else "-"),
        ("Restarts", str(info.restart_count)),
        ("Override", override if info.override > agent_pb2.OVERRIDE_NONE else "none"),
        ("Last exit", _last_exit(info)),
        ("Backoff", _backoff(info)),
    ]
    reported = enum_word(agent_pb2.ReportedStatus.Name(info.reported_status), "REPORTED_STATUS_")
    if info.HasField("last_heartbeat_at"):
        heartbeat = f"{age(info.last_heartbeat_at)} ago, reported {reported}"
        if info.reported_version:
            heartbeat += f", version {info.reported_version}"
        fields.append(("Last heartbeat", heartbeat))
    return fields


def _last_exit(info: agent_pb2.AgentInfo) -> str:
    if not info.HasField("last_exit"):
        return "-"
    kind = info.last_exit.WhichOneof("status")
    how = (
        f"signal {info.last_exit.signal}"
        if kind == "signal"
        else f"code {info.last_exit.exit_code}"
    )
    return f"{how}, {age(info.last_exit.exited_at)} ago"


def _backoff(info: agent_pb2.AgentInfo) -> str:
    if not info.HasField("backoff"):
        return "-"
    at = info.backoff.next_attempt_at.ToDatetime().strftime("%H:%M:%S UTC")
    return f"next attempt at {at}: {info.backoff.reason}"


def _metrics_summary(view: _AgentView) -> str:
    if view.metrics is None:
        return f"unavailable ({view.metrics_error})"
    points = list(view.metrics.data_points)
    if not points:
        return "no samples in the last 10m"
    cpu = [p.cpu_percent for p in points]
    memory = [p.memory_bytes for p in points]
    return (
        f"cpu avg {sum(cpu) / len(cpu):.1f}% max {max(cpu):.1f}%, memory last "
        f"{human_bytes(memory[-1])} max {human_bytes(max(memory))} "
        f"({len(points)} samples over the last 10m)"
    )


# ------------------------------------------------------------------------- helpers


def _pairs(labels: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dict(labels).items())) or "-"


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    text = stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{text} ({age(stamp)} ago)"


def _fields(pairs: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in pairs) + 2
    for key, value in pairs:
        click.echo(f"{key + ':':<{width}}{value}")


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    click.echo(f"\n{title}:")
    if rows:
        print_records(rows, OutputFormat.TABLE)
    else:
        click.echo("  none")

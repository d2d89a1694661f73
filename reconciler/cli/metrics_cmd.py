"""``reconciler metrics ID``: an agent's CPU and memory samples (GetAgentMetrics).

Through the Manager, which asks the node's daemon (or answers from the samples the
node reported when the daemon cannot be called): ``--node NODE`` names the node;
without it the agent's node is looked up. ``--daemon ADDR`` asks one daemon directly.
The table output is a small chart of each series in unicode block characters;
``-o json|yaml`` prints the AgentMetricsResponse message.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import click

from reconciler.api.agent.v1 import metrics_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.agent_cmd import find_node
from reconciler.cli.client import DaemonClient, FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.options import DURATION, Target, target_options
from reconciler.cli.output import OutputFormat, output_option, print_document
from reconciler.convert import message_to_dict

__all__ = ["chart", "human_bytes", "metrics", "render_metrics"]

#: Block characters from empty to full, in eighths.
_BLOCKS: Final = " ▁▂▃▄▅▆▇█"
CHART_HEIGHT: Final = 4
CHART_WIDTH: Final = 60


def _columns(values: Sequence[float], width: int) -> list[float]:
    """At most ``width`` values: the peak of each of ``width`` equal slices."""
    if len(values) <= width:
        return list(values)
    size = len(values) / width
    return [
        max(values[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)])
        for i in range(width)
    ]


def chart(
    values: Sequence[float], *, height: int = CHART_HEIGHT, width: int = CHART_WIDTH
) -> list[str]:
    """``height`` rows (top first) of block characters drawing ``values`` scaled to
    their maximum; each row is one character per column."""
    columns = _columns(values, width)
    top = max(columns, default=0.0) or 1.0
    eighths = [round(max(0.0, v) / top * height * 8) for v in columns]
    rows = []
    for row in reversed(range(height)):
        rows.append("".join(_BLOCKS[min(8, max(0, e - row * 8))] for e in eighths))
    return rows


def human_bytes(size: float) -> str:
    """``123456789`` -> ``117.7 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def _series(summary: str, values: Sequence[float], scale: str) -> list[str]:
    """A summary line, then the chart with its scale on the top row and 0 at the bottom."""
    lines = [summary]
    rows = chart(values)
    for index, row in enumerate(rows):
        axis = scale if index == 0 else ("0" if index == len(rows) - 1 else "")
        lines.append(f"{axis:>10} ┤{row}")
    return lines


def _clock(point: metrics_pb2.ResourceDataPoint) -> str:
    return datetime.fromtimestamp(point.timestamp.ToNanoseconds() / 1e9, UTC).strftime("%H:%M:%S")


def render_metrics(node_id: str, response: metrics_pb2.AgentMetricsResponse) -> list[str]:
    """The chart output: a summary line, then CPU and memory charts."""
    points = list(response.data_points)
    if not points:
        return [f"agent {response.agent_id} on {node_id}: no samples in this window"]
    cpu = [p.cpu_percent for p in points]
    memory = [float(p.memory_bytes) for p in points]
    head = (
        f"agent {response.agent_id} on {node_id}: {len(points)} samples "
        f"from {_clock(points[0])} to {_clock(points[-1])} UTC"
    )
    average = sum(cpu) / len(cpu)
    cpu_summary = f"CPU %    max {max(cpu):.1f}  avg {average:.1f}  last {cpu[-1]:.1f}"
    cpu_lines = _series(cpu_summary, cpu, f"{max(cpu):.1f}")
    memory_summary = f"Memory   max {human_bytes(max(memory))}  last {human_bytes(memory[-1])}"
    memory_lines = _series(memory_summary, memory, human_bytes(max(memory)))
    return [head, "", *cpu_lines, "", *memory_lines]


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
    query = metrics_pb2.AgentMetricsRequest(agent_id=agent_id, duration_seconds=since)
    if target.daemon is not None:
        client = DaemonClient(target.daemon, connection)
        response = run(_query_daemon(client, query), address=target.daemon, peer="the daemon")
        _show(target.daemon, response, output)
        return
    fleet = FleetClient(connection)
    node_id, response = run(_query(fleet, target.node, query), address=fleet.address)
    _show(node_id, response, output)


def _show(where: str, response: metrics_pb2.AgentMetricsResponse, output: OutputFormat) -> None:
    if output is OutputFormat.TABLE:
        for line in render_metrics(where, response):
            click.echo(line)
    else:
        print_document(message_to_dict(response), output)


async def _query(
    client: FleetClient, node: str | None, query: metrics_pb2.AgentMetricsRequest
) -> tuple[str, metrics_pb2.AgentMetricsResponse]:
    async with client:
        node_id = node or await find_node(client, query.agent_id)
        request = fleet_pb2.GetAgentMetricsRequest(node_id=node_id, request=query)
        response: metrics_pb2.AgentMetricsResponse = await client.fleet.GetAgentMetrics(
            request, timeout=client.timeout_s
        )
        return node_id, response


async def _query_daemon(
    client: DaemonClient, query: metrics_pb2.AgentMetricsRequest
) -> metrics_pb2.AgentMetricsResponse:
    async with client:
        response: metrics_pb2.AgentMetricsResponse = await client.daemon.GetAgentMetrics(
            query, timeout=client.timeout_s
        )
        return response

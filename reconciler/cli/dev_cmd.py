"""``reconciler dev``: a Manager and a daemon for this host in one process, for trying
things out. Insecure, loopback only, any command allowed; says so at start.

It is the same Manager and daemon as in production, wired together on the default
addresses (so every other command works from a second terminal without flags), with
state under ``--state-dir``. It applies the given AgentSet files (by default
``examples/quickstart.yaml``) through FleetService like ``reconciler apply`` would,
then shows a live table of the agents until Ctrl-C, which stops the agents, the
daemon and the Manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from reconciler import rpc
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.cli.apply_cmd import describe_change
from reconciler.cli.get_cmd import agent_row
from reconciler.cli.options import CliError
from reconciler.config import (
    ConfigError,
    DaemonSettings,
    ManagerSettings,
    load_daemon_settings,
    load_manager_settings,
)
from reconciler.manager.agentset import AgentSetFileError, load_agent_set_file

__all__ = ["dev", "dev_settings"]

DEFAULT_FILE = "examples/quickstart.yaml"
_REFRESH_S = 1.0
_COLUMNS = ("agent", "phase", "pid", "restarts", "version", "age", "message")


def dev_settings(
    state_dir: Path, *, otlp_endpoint: str | None = None, port_offset: int = 0
) -> tuple[ManagerSettings, DaemonSettings]:
    """The Manager's and the daemon's settings for a development setup in ``state_dir``.

    RECONCILER_* variables still apply; what dev mode needs wins over them. Every
    port is the default one plus ``port_offset``.
    """

    def port(default: int) -> str:
        return f"127.0.0.1:{default + port_offset}"

    traces = (
        ["telemetry.exporter=otlp", f"telemetry.otlp_endpoint={otlp_endpoint}"]
        if otlp_endpoint
        else []
    )
    manager = load_manager_settings(
        None,
        overrides=[
            f"state_dir={state_dir / 'manager'}",
            f"grpc.listen={port(7060)}",
            f"metrics.listen={port(9460)}",
            "nodes.not_ready_after_s=10",
            *traces,
        ],
    )
    daemon = load_daemon_settings(
        None,
        overrides=[
            f"node.id={socket.gethostname()}",
            "node.labels.mode=dev",
            f"state_dir={state_dir / 'daemon'}",
            f"grpc.listen={port(7070)}",
            f"heartbeat.http_listen={port(7071)}",
            f"metrics.listen={port(9470)}",
            f"heartbeat.socket_path={state_dir / 'run' / 'heartbeat.sock'}",
            f"manager.address={manager.grpc.listen}",
            "manager.heartbeat_interval_s=2",
            "manager.report_interval_s=2",
            "monitor.interval_s=2",
            "agents.stop_agents_on_exit=true",
            *traces,
        ],
    )
    return manager, daemon


@click.command()
@click.option(
    "-f",
    "--file",
    "files",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help=f"AgentSet file to apply at start (default: {DEFAULT_FILE}). Repeatable.",
)
@click.option(
    "--state-dir",
    default=".reconciler",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the Manager and the daemon keep their state.",
)
@click.option("--otlp-endpoint", metavar="URL", help="Export traces by OTLP to this URL.")
@click.option(
    "--port-offset",
    type=click.IntRange(0, 50000),
    default=0,
    show_default=True,
    help="Add this to every port (7060, 7070, 7071, 9460, 9470) to run beside another "
    "instance; then pass --manager 127.0.0.1:<7060+offset> to the other commands.",
)
@click.pass_context
def dev(
    ctx: click.Context,
    files: tuple[str, ...],
    state_dir: str,
    otlp_endpoint: str | None,
    port_offset: int,
) -> None:
    """Run a development Manager and daemon for this host (Ctrl-C stops both).

    Everything listens on loopback without TLS, and the daemon allows any executable:
    for trying reconciler out, never for production.
    """
    chosen = list(files) or ([DEFAULT_FILE] if Path(DEFAULT_FILE).exists() else [])
    try:
        agent_sets = [message for path in chosen for message in load_agent_set_file(path)]
    except AgentSetFileError as error:
        raise CliError(str(error)) from None
    root = Path(state_dir).resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        manager_settings, daemon_settings = dev_settings(
            root, otlp_endpoint=otlp_endpoint, port_offset=port_offset
        )
    except ConfigError as error:
        raise CliError(str(error)) from None
    _interpreter_first_on_path()
    asyncio.run(_run(manager_settings, daemon_settings, agent_sets, files=chosen))


def _interpreter_first_on_path() -> None:
    """Let agents' bare ``python3`` and ``agentlet`` be the ones reconciler runs on."""
    bindir = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", os.defpath).split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in parts if p != bindir)])


async def _run(
    manager_settings: ManagerSettings,
    daemon_settings: DaemonSettings,
    agent_sets: Sequence[fleet_pb2.AgentSet],
    *,
    files: Sequence[str],
) -> None:
    from reconciler import __version__, telemetry
    from reconciler.daemon.app import DaemonApp
    from reconciler.manager.app import ManagerApp

    tracing = telemetry.setup_tracing(
        daemon_settings.telemetry, service_name="reconciler-dev", version=__version__
    )
    manager = ManagerApp(manager_settings, tracing=tracing)
    daemon = DaemonApp(
        daemon_settings,
        allow_any_command=True,
        default_working_dir=os.getcwd(),
        tracing=tracing,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    console = Console()
    try:
        await manager.start()
        await daemon.start()
        await _apply(manager.addresses.grpc, agent_sets, console=console)
        _banner(
            console,
            manager=(manager.addresses.grpc, manager.addresses.metrics),
            daemon=(
                daemon.addresses.grpc,
                daemon.addresses.heartbeat_socket,
                daemon.addresses.heartbeat_http,
            ),
            files=files,
        )
        await _show_agents(daemon.addresses.grpc, stop, console=console)
    finally:
        console.print("stopping the agents, the daemon and the Manager ...")
        await daemon.stop()
        await manager.stop()
        tracing.shutdown()


async def _apply(
    address: str, agent_sets: Sequence[fleet_pb2.AgentSet], *, console: Console
) -> None:
    async with grpc.aio.insecure_channel(address, options=rpc.channel_options()) as channel:
        fleet = fleet_pb2_grpc.FleetServiceStub(channel)
        for agent_set in agent_sets:
            request = fleet_pb2.ApplyAgentSetRequest(agent_set=agent_set)
            try:
                answer = await fleet.ApplyAgentSet(request, timeout=10.0)
            except grpc.aio.AioRpcError as error:
                console.print(
                    f"[red]applying {agent_set.metadata.name} failed:[/] {error.details()}"
                )
                continue
            for change in answer.node_changes:
                console.print(f"agentset/{agent_set.metadata.name}: {describe_change(change)}")


def _banner(
    console: Console,
    *,
    manager: tuple[str, str],
    daemon: tuple[str, str, str],
    files: Sequence[str],
) -> None:
    manager_grpc, manager_metrics = manager
    daemon_grpc, socket_path, http = daemon
    node_id = socket.gethostname()
    flag = "" if manager_grpc == "127.0.0.1:7060" else f" --manager {manager_grpc}"
    console.print(
        "\n[bold]reconciler dev[/] is running (insecure, loopback only, any command allowed)\n"
        f"  Manager      {manager_grpc}   metrics http://{manager_metrics}/metrics\n"
        f"  daemon       {daemon_grpc}   heartbeats {socket_path} and http://{http}\n"
        f"  applied      {', '.join(files) or 'nothing'}\n\n"
        "Try, from a second terminal (source .venv/bin/activate first):\n"
        f"  reconciler get nodes{flag}\n"
        f"  reconciler get agents{flag}\n"
        f"  reconciler agent restart steady --node {node_id}{flag}\n"
        f"  reconciler events --follow{flag}\n"
        "Ctrl-C stops everything.\n"
    )


async def _show_agents(address: str, stop: asyncio.Event, *, console: Console) -> None:
    """A live table of the daemon's agents until ``stop`` is set."""
    async with grpc.aio.insecure_channel(address, options=rpc.channel_options()) as channel:
        stub = daemon_pb2_grpc.DaemonServiceStub(channel)
        if not console.is_terminal:
            await _print_changes(stub, stop, console=console)
            return
        with Live(await _table(stub), console=console, refresh_per_second=2) as live:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _REFRESH_S)
                live.update(await _table(stub))


async def _print_changes(
    stub: daemon_pb2_grpc.DaemonServiceAsyncStub, stop: asyncio.Event, *, console: Console
) -> None:
    """Without a terminal: print the table again only when a phase or pid changed."""
    last: list[tuple[str, str, str]] = []
    while not stop.is_set():
        rows = await _rows(stub)
        now = [(str(r["agent"]), str(r["phase"]), str(r["pid"])) for r in rows]
        if now != last:
            console.print(_render(rows))
            last = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _REFRESH_S * 5)


async def _rows(stub: daemon_pb2_grpc.DaemonServiceAsyncStub) -> list[dict[str, object]]:
    try:
        answer = await stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=5.0)
    except grpc.aio.AioRpcError:
        return []
    return [agent_row(state) for state in answer.agents]


async def _table(stub: daemon_pb2_grpc.DaemonServiceAsyncStub) -> Table:
    return _render(await _rows(stub))


def _render(rows: Sequence[dict[str, object]]) -> Table:
    table = Table(title="agents on this host", title_justify="left")
    for column in _COLUMNS:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*(str(row.get(column, "")) for column in _COLUMNS))
    return table

"""Wiring of one node daemon: settings in, running parts out.

``DaemonApp`` builds the parts from ``DaemonSettings`` and runs them in one event
loop: the state directory, the supervisor, the controller, the resource monitor, the
heartbeat receivers, the DaemonService gRPC server (TCP and, optionally, a Unix
socket), the metrics endpoint and, when a Manager is configured, the link to it.
Telemetry (``reconciler.telemetry``) is set up here: tracing per ``telemetry``
settings, the tracing and RPC-metrics interceptors on the server and the Manager
channel, and ``/metrics`` on ``metrics.listen`` (``reconciler.daemon.metrics``).
``start`` returns once everything listens; ``stop`` takes them down in reverse order
and, by default, leaves the agents running so a restarted daemon adopts them.

``run_daemon`` is what ``reconciler daemon`` calls: it starts the app and waits for
SIGTERM or SIGINT, or for a SIGHUP whose settings load, after which the command
restarts in place (``reconciler.lifecycle``) and the agents, left running whatever
``stop_agents_on_exit`` says, are adopted by the next image of the same process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from reconciler import __version__, rpc, telemetry, tls
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.config import (
    DaemonSettings,
    TlsMode,
    parse_advertised,
    settings_to_dict,
)
from reconciler.daemon import unixsocket
from reconciler.daemon.clock import Clock, SystemClock
from reconciler.daemon.commands import CommandPolicy
from reconciler.daemon.controller import Controller, ProcessOwner
from reconciler.daemon.heartbeat import (
    HeartbeatStats,
    HttpHeartbeatReceiver,
    HttpReceiverConfig,
    UnixHeartbeatReceiver,
    UnixReceiverConfig,
    parse_listen,
)
from reconciler.daemon.manager_link import LinkPolicy, ManagerLink
from reconciler.daemon.metrics import CountingEventLog, DaemonCollector, daemon_registry
from reconciler.daemon.monitor import ResourceMonitor, ResourcePoint
from reconciler.daemon.service import DaemonService
from reconciler.daemon.store import DesiredStateStore, StateDirLock
from reconciler.daemon.supervisor import ProcessSupervisor
from reconciler.lifecycle import run_until_signalled
from reconciler.model.ids import AgentId, NodeId
from reconciler.reconcile import Policy

__all__ = ["DaemonApp", "run_daemon"]

log = logging.getLogger(__name__)

SERVICE_NAME = daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"].full_name


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where a started daemon listens (ports resolved when the settings said 0)."""

    grpc: str
    grpc_unix: str
    heartbeat_socket: str
    heartbeat_http: str
    metrics: str = ""


def policy_from(settings: DaemonSettings) -> Policy:
    """The reconcile policy the backoff settings describe."""
    backoff = settings.backoff
    return Policy(
        backoff_initial_s=backoff.initial_s,
        backoff_max_s=backoff.max_s,
        backoff_reset_after_s=backoff.reset_after_s,
        burst_starts=backoff.burst_starts,
        burst_window_s=backoff.burst_window_s,
    )


class DaemonApp:
    """One node daemon, assembled from settings."""

    def __init__(
        self,
        settings: DaemonSettings,
        *,
        allow_any_command: bool = False,
        default_working_dir: str = "/",
        clock: Clock | None = None,
        tracing: telemetry.Tracing | None = None,
    ) -> None:
        """``tracing``: a handle to share (dev mode runs two apps in one process);
        without it the app sets tracing up from ``settings.telemetry`` at start.
        ``default_working_dir`` serves specs without ``workingDir`` (dev mode: the
        directory it runs in, so example paths work)."""
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.node_id = NodeId(settings.node.id or socket.gethostname())
        state_dir = Path(settings.state_dir)
        # First: nothing below may read or write a directory another daemon runs from.
        self.state_lock = StateDirLock(state_dir)
        self.store = DesiredStateStore(state_dir, clock=self.clock)
        self.events = CountingEventLog(node_id=self.node_id, wall=self.clock.wall)
        self.commands = CommandPolicy(settings.agents.allowed_commands, allow_any=allow_any_command)
        self.supervisor = ProcessSupervisor(
            settings.agents.log_dir or state_dir / "logs",
            log_max_bytes=settings.agents.log_max_bytes,
            log_backups=settings.agents.log_backups,
            allow_root=settings.agents.allow_root,
            clock=self.clock,
            default_working_dir=default_working_dir,
            failure_output=settings.agents.failure_output,
        )
        self.monitor = ResourceMonitor(
            clock=self.clock,
            interval_s=settings.monitor.interval_s,
            retention_s=settings.monitor.retention_s,
            on_sample=self._on_samples,
        )
        self.heartbeat_stats = HeartbeatStats()
        self.controller = Controller(
            owner=ProcessOwner(self.node_id, str(state_dir.resolve())),
            store=self.store,
            supervisor=self.supervisor,
            commands=self.commands,
            policy=policy_from(settings),
            clock=self.clock,
            events=self.events,
            agent_env=self._agent_env(),
            config_dir=state_dir / "agent-config",
            tracker=self.monitor,
        )
        self.tracing = tracing or telemetry.Tracing.disabled()
        self._owns_tracing = tracing is None
        self.rpc_server_stats = telemetry.RpcStats(telemetry.Side.SERVER)
        self.rpc_client_stats = telemetry.RpcStats(telemetry.Side.CLIENT)
        self.metrics_registry = daemon_registry(
            [
                DaemonCollector(
                    controller=self.controller, events=self.events, heartbeats=self.heartbeat_stats
                ),
                self.rpc_server_stats,
                self.rpc_client_stats,
                telemetry.TracingCollector(self.tracing.counters),
            ]
        )
        self.metrics_endpoint: telemetry.MetricsEndpoint | None = None
        self.manager_link: ManagerLink | None = None
        self.unix_receiver: UnixHeartbeatReceiver | None = None
        self.http_receiver: HttpHeartbeatReceiver | None = None
        self.server: grpc.aio.Server | None = None
        self.health: Any = None
        self._restarting = False
        self._grpc_port = 0
        self._grpc_socket: unixsocket.Identity | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start every part; raise (after cleaning up) when one cannot start."""
        self._warn_about_settings()
        try:
            self._start_tracing()
            # Listen for heartbeats before adopting: an adopted agent's heartbeat
            # deadline runs from its adoption, and it can only meet it once the
            # socket is there (starting up on a busy host takes seconds).
            await self._start_heartbeats()
            await self.controller.start(run=False)
            self._closers.append(self._stop_controller)
            self._tasks.append(asyncio.create_task(self.monitor.run()))
            self._tasks.append(asyncio.create_task(self._rotate_logs()))
            await self._start_grpc()
            await self._start_metrics()
            self.controller.run()
            self._start_manager_link()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "daemon ready",
            extra={"node_id": self.node_id, "grpc": self.addresses.grpc},
        )

    async def stop(self) -> None:
        """Stop serving; leave agents running unless agents.stop_agents_on_exit."""
        if self.health is not None:
            await rpc.set_serving(self.health, [SERVICE_NAME], serving=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception:
                log.exception("error while stopping")
        self.state_lock.release()

    def keep_agents_running(self) -> None:
        """The coming ``stop`` is for a restart in place: leave the agents running even
        with ``agents.stop_agents_on_exit`` (the next image adopts them)."""
        self._restarting = True

    @property
    def addresses(self) -> Addresses:
        grpc_settings = self.settings.grpc
        host = parse_listen(grpc_settings.listen)[0] if grpc_settings.listen else ""
        return Addresses(
            grpc=_join(host, self._grpc_port) if grpc_settings.listen else "",
            grpc_unix=grpc_settings.unix_socket,
            heartbeat_socket=self.settings.heartbeat.socket_path,
            heartbeat_http=self._http_address(),
            metrics=self.metrics_endpoint.address if self.metrics_endpoint else "",
        )

    # -- parts -------------------------------------------------------------------

    def _start_tracing(self) -> None:
        if not self._owns_tracing:
            return
        self.tracing = telemetry.setup_tracing(
            self.settings.telemetry,
            service_name="reconciler-daemon",
            node_id=self.node_id,
            version=__version__,
            counters=self.tracing.counters,
        )
        self._closers.append(self._stop_tracing)

    async def _stop_tracing(self) -> None:
        await asyncio.to_thread(self.tracing.shutdown)

    async def _start_metrics(self) -> None:
        listen = self.settings.metrics.listen
        if not listen:
            return
        endpoint = telemetry.MetricsEndpoint(self.metrics_registry, listen)
        try:
            await endpoint.start()
        except OSError as error:
            log.error("metrics.listen %s: %s; serving without /metrics", listen, error)
            return
        self.metrics_endpoint = endpoint
        self._closers.append(endpoint.stop)

    async def _start_heartbeats(self) -> None:
        hb = self.settings.heartbeat
        if hb.socket_path:
            self.unix_receiver = UnixHeartbeatReceiver(
                UnixReceiverConfig(
                    socket_path=Path(hb.socket_path),
                    max_frame_bytes=hb.max_frame_bytes,
                    max_connections=hb.max_connections,
                    idle_timeout_s=hb.idle_timeout_s,
                    allow_unmanaged=hb.allow_unmanaged,
                ),
                directory=self.controller,
                sink=self.controller,
                stats=self.heartbeat_stats,
                clock=self.clock,
            )
            await self.unix_receiver.start()
            self._closers.append(self.unix_receiver.stop)
        if hb.http_listen:
            host, port = parse_listen(hb.http_listen)
            self.http_receiver = HttpHeartbeatReceiver(
                HttpReceiverConfig(
                    host=host,
                    port=port,
                    max_frame_bytes=hb.max_frame_bytes,
                    queue_size=hb.http_queue_size,
                    workers=hb.http_workers,
                    idle_timeout_s=hb.idle_timeout_s,
                    allow_unmanaged=hb.allow_unmanaged,
                ),
                directory=self.controller,
                sink=self.controller,
                stats=self.heartbeat_stats,
                clock=self.clock,
            )
            await self.http_receiver.start()
            self._closers.append(self.http_receiver.stop)
            self.controller.set_agent_env(
                "RECONCILER_HEARTBEAT_URL", f"http://{self._http_address()}/heartbeat"
            )

    async def _start_grpc(self) -> None:
        grpc_settings = self.settings.grpc
        roles = tls.RoleInterceptor(
            {tls.PeerRole.MANAGER, tls.PeerRole.OPERATOR},
            tls_enabled=self.settings.tls.mode is TlsMode.MTLS,
        )
        server = grpc.aio.server(
            interceptors=[
                *telemetry.server_interceptors(self.tracing, self.rpc_server_stats),
                roles,
                rpc.ErrorInterceptor(),
            ],
            options=rpc.server_options(max_message_bytes=grpc_settings.max_message_bytes),
            maximum_concurrent_rpcs=grpc_settings.max_concurrent_rpcs,
        )
        service = DaemonService(
            controller=self.controller,
            metrics=self.monitor,
            clock=self.clock,
            settings=lambda: settings_to_dict(self.settings),
        )
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(service, server)
        self.health = rpc.add_standard_services(server, [SERVICE_NAME])
        if grpc_settings.listen:
            self._grpc_port = tls.add_listen_port(server, grpc_settings.listen, self.settings.tls)
        if grpc_settings.unix_socket:
            unixsocket.claim(grpc_settings.unix_socket)
            tls.add_listen_port(server, f"unix:{grpc_settings.unix_socket}", self.settings.tls)
        await server.start()
        if grpc_settings.unix_socket:
            os.chmod(grpc_settings.unix_socket, 0o660)
            self._grpc_socket = unixsocket.identity(grpc_settings.unix_socket)
        self.server = server
        self._closers.append(self._stop_grpc)
        await rpc.set_serving(self.health, [SERVICE_NAME], serving=True)

    def _start_manager_link(self) -> None:
        link_settings = self.settings.manager
        if not link_settings.address:
            log.info("no manager.address: running standalone")
            return
        channel = tls.secure_channel(
            link_settings.address,
            self.settings.tls,
            interceptors=telemetry.client_interceptors(self.tracing, self.rpc_client_stats),
        )
        self.manager_link = ManagerLink(
            channel=channel,
            controller=self.controller,
            events=self.events,
            metrics=self.monitor,
            clock=self.clock,
            policy=LinkPolicy(
                heartbeat_interval_s=link_settings.heartbeat_interval_s,
                report_interval_s=link_settings.report_interval_s,
                call_timeout_s=link_settings.call_timeout_s,
            ),
            labels=dict(self.settings.node.labels),
            daemon_address=self.advertised_address,
        )
        self._tasks.append(asyncio.create_task(self.manager_link.run()))
        self._closers.append(channel.close)

    def advertised_address(self) -> str:
        """The DaemonService address the Manager should dial."""
        advertise = self.settings.grpc.advertise_address
        if advertise:
            port = self._grpc_port if self.settings.grpc.listen else None
            return _join(*parse_advertised(advertise, default_port=port))
        address = self.addresses.grpc
        host = parse_listen(address)[0] if address else ""
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
            return _join(socket.gethostname(), self._grpc_port) if address else ""
        return address

    async def _stop_grpc(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=5.0)
            self.server = None
        if self.settings.grpc.unix_socket:
            unixsocket.remove_own(self.settings.grpc.unix_socket, self._grpc_socket)

    async def _stop_controller(self) -> None:
        stop_agents = self.settings.agents.stop_agents_on_exit and not self._restarting
        await self.controller.stop(stop_agents=stop_agents)

    async def _rotate_logs(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            await asyncio.to_thread(self.supervisor.logs.rotate_all)

    def _on_samples(self, samples: Any) -> None:
        points: dict[AgentId, ResourcePoint] = dict(samples)
        self.controller.record_samples(
            {agent_id: (p.cpu_percent, p.memory_bytes) for agent_id, p in points.items()}
        )

    # -- helpers -----------------------------------------------------------------

    def _agent_env(self) -> dict[str, str]:
        env = {}
        if self.settings.heartbeat.socket_path:
            env["RECONCILER_HEARTBEAT_SOCKET"] = self.settings.heartbeat.socket_path
        return env

    def _http_address(self) -> str:
        if self.http_receiver is None:
            return ""
        host = parse_listen(self.settings.heartbeat.http_listen)[0]
        return _join(host, self.http_receiver.port)

    def _warn_about_settings(self) -> None:
        if self.settings.tls.mode is TlsMode.INSECURE:
            log.warning("TLS is off (tls.mode: insecure): development only; serving loopback only")
        if self.commands.allow_any:
            log.warning("any executable may run as an agent (development mode)")
        elif not self.settings.agents.allowed_commands:
            log.warning(
                "agents.allowed_commands is empty: no agent may run until it lists the "
                "executables this node allows"
            )


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_daemon(
    settings: DaemonSettings,
    *,
    allow_any_command: bool = False,
    reload: Callable[[], str] | None = None,
) -> bool:
    """Run a daemon until SIGTERM or SIGINT (False), or a SIGHUP after which ``reload``
    finds the settings loadable (True: the caller restarts the process in place)."""
    app = DaemonApp(settings, allow_any_command=allow_any_command)
    return await run_until_signalled(
        app, name="daemon", reload=reload, before_restart=app.keep_agents_running
    )

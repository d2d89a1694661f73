"""Wiring of the Manager: settings in, a serving Manager out.

``ManagerApp`` opens and migrates the store, builds the services (ManagerService and
FleetService on one grpc.aio server, with ``rpc.ErrorInterceptor``, health and
reflection), binds ``grpc.listen`` (mTLS, or loopback only in insecure mode, with a
warning: ``reconciler.tls.add_listen_port``), serves Prometheus metrics on
``metrics.listen``, sweeps node readiness in the background and writes heartbeats
behind in batches (``liveness.NodeTable``, flushed once more at stop). ``start`` returns once
everything listens (``addresses`` then holds the bound ports, useful with port 0);
``stop`` marks health NOT_SERVING, ends event streams, stops the server with a grace
period and closes the store. ``reconciler dev`` runs one in-process this way.

``run_manager`` is what ``reconciler manager`` calls: start, then wait for SIGTERM or
SIGINT.

Metrics (kept modest): RPCs by method and code, push latency and outcomes, nodes by
status, store call latency by operation, plus ``reconciler.telemetry``'s RPC and span
statistics. Each app has its own registry, so several Managers in one process (tests,
dev mode) do not collide. Tracing (``telemetry`` settings) puts a span on every RPC
served and every call to a daemon, carrying the trace context on to the daemon, and a
``push`` span around each node's push (``push.py``).

What it does not do: decide anything; read YAML (``reconciler.config`` did).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from reconciler import __version__, rpc, telemetry, tls
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.config import ConfigError, ManagerSettings, TlsMode, parse_host_port
from reconciler.lifecycle import run_until_signalled
from reconciler.manager.fleet import FleetChanges, FleetServicer
from reconciler.manager.liveness import NodeTable, flush_interval_for
from reconciler.manager.push import DaemonChannels, Pusher, PushResult, RetryPolicy
from reconciler.manager.service import EventLog, ManagerServicer, NodeStatus, Readiness
from reconciler.manager.store import ManagerStore, open_store
from reconciler.model.errors import PermissionDenied

__all__ = ["FLEET_SERVICE", "MANAGER_SERVICE", "Addresses", "ManagerApp", "run_manager"]

log = logging.getLogger(__name__)

MANAGER_SERVICE: Final = manager_pb2.DESCRIPTOR.services_by_name["ManagerService"].full_name
FLEET_SERVICE: Final = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name
_SERVICES: Final = (MANAGER_SERVICE, FLEET_SERVICE)
#: Seconds a stopping server lets running calls finish.
STOP_GRACE_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where a started Manager listens (ports resolved when the settings said 0)."""

    grpc: str
    metrics: str


class _Metrics:
    """The Manager's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.push_seconds = Histogram(
            "reconciler_manager_push_seconds",
            "Time to push one node's desired state, retries included, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.nodes = Gauge(
            "reconciler_manager_nodes",
            "Registered nodes by status (as of the last readiness sweep).",
            ["status"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "reconciler_manager_store_seconds",
            "Time of one store call, by operation.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )

    def observe_push(self, result: PushResult, duration_s: float) -> None:
        self.push_seconds.labels(str(result.outcome)).observe(duration_s)

    def set_nodes(self, counts: Mapping[NodeStatus, int]) -> None:
        for status, count in counts.items():
            self.nodes.labels(str(status)).set(count)


class _TimedStore:
    """The store with every call's latency observed (each method wrapped once, on
    first use)."""

    def __init__(self, store: ManagerStore, metrics: _Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        histogram = self._metrics.store_seconds.labels(name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - started)

        setattr(self, name, timed)
        return timed


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ManagerApp:
    """One Manager, assembled from settings.

    ``store`` replaces the configured backend (tests pass a ``MemoryStore``);
    ``retry`` replaces the push retry policy built from ``push`` settings;
    ``tracing`` is a handle to share (dev mode runs two apps in one process): without
    it the app sets tracing up from ``settings.telemetry`` at start.
    """

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        store: ManagerStore | None = None,
        retry: RetryPolicy | None = None,
        poll_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        tracing: telemetry.Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = _Metrics()
        self.tracing = tracing or telemetry.Tracing.disabled()
        self._owns_tracing = tracing is None
        self.rpc_server_stats = telemetry.RpcStats(telemetry.Side.SERVER)
        self.rpc_client_stats = telemetry.RpcStats(telemetry.Side.CLIENT)
        for collector in (
            self.rpc_server_stats,
            self.rpc_client_stats,
            telemetry.TracingCollector(self.tracing.counters),
        ):
            self.metrics.registry.register(collector)
        self._raw_store = store if store is not None else open_store(settings)
        self.store = cast(ManagerStore, _TimedStore(self._raw_store, self.metrics))
        self.tls_enabled = settings.tls.mode is TlsMode.MTLS
        self.channels = DaemonChannels(self._open_channel)
        self.events = EventLog(self.store, keep_last=settings.retention.events_max)
        self.pusher = Pusher(
            self.store,
            self.channels,
            timeout_s=settings.push.timeout_s,
            concurrency=settings.push.concurrency,
            retry=retry or RetryPolicy.from_settings(settings.push),
            clock=clock,
            observe=self.metrics.observe_push,
        )
        self.table = NodeTable(
            self.store,
            flush_interval_s=flush_interval_for(settings.nodes.not_ready_after_s),
            clock=clock,
        )
        self.readiness = Readiness(
            self.table,
            self.events,
            not_ready_after_s=settings.nodes.not_ready_after_s,
            clock=clock,
            on_counts=self.metrics.set_nodes,
            claim=self.store.claim_readiness,
        )
        self.changes = FleetChanges(
            self.store,
            events=self.events,
            pusher=self.pusher,
            clock=clock,
            on_desired=self.table.desired_written,
        )
        self.fleet = FleetServicer(
            self.store,
            changes=self.changes,
            channels=self.channels,
            events=self.events,
            readiness=self.readiness,
            call_timeout_s=settings.push.timeout_s,
            tls_enabled=self.tls_enabled,
            poll_interval_s=poll_interval_s,
            clock=clock,
        )
        self.manager = ManagerServicer(
            self.store,
            settings=settings,
            replanner=self.changes,
            pusher=self.pusher,
            events=self.events,
            readiness=self.readiness,
            table=self.table,
            tls_enabled=self.tls_enabled,
            clock=clock,
        )
        self.server: grpc.aio.Server | None = None
        self.health: Any = None
        self._grpc_port = 0
        self._metrics_runner: web.AppRunner | None = None
        self._metrics_address = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._store_open = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Migrate the store and start serving; raise (after cleaning up) on failure."""
        try:
            self._start_tracing()
            await self._raw_store.migrate()
            self._store_open = True
            await self._start_grpc()
            await self._start_metrics()
            interval_s = min(5.0, max(0.05, self.settings.nodes.not_ready_after_s / 4))
            self._tasks.append(asyncio.create_task(self.readiness.run(interval_s)))
            self._tasks.append(asyncio.create_task(self.table.run()))
        except BaseException:
            await self.stop()
            raise
        log.info(
            "manager ready",
            extra={"grpc": self.addresses.grpc, "metrics": self.addresses.metrics},
        )

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop serving (health NOT_SERVING first), then close everything."""
        if self.health is not None:
            await rpc.set_serving(self.health, _SERVICES, serving=False)
        self.fleet.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.pusher.close()
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
        await self.channels.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._store_open:
            await self.table.close()
            await self._raw_store.close()
            self._store_open = False
        if self._owns_tracing:
            await asyncio.to_thread(self.tracing.shutdown)

    async def __aenter__(self) -> ManagerApp:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def addresses(self) -> Addresses:
        """The bound gRPC and metrics addresses ("" for metrics when disabled)."""
        host, _ = parse_host_port(self.settings.grpc.listen)
        return Addresses(grpc=_join(host, self._grpc_port), metrics=self._metrics_address)

    # -- parts -------------------------------------------------------------------

    def _start_tracing(self) -> None:
        if self._owns_tracing:
            self.tracing = telemetry.setup_tracing(
                self.settings.telemetry,
                service_name="reconciler-manager",
                version=__version__,
                counters=self.tracing.counters,
            )
        tracer = self.tracing.tracer("reconciler.manager")
        if tracer is not None:
            self.pusher.tracer = tracer

    async def _start_grpc(self) -> None:
        settings = self.settings.grpc
        interceptors: list[grpc.aio.ServerInterceptor] = [
            *telemetry.server_interceptors(self.tracing, self.rpc_server_stats),
            rpc.ErrorInterceptor(),
        ]
        if self.tls_enabled:
            allowed = (tls.PeerRole.NODE, tls.PeerRole.OPERATOR, tls.PeerRole.MANAGER)
            interceptors.insert(-1, tls.RoleInterceptor(allowed, tls_enabled=True))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=rpc.server_options(max_message_bytes=settings.max_message_bytes),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        manager_pb2_grpc.add_ManagerServiceServicer_to_server(self.manager, server)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(self.fleet, server)
        self.health = rpc.add_standard_services(server, _SERVICES)
        self._grpc_port = tls.add_listen_port(server, settings.listen, self.settings.tls)
        self.server = server
        await server.start()
        await rpc.set_serving(self.health, _SERVICES, serving=True)

    async def _start_metrics(self) -> None:
        if not self.settings.metrics.listen:
            return
        host, port = parse_host_port(self.settings.metrics.listen)
        application = web.Application()
        application.router.add_get("/metrics", self._serve_metrics)
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        self._metrics_runner = runner
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        self._metrics_address = _join(host, int(bound[1]))

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _open_channel(self, address: str, node_id: str) -> grpc.aio.Channel:
        options = rpc.channel_options(max_message_bytes=self.settings.grpc.max_message_bytes)
        try:
            return tls.secure_channel(
                address,
                self.settings.tls,
                server_name=node_id if self.tls_enabled else None,
                options=options,
                interceptors=telemetry.client_interceptors(self.tracing, self.rpc_client_stats),
            )
        except ConfigError as error:
            raise PermissionDenied(f"cannot dial node {node_id} at {address}: {error}") from None


async def run_manager(
    settings: ManagerSettings, *, reload: Callable[[], str] | None = None
) -> bool:
    """Run a Manager until SIGTERM or SIGINT (False), or a SIGHUP after which ``reload``
    finds the settings loadable (True: the caller restarts the process in place)."""
    app = ManagerApp(settings)
    return await run_until_signalled(app, name="manager", reload=reload)

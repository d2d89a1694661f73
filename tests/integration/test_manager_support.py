"""Shared parts of the Manager's tests: fake daemons, a Manager on port 0, polling.

It holds no tests; tests/unit/test_fleet_service.py and the
tests/integration/test_manager_*.py modules import it.

``FakeDaemon`` is a real grpc.aio DaemonService server on 127.0.0.1:0 with the
generation rules of the real daemon (newer accepted, same answered unchanged, older
refused with FAILED_PRECONDITION); it records every SyncAgentStates call and can be
told to fail the next calls with a status.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from reconciler import telemetry
from reconciler.api.agent.v1 import agent_pb2, metrics_pb2
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.config import (
    ManagerGrpcSettings,
    ManagerSettings,
    MetricsSettings,
    NodesSettings,
    PushSettings,
    RetentionSettings,
    StoreBackend,
    StoreSettings,
    TlsSettings,
)
from reconciler.convert import timestamp
from reconciler.manager.app import ManagerApp
from reconciler.manager.push import RetryPolicy
from reconciler.manager.store import ManagerStore
from reconciler.tls import add_listen_port

__all__ = [
    "FAST_RETRY",
    "Fake",
    "FakeDaemon",
    "Manager",
    "Result",
    "agent_set",
    "fake_daemon",
    "manager_settings",
    "reconciler",
    "running_manager",
    "until",
]

#: Retries without real waiting, so retry tests stay fast.
FAST_RETRY = RetryPolicy(max_attempts=5, initial_s=0.01, max_s=0.02, jitter_s=0.0)


async def until(
    condition: Callable[[], Any], *, deadline_s: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``condition`` (sync or async) until true; fail the test at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < end, f"{what} not met within {deadline_s}s"
        await asyncio.sleep(0.02)


def manager_settings(
    tmp_path: Path,
    *,
    not_ready_after_s: float = 45.0,
    backend: StoreBackend = StoreBackend.SQLITE,
    postgres_dsn: str = "",
    push_timeout_s: float = 5.0,
    events_max: int = 10_000,
) -> ManagerSettings:
    """Settings for a Manager on ephemeral loopback ports with state under tmp_path."""
    return ManagerSettings(
        state_dir=str(tmp_path / "manager"),
        grpc=ManagerGrpcSettings(listen="127.0.0.1:0"),
        metrics=MetricsSettings(listen="127.0.0.1:0"),
        nodes=NodesSettings(not_ready_after_s=not_ready_after_s),
        push=PushSettings(timeout_s=push_timeout_s),
        store=StoreSettings(backend=backend, postgres_dsn=postgres_dsn),
        retention=RetentionSettings(events_max=events_max),
    )


@dataclass
class Manager:
    """A started Manager and stubs of both its services."""

    app: ManagerApp
    channel: grpc.aio.Channel
    fleet: fleet_pb2_grpc.FleetServiceAsyncStub
    nodes: manager_pb2_grpc.ManagerServiceAsyncStub

    @property
    def address(self) -> str:
        return self.app.addresses.grpc

    async def register(
        self,
        node_id: str,
        *,
        labels: dict[str, str] | None = None,
        daemon: FakeDaemon | None = None,
        current_generation: int = 0,
    ) -> manager_pb2.RegisterNodeResponse:
        request = manager_pb2.RegisterNodeRequest(
            node_id=node_id,
            hostname=f"{node_id}.test",
            ip="127.0.0.1",
            labels=labels or {},
            version="test",
            daemon_address=daemon.address if daemon else "",
            current_generation=current_generation,
        )
        response: manager_pb2.RegisterNodeResponse = await self.nodes.RegisterNode(
            request, timeout=10
        )
        return response

    async def apply(
        self, message: fleet_pb2.AgentSet, *, dry_run: bool = False, expected_revision: int = 0
    ) -> fleet_pb2.ApplyAgentSetResponse:
        request = fleet_pb2.ApplyAgentSetRequest(
            agent_set=message, dry_run=dry_run, expected_revision=expected_revision
        )
        response: fleet_pb2.ApplyAgentSetResponse = await self.fleet.ApplyAgentSet(
            request, timeout=10
        )
        return response

    async def node(self, node_id: str) -> Any:
        response = await self.fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        return next(n for n in response.nodes if n.node_id == node_id)


@asynccontextmanager
async def running_manager(
    settings: ManagerSettings,
    *,
    store: ManagerStore | None = None,
    tracing: telemetry.Tracing | None = None,
) -> AsyncIterator[Manager]:
    """A Manager serving on port 0, stopped afterwards."""
    app = ManagerApp(settings, store=store, retry=FAST_RETRY, poll_interval_s=0.1, tracing=tracing)
    await app.start()
    channel = grpc.aio.insecure_channel(app.addresses.grpc)
    try:
        yield Manager(
            app=app,
            channel=channel,
            fleet=fleet_pb2_grpc.FleetServiceStub(channel),
            nodes=manager_pb2_grpc.ManagerServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop(grace_s=0.5)


def agent_set(
    name: str,
    *agent_ids: str,
    labels: dict[str, str] | None = None,
    node_ids: tuple[str, ...] = (),
    version: str = "1",
    agent_labels: dict[str, str] | None = None,
) -> fleet_pb2.AgentSet:
    """An AgentSet message whose agents sleep."""
    message = fleet_pb2.AgentSet(api_version="reconciler/v1", kind="AgentSet")
    message.metadata.name = name
    message.spec.node_selector.match_labels.update(labels or {})
    message.spec.node_selector.node_ids.extend(node_ids)
    for agent_id in agent_ids:
        message.spec.agents.add(
            id=agent_id,
            command=["/bin/sleep", "60"],
            version=version,
            state=agent_pb2.DESIRED_STATE_RUNNING,
            restart_policy=agent_pb2.RESTART_POLICY_ALWAYS,
            stop_grace_period_seconds=1.0,
            labels=agent_labels or {},
        )
    return message


@dataclass
class Fake:
    """What a FakeDaemon saw and holds."""

    node_id: str
    generation: int = 0
    agents: list[str] = field(default_factory=list)
    calls: list[daemon_pb2.SyncAgentStatesRequest] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    failures: list[grpc.StatusCode] = field(default_factory=list)
    operations: list[agent_pb2.AgentOperationRequest] = field(default_factory=list)
    traceparents: list[str] = field(default_factory=list)


class FakeDaemon(daemon_pb2_grpc.DaemonServiceServicer):
    """A DaemonService that stores desired states in memory and records calls."""

    def __init__(self, node_id: str) -> None:
        self.seen = Fake(node_id)
        self.address = ""

    def fail_next(self, code: grpc.StatusCode, times: int = 1) -> None:
        """Answer the next ``times`` SyncAgentStates calls with ``code``."""
        self.seen.failures.extend([code] * times)

    async def SyncAgentStates(
        self, request: daemon_pb2.SyncAgentStatesRequest, context: Any
    ) -> daemon_pb2.SyncAgentStatesResponse:
        seen = self.seen
        seen.calls.append(request)
        metadata = dict(context.invocation_metadata() or ())
        if "traceparent" in metadata:
            seen.traceparents.append(metadata["traceparent"])
        if seen.failures:
            await context.abort(seen.failures.pop(0), "told to fail")
        if request.node_id != seen.node_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another node")
        if request.generation < seen.generation:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"current generation {seen.generation}"
            )
        unchanged = request.generation == seen.generation
        if not unchanged:
            seen.generation = request.generation
            seen.agents = [a.id for a in request.agents]
            seen.accepted.append(request.generation)
        return daemon_pb2.SyncAgentStatesResponse(
            accepted_generation=request.generation,
            current_generation=seen.generation,
            observed_generation=seen.generation,
            unchanged=unchanged,
        )

    async def OperateAgent(
        self, request: agent_pb2.AgentOperationRequest, context: Any
    ) -> agent_pb2.AgentOperationResponse:
        self.seen.operations.append(request)
        if request.agent_id not in self.seen.agents:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"agent {request.agent_id!r} not found")
        return agent_pb2.AgentOperationResponse(
            agent_id=request.agent_id,
            operation=request.operation,
            operation_id=request.operation_id,
            message="done",
        )

    async def GetAgentMetrics(
        self, request: metrics_pb2.AgentMetricsRequest, context: Any
    ) -> metrics_pb2.AgentMetricsResponse:
        response = metrics_pb2.AgentMetricsResponse(agent_id=request.agent_id)
        now = time.time()
        for index in range(5):
            response.data_points.add(
                timestamp=timestamp(now - 5 + index),
                cpu_percent=10.0 * index,
                memory_bytes=1_000_000 * (index + 1),
            )
        return response


@asynccontextmanager
async def fake_daemon(node_id: str, *, tls: TlsSettings | None = None) -> AsyncIterator[FakeDaemon]:
    """A FakeDaemon serving on 127.0.0.1:0 (with mutual TLS when ``tls`` says so)."""
    daemon = FakeDaemon(node_id)
    server = grpc.aio.server()
    daemon_pb2_grpc.add_DaemonServiceServicer_to_server(daemon, server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = add_listen_port(server, "127.0.0.1:0", tls)
    daemon.address = f"127.0.0.1:{port}"
    await server.start()
    try:
        yield daemon
    finally:
        await server.stop(0)


@dataclass(frozen=True)
class Result:
    """How a ``reconciler`` process ended."""

    exit_code: int
    stdout: str
    stderr: str


async def reconciler(manager: Manager | str, *args: str, extra: Sequence[str] = ()) -> Result:
    """Run ``reconciler ARGS --manager ADDR [EXTRA]`` as a process."""
    address = manager if isinstance(manager, str) else manager.address
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "reconciler", *args, "--manager", address, *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())

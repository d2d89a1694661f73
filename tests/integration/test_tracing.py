"""Traces across processes: real Manager, daemon, CLI and agent processes exporting
over OTLP/gRPC to a collector the test runs (``tests/support/otlp_collector.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from reconciler.api.daemon.v1 import daemon_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.api.manager.v1 import manager_pb2
from reconciler.config import TelemetryExporter, TelemetrySettings
from reconciler.telemetry import Tracing, client_interceptors, setup_tracing
from tests.support.daemon import ALLOWED, DaemonProcess, free_port, spec, wait_for
from tests.support.manager import Fleet, agent_set_yaml
from tests.support.otlp_collector import CollectedSpan, OtlpCollector

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SYNC = "reconciler.api.daemon.v1.DaemonService/SyncAgentStates"
SERVICES: dict[str, ServiceDescriptor] = {
    "DaemonService": daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"],
    "ManagerService": manager_pb2.DESCRIPTOR.services_by_name["ManagerService"],
    "FleetService": fleet_pb2.DESCRIPTOR.services_by_name["FleetService"],
}


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as running:
        yield running


def steady_agent(directory: Path, prelude: str = "") -> Path:
    """examples/agents/steady.py as an executable run by this environment's Python
    (the daemon resolves interpreters to their real path, which would lose the
    virtualenv and agentlet's dependencies), with ``prelude`` run first."""
    source = (ROOT / "examples" / "agents" / "steady.py").read_text()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "steady"
    path.write_text(
        f"#!{sys.executable}\nimport sys; sys.path.insert(0, {str(ROOT)!r})\n{prelude}{source}"
    )
    path.chmod(0o755)
    return path


def traced_daemon(root: Path, endpoint: str) -> DaemonProcess:
    return DaemonProcess(
        root,
        settings={
            "telemetry": {"exporter": "otlp", "otlp_endpoint": endpoint},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "agents": {"allowed_commands": [*ALLOWED, f"{root}/bin/*"]},
        },
    )


@pytest.fixture
def daemon(tmp_path: Path, collector: OtlpCollector) -> Iterator[DaemonProcess]:
    process = traced_daemon(tmp_path / "daemon", collector.endpoint)
    process.start()
    yield process
    process.close()


@pytest.fixture
def client_tracing(collector: OtlpCollector) -> Iterator[Tracing]:
    tracing = setup_tracing(
        TelemetrySettings(exporter=TelemetryExporter.OTLP, otlp_endpoint=collector.endpoint),
        service_name="test-client",
        version="0",
        environ={},
        install_global=False,
    )
    yield tracing
    tracing.shutdown()


@pytest.fixture
async def traced_channel(
    daemon: DaemonProcess, client_tracing: Tracing
) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(
        daemon.address, interceptors=client_interceptors(client_tracing)
    )
    yield channel
    await channel.close()


def _ancestors(span: CollectedSpan, by_id: dict[str, CollectedSpan]) -> list[str]:
    names = []
    current = by_id.get(span.parent_span_id)
    while current is not None:
        names.append(current.name)
        current = by_id.get(current.parent_span_id)
    return names


def _complete(spans: list[CollectedSpan]) -> list[CollectedSpan] | None:
    """The trace of the client's SyncAgentStates span once it holds every part."""
    clients = [s for s in spans if s.name == SYNC and s.service == "test-client"]
    if not clients:
        return None
    trace = [s for s in spans if s.trace_id == clients[0].trace_id]
    healthy = [s for s in trace if "agent.first_healthy_heartbeat" in s.events]
    return trace if healthy and any(s.name == "agent.start" for s in trace) else None


async def test_one_sync_is_one_trace_from_the_client_to_the_first_healthy_heartbeat(
    daemon: DaemonProcess,
    collector: OtlpCollector,
    client_tracing: Tracing,
    traced_channel: grpc.aio.Channel,
) -> None:
    sync = traced_channel.unary_unary(
        f"/{SYNC}",
        request_serializer=daemon_pb2.SyncAgentStatesRequest.SerializeToString,
        response_deserializer=daemon_pb2.SyncAgentStatesResponse.FromString,
    )
    agent = steady_agent(daemon.root / "bin")
    request = daemon_pb2.SyncAgentStatesRequest(
        node_id=daemon.node_id,
        generation=1,
        agents=[spec("steady", command=[str(agent)], heartbeat=(0.5, 5.0))],
    )
    await sync(request, timeout=30)
    await asyncio.to_thread(wait_for, lambda: daemon.running().get("steady"), what="running")
    client_tracing.force_flush()

    trace = await asyncio.to_thread(
        collector.wait_for, _complete, what="the whole trace of the sync"
    )
    by_id = {s.span_id: s for s in trace}
    [client] = [s for s in trace if s.service == "test-client"]
    assert client.is_root
    [server] = [s for s in trace if s.name == SYNC and s.service == "reconciler-daemon"]
    assert server.parent_span_id == client.span_id
    assert server.resource["reconciler.node.id"] == daemon.node_id
    assert server.attributes["rpc.method"] == "SyncAgentStates"
    assert server.attributes["rpc.grpc.status_code"] == 0
    [start] = [s for s in trace if s.name == "agent.start"]
    assert start.attributes["agent.id"] == "steady"
    assert _ancestors(start, by_id) == ["reconcile", SYNC, SYNC]
    [healthy] = [s for s in trace if "agent.first_healthy_heartbeat" in s.events]
    assert healthy.name == "reconcile"
    assert _ancestors(healthy, by_id)[:2] == ["agent.start", "reconcile"]
    assert _ancestors(healthy, by_id)[-2:] == [SYNC, SYNC]


def _empty_request(method: Any) -> Any:
    return message_factory.GetMessageClass(method.input_type)()


async def _call_every_method(address: str, service: ServiceDescriptor) -> None:
    """Call each method once with an empty request; any answer (errors too) will do."""
    async with grpc.aio.insecure_channel(address) as channel:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            serialize = type(_empty_request(method)).SerializeToString
            if method.server_streaming:
                call = channel.unary_stream(path, request_serializer=serialize)
                try:
                    async for _ in call(_empty_request(method), timeout=1.0):
                        break
                except grpc.aio.AioRpcError:
                    pass
            else:
                unary = channel.unary_unary(path, request_serializer=serialize)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await unary(_empty_request(method), timeout=5.0)


def _missing(spans: list[CollectedSpan], service: ServiceDescriptor) -> list[str]:
    seen = {s.name for s in spans if s.kind == 2}  # SPAN_KIND_SERVER
    expected = {f"{service.full_name}/{method.name}" for method in service.methods}
    return sorted(expected - seen)


async def test_every_daemon_service_method_makes_a_server_span(
    daemon: DaemonProcess, collector: OtlpCollector
) -> None:
    service = SERVICES["DaemonService"]
    await _call_every_method(daemon.address, service)
    await asyncio.to_thread(
        collector.wait_for,
        lambda spans: not _missing(spans, service),
        what=f"a server span per method of {service.full_name}",
    )
    assert not [s for s in collector.spans() if "grpc.health" in s.name]


@contextlib.contextmanager
def manager_process(root: Path, endpoint: str) -> Iterator[str]:
    """A ``reconciler manager`` child process exporting spans to ``endpoint``."""
    root.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    config = root / "manager.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(root / "state"),
                "grpc": {"listen": address},
                "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                "telemetry": {"exporter": "otlp", "otlp_endpoint": endpoint},
            }
        )
    )
    with (root / "manager.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "manager", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: _serving(address, proc), what="the Manager to serve")
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _serving(address: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"the Manager exited with {proc.returncode}"
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_manager_and_fleet_service_method_makes_a_server_span(
    tmp_path: Path, collector: OtlpCollector
) -> None:
    with manager_process(tmp_path / "manager", collector.endpoint) as address:
        for name in ("ManagerService", "FleetService"):
            await _call_every_method(address, SERVICES[name])
        for name in ("ManagerService", "FleetService"):
            service = SERVICES[name]
            await asyncio.to_thread(
                collector.wait_for,
                lambda spans, service=service: not _missing(spans, service),
                timeout_s=10,
                what=f"a server span per method of {service.full_name}",
            )


def _metrics(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_collector_that_is_not_there_does_not_slow_rpcs_and_lost_spans_are_counted(
    tmp_path: Path,
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    traced = traced_daemon(tmp_path / "traced", nowhere)
    plain = DaemonProcess(
        tmp_path / "plain", settings={"metrics": {"listen": f"127.0.0.1:{free_port()}"}}
    )
    traced.start()
    plain.start()
    try:
        latencies: dict[str, list[float]] = {"traced": [], "plain": []}
        with traced.channel() as t_channel, plain.channel() as p_channel:
            stubs = {"traced": traced.stub(t_channel), "plain": plain.stub(p_channel)}
            for _ in range(300):  # interleaved, so load on the machine hits both alike
                for name, stub in stubs.items():
                    started = time.perf_counter()
                    stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=10)
                    latencies[name].append(time.perf_counter() - started)
        ratio = statistics.median(latencies["traced"]) / statistics.median(latencies["plain"])
        assert ratio < 2.0, f"tracing to a missing collector slowed RPCs {ratio:.2f}x"

        metrics_address = traced.settings["metrics"]["listen"]
        failed = ("reconciler_trace_spans_dropped_total", (("reason", "export_failed"),))
        wait_for(
            lambda: _metrics(metrics_address).get(failed, 0) > 0,
            timeout_s=60,
            what="spans that could not be exported to be counted",
        )
        exported = _metrics(metrics_address)[("reconciler_trace_spans_exported_total", ())]
        assert exported == 0
    finally:
        traced.close()
        plain.close()


APPLY = "reconciler.api.fleet.v1.FleetService/ApplyAgentSet"
FIRST_HEARTBEAT = "agent.first_healthy_heartbeat"


def exporting_agent(directory: Path, endpoint: str) -> Path:
    """``steady_agent`` for an agent that uses OpenTelemetry: it installs an SDK
    provider that exports each span to ``endpoint`` as it ends."""
    setup = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.resources import Resource\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
        "_provider = TracerProvider(resource=Resource.create({'service.name': 'steady'}))\n"
        "_provider.add_span_processor(\n"
        f"    SimpleSpanProcessor(OTLPSpanExporter(endpoint={endpoint!r}, insecure=True))\n"
        ")\n"
        "trace.set_tracer_provider(_provider)\n"
    )
    return steady_agent(directory, prelude=setup)


def _apply_trace(spans: list[CollectedSpan]) -> list[CollectedSpan] | None:
    """The trace of the CLI's ApplyAgentSet span once it holds every part."""
    clients = [s for s in spans if s.name == APPLY and s.service == "reconciler-cli"]
    if not clients:
        return None
    trace = [s for s in spans if s.trace_id == clients[0].trace_id]
    names = {s.name for s in trace}
    wanted = {APPLY, "push", SYNC, "reconcile", "agent.start", "agentlet.first_heartbeat"}
    healthy = any(FIRST_HEARTBEAT in s.events for s in trace)
    return trace if healthy and wanted <= names else None


def _one(trace: list[CollectedSpan], name: str, service: str, kind: int = 0) -> CollectedSpan:
    found = [s for s in trace if s.name == name and s.service == service]
    found = [s for s in found if not kind or s.kind == kind]
    assert len(found) == 1, f"{name} in {service}: {found}"
    return found[0]


SERVER, CLIENT = 2, 3  # SpanKind in OTLP


def test_one_apply_is_one_trace_from_the_cli_through_the_manager_to_the_agent(
    tmp_path: Path, collector: OtlpCollector
) -> None:
    """CLI ApplyAgentSet span -> Manager server span -> push span -> SyncAgentStates
    (Manager client, daemon server) -> reconcile -> agent.start -> the agent's
    first-heartbeat span and the daemon's first-healthy-heartbeat event, one trace."""
    telemetry = {"exporter": "otlp", "otlp_endpoint": collector.endpoint}
    fleet = Fleet(tmp_path)
    try:
        manager = fleet.manager(settings={"telemetry": telemetry})
        bin_dir = tmp_path / "bin"
        agent = exporting_agent(bin_dir, collector.endpoint)
        daemon = fleet.daemon(
            "node",
            manager_address=manager.address,
            # Slow heartbeats: the change must reach the daemon by the push, not a pull.
            link={"heartbeat_interval_s": 10.0, "report_interval_s": 10.0},
            telemetry=telemetry,
            agents={"allowed_commands": [*ALLOWED, f"{bin_dir}/*"]},
        )
        manager.wait_ready_nodes({daemon.node_id})
        document = tmp_path / "steady.yaml"
        document.write_text(
            agent_set_yaml(
                "traced",
                agents=[
                    {
                        "id": "steady",
                        "command": [str(agent)],
                        "heartbeat": {"intervalSeconds": 0.5, "timeoutSeconds": 5},
                    }
                ],
                node_ids=[daemon.node_id],
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RECONCILER_", "OTEL_"))}
        env |= {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
        argv = ["apply", "-f", str(document), "--manager", manager.address]
        applied = subprocess.run(
            [sys.executable, "-m", "reconciler", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert applied.returncode == 0, applied.stderr

        trace = collector.wait_for(_apply_trace, timeout_s=60, what="the whole trace of the apply")
    finally:
        fleet.close()

    cli_span = _one(trace, APPLY, "reconciler-cli", CLIENT)
    served = _one(trace, APPLY, "reconciler-manager", SERVER)
    push = _one(trace, "push", "reconciler-manager")
    sync_out = _one(trace, SYNC, "reconciler-manager", CLIENT)
    sync_in = _one(trace, SYNC, "reconciler-daemon", SERVER)
    start = _one(trace, "agent.start", "reconciler-daemon")
    first = _one(trace, "agentlet.first_heartbeat", "steady")
    [healthy] = [s for s in trace if FIRST_HEARTBEAT in s.events]
    assert cli_span.is_root
    chain = [cli_span, served, push, sync_out, sync_in]
    for parent, child in itertools.pairwise(chain):
        assert child.parent_span_id == parent.span_id, f"{child.name} under {parent.name}"
    by_id = {s.span_id: s for s in trace}
    pass_of_start = by_id[start.parent_span_id]
    assert pass_of_start.name == "reconcile"
    assert pass_of_start.parent_span_id == sync_in.span_id
    assert healthy.name == "reconcile"
    assert healthy.parent_span_id == start.span_id
    assert first.parent_span_id == start.span_id
    assert push.attributes["node.id"] == daemon.node_id
    assert push.attributes["generation"] >= 1
    assert start.attributes["agent.id"] == "steady"
    assert first.attributes["agent.id"] == "steady"
    assert sync_in.resource["reconciler.node.id"] == daemon.node_id
    assert {s.trace_id for s in trace} == {cli_span.trace_id}

"""The Manager with mutual TLS: node identity is bound to the certificate, only
operators may use FleetService, and pushes to a TLS daemon verify the node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.config import TlsMode, TlsSettings
from reconciler.manager.store.memory import MemoryStore
from reconciler.pki import DevPki, make_dev_pki
from reconciler.tls import secure_channel
from tests.integration.test_manager_support import (
    Manager,
    agent_set,
    fake_daemon,
    manager_settings,
    reconciler,
    running_manager,
    until,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), nodes=2, manager_hosts=[])


def holder(pki: DevPki, name: str) -> TlsSettings:
    pairs = {"manager": (pki.manager_cert, pki.manager_key), **pki.node_certs}
    assert pki.operator is not None
    pairs["operator"] = pki.operator
    cert, key = pairs[name]
    return TlsSettings(
        mode=TlsMode.MTLS, ca_file=str(pki.ca_cert), cert_file=str(cert), key_file=str(key)
    )


@pytest.fixture
async def manager(tmp_path: Path, pki: DevPki) -> AsyncIterator[Manager]:
    settings = replace(manager_settings(tmp_path), tls=holder(pki, "manager"))
    async with running_manager(settings, store=MemoryStore()) as running:
        yield running


def stubs(
    manager: Manager, tls: TlsSettings
) -> tuple[
    grpc.aio.Channel, manager_pb2_grpc.ManagerServiceAsyncStub, fleet_pb2_grpc.FleetServiceAsyncStub
]:
    channel = secure_channel(manager.address, tls)
    return (
        channel,
        manager_pb2_grpc.ManagerServiceStub(channel),
        fleet_pb2_grpc.FleetServiceStub(channel),
    )


async def test_a_node_registers_as_itself_only_and_the_manager_pushes_over_tls(
    manager: Manager, pki: DevPki
) -> None:
    channel, nodes, fleet = stubs(manager, holder(pki, "node-1"))
    async with channel, fake_daemon("node-1", tls=holder(pki, "node-1")) as daemon:
        register = manager_pb2.RegisterNodeRequest(node_id="node-1", daemon_address=daemon.address)
        await nodes.RegisterNode(register, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await nodes.RegisterNode(manager_pb2.RegisterNodeRequest(node_id="node-2"), timeout=10)
        assert other.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as not_operator:
            await fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        assert not_operator.value.code() is grpc.StatusCode.PERMISSION_DENIED

        operator_channel, _, operator = stubs(manager, holder(pki, "operator"))
        async with operator_channel:
            request = fleet_pb2.ApplyAgentSetRequest(agent_set=agent_set("all", "a"))
            await operator.ApplyAgentSet(request, timeout=10)
        await until(lambda: daemon.seen.agents == ["a"], what="a push over mutual TLS")


async def test_a_plaintext_client_is_refused(manager: Manager) -> None:
    async with grpc.aio.insecure_channel(manager.address) as channel:
        stub = manager_pb2_grpc.ManagerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id="node-1"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_the_cli_reaches_the_manager_with_an_operator_certificate(
    manager: Manager, pki: DevPki
) -> None:
    assert pki.operator is not None
    cert, key = pki.operator
    tls_flags = ["--tls-ca", str(pki.ca_cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    result = await reconciler(manager, "get", "nodes", "-o", "json", extra=tls_flags)
    assert (result.exit_code, result.stdout.strip()) == (0, "[]"), result.stderr

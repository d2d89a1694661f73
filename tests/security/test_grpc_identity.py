"""The real daemon process and the real Manager with mutual TLS, against wrong callers.

A caller without a certificate, or with one from another CA, never gets past the
handshake (UNAVAILABLE); a node's certificate cannot change another node's state on
the Manager, nor give orders to a daemon (PERMISSION_DENIED). After each refusal the
server still serves its rightful callers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.config import TlsMode, TlsSettings
from reconciler.manager.store.memory import MemoryStore
from reconciler.pki import DevPki, make_dev_pki
from reconciler.tls import secure_channel
from tests.integration.test_manager_support import Manager, manager_settings, running_manager
from tests.support.daemon import DaemonProcess

__all__: list[str] = []

pytestmark = pytest.mark.slow
CALL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), nodes=2, manager_hosts=[])


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Another CA issuing the same names: nothing it signs may get in."""
    return make_dev_pki(tmp_path_factory.mktemp("stranger"), nodes=2, manager_hosts=[])


def holder(pki: DevPki, name: str, *, trust: DevPki | None = None) -> TlsSettings:
    pairs = {"manager": (pki.manager_cert, pki.manager_key), **pki.node_certs}
    assert pki.operator is not None
    pairs["operator"] = pki.operator
    cert, key = pairs[name]
    return TlsSettings(
        mode=TlsMode.MTLS,
        ca_file=str((trust or pki).ca_cert),
        cert_file=str(cert),
        key_file=str(key),
    )


@dataclass
class TlsDaemon(DaemonProcess):
    """The daemon process serving mutual TLS with node-1's certificate."""

    operator: TlsSettings | None = None

    def channel(self) -> grpc.Channel:
        assert self.operator is not None
        return grpc.secure_channel(
            self.address,
            sync_credentials(self.operator),
            options=[("grpc.ssl_target_name_override", self.node_id)],
        )

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        with self.channel() as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def sync_credentials(tls: TlsSettings, *, with_certificate: bool = True) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca_file).read_bytes(),
        private_key=Path(tls.key_file).read_bytes() if with_certificate else None,
        certificate_chain=Path(tls.cert_file).read_bytes() if with_certificate else None,
    )


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki) -> Iterator[TlsDaemon]:
    cert, key = pki.node_certs["node-1"]
    process = TlsDaemon(
        tmp_path / "daemon",
        node_id="node-1",
        settings={
            "tls": {
                "mode": "mtls",
                "ca_file": str(pki.ca_cert),
                "cert_file": str(cert),
                "key_file": str(key),
            }
        },
        operator=holder(pki, "operator"),
    )
    process.start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture
async def manager(tmp_path: Path, pki: DevPki) -> AsyncIterator[Manager]:
    settings = replace(manager_settings(tmp_path), tls=holder(pki, "manager"))
    async with running_manager(settings, store=MemoryStore()) as running:
        yield running


def without_certificate(pki: DevPki, stranger: DevPki) -> Any:
    return sync_credentials(holder(pki, "operator"), with_certificate=False)


def from_another_ca(pki: DevPki, stranger: DevPki) -> Any:
    """A certificate the stranger CA signed; the client still trusts the real CA."""
    cert, key = stranger.operator or (stranger.manager_cert, stranger.manager_key)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


WRONG_CALLERS = [
    pytest.param(without_certificate, id="no-certificate"),
    pytest.param(from_another_ca, id="certificate-from-another-ca"),
]


def health(address: str, credentials: Any, server_name: str) -> grpc.StatusCode:
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("credentials", WRONG_CALLERS)
def test_the_daemon_refuses_a_caller_without_a_trusted_certificate(
    daemon: TlsDaemon, pki: DevPki, stranger: DevPki, credentials: Any
) -> None:
    assert health(daemon.address, credentials(pki, stranger), "node-1") is (
        grpc.StatusCode.UNAVAILABLE
    )
    assert daemon.agents() == {}


@pytest.mark.parametrize("credentials", WRONG_CALLERS)
async def test_the_manager_refuses_a_caller_without_a_trusted_certificate(
    manager: Manager, pki: DevPki, stranger: DevPki, credentials: Any
) -> None:
    code = health(manager.address, credentials(pki, stranger), "manager")
    assert code is grpc.StatusCode.UNAVAILABLE
    async with secure_channel(manager.address, holder(pki, "node-1")) as channel:
        nodes = manager_pb2_grpc.ManagerServiceStub(channel)
        await nodes.RegisterNode(manager_pb2.RegisterNodeRequest(node_id="node-1"), timeout=10)


def test_another_nodes_certificate_cannot_give_the_daemon_orders(
    daemon: TlsDaemon, pki: DevPki
) -> None:
    options = [("grpc.ssl_target_name_override", "node-1")]
    credentials = sync_credentials(holder(pki, "node-2"))
    with grpc.secure_channel(daemon.address, credentials, options=options) as channel:
        request = daemon_pb2.SyncAgentStatesRequest(node_id="node-1", generation=1)
        with pytest.raises(grpc.RpcError) as caught:
            daemon_pb2_grpc.DaemonServiceStub(channel).SyncAgentStates(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert daemon.list().current_generation == 0


async def test_another_nodes_certificate_cannot_change_a_nodes_state_on_the_manager(
    manager: Manager, pki: DevPki
) -> None:
    async with secure_channel(manager.address, holder(pki, "node-2")) as channel:
        nodes = manager_pb2_grpc.ManagerServiceStub(channel)
        for call, request in [
            (nodes.RegisterNode, manager_pb2.RegisterNodeRequest(node_id="node-1")),
            (nodes.Heartbeat, manager_pb2.HeartbeatRequest(node_id="node-1")),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request, timeout=10)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        await nodes.RegisterNode(manager_pb2.RegisterNodeRequest(node_id="node-2"), timeout=10)

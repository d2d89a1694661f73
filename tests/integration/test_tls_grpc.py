"""Mutual TLS over real gRPC on 127.0.0.1 with certificates from ``make_dev_pki``.

A tiny servicer stands in for the Manager's and the daemon's: ``WhoAmI`` answers the
caller's identity and ``Mutate`` refuses a request naming another node than the
caller's certificate, as a mutating RPC does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.config import TlsMode, TlsSettings
from reconciler.pki import DevPki, make_dev_pki
from reconciler.rpc import ErrorInterceptor, add_standard_services, set_serving
from reconciler.tls import (
    PeerRole,
    RoleInterceptor,
    add_listen_port,
    peer_identity,
    peer_identity_of,
    require_node,
    secure_channel,
)

CALL_TIMEOUT_S = 10.0
Context = grpc.aio.ServicerContext[Any, Any]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), nodes=2, manager_hosts=[])


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Another CA with the same holder names: nothing it signs may get in."""
    return make_dev_pki(tmp_path_factory.mktemp("other"), nodes=2, manager_hosts=[])


def settings(pki: DevPki, holder: str, *, ca: DevPki | None = None) -> TlsSettings:
    pairs = {"manager": (pki.manager_cert, pki.manager_key), **pki.node_certs}
    if pki.operator is not None:
        pairs["operator"] = pki.operator
    cert, key = pairs[holder]
    ca_file = (ca or pki).ca_cert
    return TlsSettings(
        mode=TlsMode.MTLS, ca_file=str(ca_file), cert_file=str(cert), key_file=str(key)
    )


async def who_am_i(request: bytes, context: Context) -> bytes:
    identity = peer_identity_of(context)
    if identity is None:
        return b"nobody"
    return f"{identity.role}:{identity.name}:{peer_identity(context)}".encode()


async def mutate(request: bytes, context: Context) -> bytes:
    require_node(context, request.decode(), tls_enabled=True)
    return b"done"


@dataclass
class Served:
    address: str
    server: grpc.aio.Server


async def serve(
    tls: TlsSettings, *, interceptors: list[grpc.aio.ServerInterceptor], extra: str = ""
) -> Served:
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), *interceptors])
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i),
        "Mutate": grpc.unary_unary_rpc_method_handler(mutate),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Id", handlers)])
    health = add_standard_services(server, ["test.Id"])
    port = add_listen_port(server, "127.0.0.1:0", tls)
    if extra:
        add_listen_port(server, extra, tls)
    await server.start()
    await set_serving(health, ["test.Id"], serving=True)
    return Served(address=f"127.0.0.1:{port}", server=server)


@pytest.fixture
async def manager(pki: DevPki) -> AsyncIterator[Served]:
    """A server like the Manager's: any verified peer, node checks per RPC."""
    served = await serve(settings(pki, "manager"), interceptors=[])
    yield served
    await served.server.stop(None)


@pytest.fixture
async def daemon(pki: DevPki, tmp_path: Path) -> AsyncIterator[Served]:
    """A server like a daemon's: only the Manager and operators, plus a Unix socket."""
    role_check = RoleInterceptor({PeerRole.MANAGER, PeerRole.OPERATOR}, tls_enabled=True)
    extra = f"unix:{tmp_path / 'd.sock'}"
    served = await serve(settings(pki, "node-1"), interceptors=[role_check], extra=extra)
    yield served
    await served.server.stop(None)


async def call(channel: grpc.aio.Channel, method: str, request: bytes = b"") -> bytes:
    multicallable: Any = channel.unary_unary(f"/test.Id/{method}")
    result: bytes = await multicallable(request, timeout=CALL_TIMEOUT_S)
    return result


async def healthy(channel: grpc.aio.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def still_serves(address: str, tls: TlsSettings) -> bool:
    async with secure_channel(address, tls) as channel:
        return await healthy(channel)


async def test_a_node_with_a_dev_certificate_is_served_and_identified(
    manager: Served, pki: DevPki
) -> None:
    async with secure_channel(manager.address, settings(pki, "node-1")) as channel:
        assert await healthy(channel)
        assert await call(channel, "WhoAmI") == b"node:node-1:node-1"


async def test_the_manager_and_an_operator_are_identified_by_role(
    manager: Served, pki: DevPki
) -> None:
    async with secure_channel(manager.address, settings(pki, "manager")) as channel:
        assert await call(channel, "WhoAmI") == b"manager:manager:None"
    async with secure_channel(manager.address, settings(pki, "operator")) as channel:
        assert await call(channel, "WhoAmI") == b"operator:operator:None"


async def test_a_node_may_change_its_own_state(manager: Served, pki: DevPki) -> None:
    async with secure_channel(manager.address, settings(pki, "node-1")) as channel:
        assert await call(channel, "Mutate", b"node-1") == b"done"


async def test_a_node_naming_another_node_is_denied(manager: Served, pki: DevPki) -> None:
    async with secure_channel(manager.address, settings(pki, "node-2")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Mutate", b"node-1")
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "node-2" in (caught.value.details() or "")
    assert await still_serves(manager.address, settings(pki, "node-1"))


def no_certificate(address: str, pki: DevPki, stranger: DevPki) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    return grpc.aio.secure_channel(address, credentials)


def other_ca_certificate(address: str, pki: DevPki, stranger: DevPki) -> grpc.aio.Channel:
    """Trusts the real CA (so it would accept the server) but presents a stranger's
    node-1 certificate."""
    return secure_channel(address, settings(stranger, "node-1", ca=pki))


def plaintext(address: str, pki: DevPki, stranger: DevPki) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def trusting_another_ca(address: str, pki: DevPki, stranger: DevPki) -> grpc.aio.Channel:
    """Presents a good certificate but does not trust the server's CA."""
    return secure_channel(address, settings(pki, "node-1", ca=stranger))


REFUSED_CLIENTS = [
    pytest.param(no_certificate, id="no-client-certificate"),
    pytest.param(other_ca_certificate, id="certificate-from-another-ca"),
    pytest.param(plaintext, id="plaintext"),
    pytest.param(trusting_another_ca, id="server-from-an-untrusted-ca"),
]


@pytest.mark.parametrize("connect", REFUSED_CLIENTS)
async def test_the_manager_refuses_the_connection_and_keeps_serving(
    manager: Served, pki: DevPki, stranger: DevPki, connect: Any
) -> None:
    async with connect(manager.address, pki, stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "WhoAmI")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await still_serves(manager.address, settings(pki, "node-1"))


@pytest.mark.parametrize("connect", REFUSED_CLIENTS)
async def test_the_daemon_refuses_the_connection_and_keeps_serving(
    daemon: Served, pki: DevPki, stranger: DevPki, connect: Any
) -> None:
    async with connect(daemon.address, pki, stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "WhoAmI")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await still_serves(daemon.address, settings(pki, "manager"))


@pytest.mark.parametrize("holder", ["manager", "operator"])
async def test_the_daemon_serves_the_manager_and_operators(
    daemon: Served, pki: DevPki, holder: str
) -> None:
    async with secure_channel(daemon.address, settings(pki, holder)) as channel:
        assert await call(channel, "WhoAmI") == f"{holder}:{holder}:None".encode()


async def test_the_daemon_denies_another_node_but_answers_its_health(
    daemon: Served, pki: DevPki
) -> None:
    async with secure_channel(daemon.address, settings(pki, "node-2")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "WhoAmI")
        assert await healthy(channel)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "a node may not call this" in (caught.value.details() or "")


async def test_the_daemon_serves_a_local_operator_on_its_unix_socket(
    daemon: Served, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'd.sock'}") as channel:
        assert await call(channel, "WhoAmI") == b"operator:local:None"


async def test_a_node_is_dialled_by_its_id_as_server_name(daemon: Served, pki: DevPki) -> None:
    tls = settings(pki, "manager")
    async with secure_channel(daemon.address, tls, server_name="node-1") as channel:
        assert await healthy(channel)
    async with secure_channel(daemon.address, tls, server_name="node-2") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await healthy(channel)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

"""A fleet of real processes with mutual TLS: a ``reconciler manager`` and a
``reconciler daemon`` with certificates from ``reconciler.pki.make_dev_pki``.

Both refuse a plaintext client, a client with no certificate and a client whose
certificate comes from another CA. The normal path works: the daemon registers, an
apply through the real CLI (with the operator's certificate) converges. A node's
certificate cannot register another node.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from reconciler.pki import DevPki, make_dev_pki
from tests.support.manager import (
    Fleet,
    ManagerProcess,
    TlsDaemon,
    agent_set_yaml,
    cli,
    pki_credentials,
    sleeper,
)

pytestmark = pytest.mark.slow

TOKEN = uuid.uuid4().hex[:6]
NODES = [f"tls-1-{TOKEN}", f"tls-2-{TOKEN}"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki") / "ca", nodes=NODES, manager_hosts=[])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Another CA issuing certificates with the very same names."""
    return make_dev_pki(tmp_path_factory.mktemp("other") / "ca", nodes=NODES, manager_hosts=[])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, pki: DevPki) -> Iterator[Fleet]:
    running = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        manager = running.manager(tls=pki)
        running.daemon(
            "tls-1",
            node_id=NODES[0],
            manager_address=manager.address,
            labels={"role": "edge"},
            kind=TlsDaemon,
            pki=pki,
        )
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def manager(fleet: Fleet) -> ManagerProcess:
    return fleet.managers[0]


@pytest.fixture(scope="module")
def daemon(fleet: Fleet) -> TlsDaemon:
    found = fleet.daemons[0]
    assert isinstance(found, TlsDaemon)
    return found


def test_a_tls_daemon_registers_and_an_apply_with_the_operator_certificate_converges(
    manager: ManagerProcess, daemon: TlsDaemon, pki: DevPki, tmp_path: Path
) -> None:
    manager.wait_ready_nodes({daemon.node_id})
    path = tmp_path / "edge.yaml"
    path.write_text(
        agent_set_yaml("edge-agents", agents=[sleeper("shipper")], match_labels={"role": "edge"})
    )
    applied = cli(
        "apply", "-f", str(path), "--wait", "--timeout", "60s", manager=manager.address, pki=pki
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    running = daemon.running()
    assert set(running) == {"shipper"}
    assert psutil.Process(running["shipper"]).cmdline() == ["/bin/sleep", "3600"]


Call = Callable[[grpc.Channel], Any]


def call_manager(channel: grpc.Channel) -> Any:
    return fleet_pb2_grpc.FleetServiceStub(channel).ListNodes(
        fleet_pb2.ListNodesRequest(), timeout=5
    )


def call_daemon(channel: grpc.Channel) -> Any:
    return daemon_pb2_grpc.DaemonServiceStub(channel).ListAgents(
        daemon_pb2.ListAgentsRequest(), timeout=5
    )


def call_health(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def open_channel(client: str, address: str, pki: DevPki, other_pki: DevPki) -> grpc.Channel:
    if client == "plaintext":
        return grpc.insecure_channel(address)
    if client == "no certificate":
        return grpc.secure_channel(address, pki_credentials(pki, None))
    # Trusts the right CA (so only the client's side is wrong), presents the other's.
    return grpc.secure_channel(address, pki_credentials(other_pki, "operator", trust=pki))


CLIENTS = ["plaintext", "no certificate", "another CA"]


@pytest.mark.parametrize("client", [pytest.param(c, id=c.replace(" ", "-")) for c in CLIENTS])
@pytest.mark.parametrize(
    ("server", "calls"),
    [
        pytest.param("manager", (call_manager, call_health), id="manager"),
        pytest.param("daemon", (call_daemon, call_health), id="daemon"),
    ],
)
def test_a_client_without_a_certificate_from_the_ca_is_refused(
    manager: ManagerProcess,
    daemon: TlsDaemon,
    pki: DevPki,
    other_pki: DevPki,
    server: str,
    calls: tuple[Call, ...],
    client: str,
) -> None:
    address = manager.address if server == "manager" else daemon.address
    for call in calls:
        with (
            open_channel(client, address, pki, other_pki) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            call(channel)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with grpc.secure_channel(address, pki_credentials(pki, "operator")) as channel:
        call_health(channel)  # the same server answers a proper client


def test_the_cli_without_the_operator_certificate_is_refused(manager: ManagerProcess) -> None:
    refused = cli("get", "nodes", manager=manager.address, timeout_s=60)
    assert refused.returncode != 0
    assert "UNAVAILABLE" in refused.stderr


def test_a_node_certificate_cannot_register_another_node(
    manager: ManagerProcess, daemon: TlsDaemon, pki: DevPki
) -> None:
    with grpc.secure_channel(manager.address, pki_credentials(pki, NODES[1])) as channel:
        stub = manager_pb2_grpc.ManagerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.RegisterNode(manager_pb2.RegisterNodeRequest(node_id=daemon.node_id), timeout=10)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        registered = stub.RegisterNode(
            manager_pb2.RegisterNodeRequest(node_id=NODES[1]), timeout=10
        )
    assert registered.node_id == NODES[1]

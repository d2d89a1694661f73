"""Run a real ``reconciler manager`` process for tests, and talk to it over gRPC.

The Manager runs as a child process with its settings file, state directory and log
under the test's tmp_path, on ports picked once (so it comes back on the same address
after ``kill`` or ``terminate`` and ``start``: daemons find it again). Its store is
SQLite in the state directory, or PostgreSQL when ``postgres_dsn`` is given (wrap the
session's DSN in ``tests.support.postgres.isolated_schema`` for fresh tables). With
``tls`` (a ``DevPki``) it serves mutual TLS, and the helpers below dial it as the
operator.

``Fleet`` holds the Managers and daemons (``tests.support.daemon.DaemonProcess``,
linked to a Manager with fast heartbeats) of one test and ends them all, agents
included. ``cli`` runs the real ``reconciler`` command against a Manager.

What it does not do: decide anything, or wait for convergence (tests poll with
``tests.support.daemon.wait_for``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.api.agent.v1 import agent_pb2, node_pb2
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.pki import DevPki
from tests.support.daemon import DaemonProcess, free_port, wait_for

__all__ = [
    "Fleet",
    "ManagerProcess",
    "TlsDaemon",
    "UnixSocketDaemon",
    "agent_set_yaml",
    "cli",
    "operator_tls_flags",
    "pki_credentials",
    "sleeper",
]


def operator_tls_flags(pki: DevPki | None) -> list[str]:
    """The CLI's --tls-* flags for the operator certificate of ``pki`` ([] without)."""
    if pki is None:
        return []
    assert pki.operator is not None
    cert, key = pki.operator
    return ["--tls-ca", str(pki.ca_cert), "--tls-cert", str(cert), "--tls-key", str(key)]


def cli(
    *args: str, manager: str, pki: DevPki | None = None, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``reconciler ARGS --manager ADDR`` as a real process; its completed result."""
    argv = [sys.executable, "-m", "reconciler", *args, "--manager", manager]
    return subprocess.run(
        [*argv, *operator_tls_flags(pki)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "RECONCILER_MANAGER"},
    )


@dataclass
class ManagerProcess:
    """One Manager child process and its files."""

    root: Path
    postgres_dsn: str = ""
    tls: DevPki | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """Extra settings merged over the defaults, section by section."""
    proc: subprocess.Popen[bytes] | None = None
    grpc_port: int = 0
    metrics_port: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        self.metrics_port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def config_path(self) -> Path:
        return self.root / "manager.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "manager.log"

    def write_config(self) -> None:
        base: dict[str, Any] = {
            "state_dir": str(self.root / "state"),
            "grpc": {"listen": self.address},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "logging": {"level": "info"},
        }
        if self.postgres_dsn:
            base["store"] = {"backend": "postgres", "postgres_dsn": self.postgres_dsn}
        if self.tls is not None:
            base["tls"] = {
                "mode": "mtls",
                "ca_file": str(self.tls.ca_cert),
                "cert_file": str(self.tls.manager_cert),
                "key_file": str(self.tls.manager_key),
            }
        for section, values in self.settings.items():
            if isinstance(values, dict):
                base.setdefault(section, {}).update(values)
            else:
                base[section] = values
        self.config_path.write_text(yaml.safe_dump(base))

    def start(self, *, timeout_s: float = 30.0) -> None:
        self.write_config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "manager", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")},
            )
        wait_for(self._serving, timeout_s=timeout_s, what="the manager to serve")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"manager exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            with self.channel() as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def kill(self) -> None:
        """SIGKILL the Manager."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> int:
        """SIGTERM the Manager and wait for it to end; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-5000:]

    # -- FleetService ---------------------------------------------------------------

    def channel(self, via: str = "") -> grpc.Channel:
        """A channel to the Manager, or to ``via`` (a proxy in front of it)."""
        address = via or self.address
        if self.tls is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, pki_credentials(self.tls, "operator"))

    @contextmanager
    def fleet(self, via: str = "") -> Iterator[fleet_pb2_grpc.FleetServiceStub]:
        with self.channel(via) as channel:
            yield fleet_pb2_grpc.FleetServiceStub(channel)

    def nodes(self) -> dict[str, node_pb2.NodeInfo]:
        """node id -> NodeInfo, as the Manager shows them."""
        with self.fleet() as fleet:
            answer = fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        return {node.node_id: node for node in answer.nodes}

    def agents(self, node_id: str = "") -> list[agent_pb2.AgentState]:
        """The agents the Manager shows (of one node, or of all)."""
        with self.fleet() as fleet:
            answer = fleet.ListAgents(fleet_pb2.ListAgentsRequest(node_id=node_id), timeout=10)
        return list(answer.agents)

    def operate(
        self,
        node_id: str,
        agent_id: str,
        operation: agent_pb2.Operation.ValueType,
        *,
        operation_id: str = "",
        timeout_s: float = 10.0,
        via: str = "",
    ) -> agent_pb2.AgentOperationResponse:
        request = fleet_pb2.OperateAgentRequest(
            node_id=node_id,
            request=agent_pb2.AgentOperationRequest(
                agent_id=agent_id, operation=operation, operation_id=operation_id
            ),
        )
        with self.fleet(via) as fleet:
            answer: agent_pb2.AgentOperationResponse = fleet.OperateAgent(
                request, timeout=timeout_s
            )
        return answer

    def wait_ready_nodes(self, node_ids: set[str], *, timeout_s: float = 30.0) -> float:
        """Wait until every node in ``node_ids`` is Ready; the seconds it took."""
        started = time.monotonic()

        def ready() -> bool:
            try:
                nodes = self.nodes()
            except grpc.RpcError:
                return False
            return all(
                node_id in nodes and nodes[node_id].status == node_pb2.NODE_STATUS_READY
                for node_id in node_ids
            )

        wait_for(ready, timeout_s=timeout_s, interval_s=0.1, what=f"nodes {sorted(node_ids)}")
        return time.monotonic() - started


# ---------------------------------------------------------------------------- fleets


def agent_set_yaml(
    name: str,
    *,
    agents: list[dict[str, Any]],
    match_labels: dict[str, str] | None = None,
    node_ids: list[str] | None = None,
) -> str:
    """An AgentSet file as an operator writes it."""
    selector: dict[str, Any] = {}
    if match_labels:
        selector["matchLabels"] = match_labels
    if node_ids:
        selector["nodeIds"] = node_ids
    document = {
        "apiVersion": "reconciler/v1",
        "kind": "AgentSet",
        "metadata": {"name": name},
        "spec": {"nodeSelector": selector, "agents": agents},
    }
    return yaml.safe_dump(document, sort_keys=False)


def sleeper(agent_id: str, seconds: str = "3600") -> dict[str, Any]:
    """An agent judged by its process alone: ``/bin/sleep SECONDS``."""
    return {
        "id": agent_id,
        "command": ["/bin/sleep", seconds],
        "stopGracePeriodSeconds": 2,
    }


class UnixSocketDaemon(DaemonProcess):
    """A daemon serving DaemonService on a Unix socket only: it registers no address
    with the Manager, so nothing can push to it and it converges by pulling alone."""

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "daemon.sock"

    def write_config(self) -> None:
        self.settings["grpc"] = {"listen": "", "unix_socket": str(self.socket)}
        super().write_config()


def pki_credentials(
    pki: DevPki, holder: str | None, *, trust: DevPki | None = None
) -> grpc.ChannelCredentials:
    """Client credentials trusting ``trust`` (default ``pki``)'s CA and presenting the
    certificate of ``holder`` ("operator", "manager" or a node id) from ``pki``, or
    none when ``holder`` is None."""
    pairs = {"manager": (pki.manager_cert, pki.manager_key), **pki.node_certs}
    if pki.operator is not None:
        pairs["operator"] = pki.operator
    root = (trust or pki).ca_cert.read_bytes()
    if holder is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert, key = pairs[holder]
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


@dataclass
class TlsDaemon(DaemonProcess):
    """A daemon with mutual TLS on, its node certificate from ``pki`` (named by its
    node id); the test talks to it as the operator."""

    pki: DevPki | None = None

    def write_config(self) -> None:
        assert self.pki is not None
        cert, key = self.pki.node_certs[self.node_id]
        self.settings["tls"] = {
            "mode": "mtls",
            "ca_file": str(self.pki.ca_cert),
            "cert_file": str(cert),
            "key_file": str(key),
        }
        super().write_config()

    def channel(self) -> grpc.Channel:
        assert self.pki is not None
        return grpc.secure_channel(self.address, pki_credentials(self.pki, "operator"))

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            with self.channel() as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Fleet:
    """Managers and daemons of one test, each under ``root``; ``close`` ends them all
    (and every agent the daemons started)."""

    root: Path
    managers: list[ManagerProcess] = field(default_factory=list)
    daemons: list[DaemonProcess] = field(default_factory=list)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def manager(self, **options: Any) -> ManagerProcess:
        manager = ManagerProcess(self.root / f"manager-{len(self.managers)}", **options)
        self.managers.append(manager)
        manager.start()
        return manager

    def daemon(
        self,
        name: str,
        *,
        manager_address: str,
        labels: dict[str, str] | None = None,
        node_id: str = "",
        link: dict[str, Any] | None = None,
        start: bool = True,
        kind: type[DaemonProcess] = DaemonProcess,
        pki: DevPki | None = None,
        **settings: Any,
    ) -> DaemonProcess:
        """A daemon linked to ``manager_address``; ``link`` overrides its ``manager``
        settings (fast by default: 1 s heartbeats and reports, 2 s call deadline)."""
        link_settings = {
            "address": manager_address,
            "heartbeat_interval_s": 1.0,
            "report_interval_s": 1.0,
            "call_timeout_s": 2.0,
            **(link or {}),
        }
        daemon = kind(
            self.root / name,
            node_id=node_id or f"{name}-{self.token}",
            settings={"node": {"labels": labels or {}}, "manager": link_settings, **settings},
        )
        if pki is not None:
            assert isinstance(daemon, TlsDaemon), "pki needs kind=TlsDaemon"
            daemon.pki = pki
        self.daemons.append(daemon)
        if start:
            daemon.start()
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()
        for manager in self.managers:
            manager.close()

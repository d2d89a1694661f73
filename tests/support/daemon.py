"""Run a real ``reconciler daemon`` process for tests, and talk to it over gRPC.

The daemon runs as a child process with its own state directory and sockets under the
test's tmp_path, so a test can SIGKILL it and start it again. Every agent it starts
carries ``RECONCILER_NODE_ID``; ``kill_node_processes`` finds them by it, so nothing
outlives the test even when the daemon was killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc

ALLOWED = ["/bin/*", "/usr/bin/*", "/usr/local/bin/*", f"{Path(sys.executable).parent}/*"]
#: ``ALLOWED`` plus the directory the test interpreter resolves to (a venv's python is
#: a link), for agents that run this Python.
ALLOWED_WITH_PYTHON = [*ALLOWED, f"{Path(sys.executable).resolve().parent}/*"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.02,
    what: str = "",
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}: {last!r}")


def spec(
    agent_id: str,
    command: Iterable[str] = ("/bin/sleep", "3600"),
    **fields: Any,
) -> agent_pb2.AgentSpec:
    message = agent_pb2.AgentSpec(
        id=agent_id,
        command=list(command),
        state=agent_pb2.DESIRED_STATE_RUNNING,
        restart_policy=agent_pb2.RESTART_POLICY_ALWAYS,
        stop_grace_period_seconds=fields.pop("grace", 5.0),
    )
    heartbeat = fields.pop("heartbeat", None)
    if heartbeat is not None:
        message.heartbeat.interval_seconds, message.heartbeat.timeout_seconds = heartbeat
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(message, name).update(value)
        else:
            setattr(message, name, value)
    return message


@dataclass
class DaemonProcess:
    """One daemon child process and its files."""

    root: Path
    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    settings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the daemon process (e.g. ``RECONCILER_FAILPOINTS``)."""
    proc: subprocess.Popen[bytes] | None = None
    grpc_port: int = 0
    http_port: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        self.http_port = free_port()

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "heartbeat.sock"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def config_path(self) -> Path:
        return self.root / "daemon.yaml"

    def write_config(self) -> None:
        base: dict[str, Any] = {
            "node": {"id": self.node_id},
            "state_dir": str(self.state_dir),
            "grpc": {"listen": self.address},
            "heartbeat": {
                "socket_path": str(self.socket_path),
                "http_listen": f"127.0.0.1:{self.http_port}",
            },
            "agents": {"allowed_commands": ALLOWED},
            "monitor": {"interval_s": 1.0},
            "metrics": {"listen": "127.0.0.1:0"},
            "logging": {"level": "info"},
        }
        for section, values in self.settings.items():
            if isinstance(values, dict):
                base.setdefault(section, {}).update(values)
            else:
                base[section] = values
        self.config_path.write_text(yaml.safe_dump(base))

    def start(self, *, timeout_s: float = 30.0) -> None:
        self.write_config()
        log = (self.root / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "daemon", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        log.close()
        wait_for(self._serving, timeout_s=timeout_s, what=f"daemon {self.node_id} to serve")

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        """SIGKILL the daemon (its agents live on)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wait_exit(self, *, timeout_s: float = 30.0) -> int:
        """Wait for the daemon to end on its own (e.g. at a failpoint); its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def log_text(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self, channel: grpc.Channel) -> daemon_pb2_grpc.DaemonServiceStub:
        return daemon_pb2_grpc.DaemonServiceStub(channel)

    def sync(self, generation: int, agents: Iterable[agent_pb2.AgentSpec]) -> Any:
        with self.channel() as channel:
            request = daemon_pb2.SyncAgentStatesRequest(
                node_id=self.node_id, generation=generation, agents=list(agents)
            )
            return self.stub(channel).SyncAgentStates(request, timeout=30)

    def agents(self) -> dict[str, agent_pb2.AgentInfo]:
        with self.channel() as channel:
            answer = self.stub(channel).ListAgents(daemon_pb2.ListAgentsRequest(), timeout=10)
        return {state.info.agent_id: state.info for state in answer.agents}

    def list(self) -> daemon_pb2.ListAgentsResponse:
        with self.channel() as channel:
            return self.stub(channel).ListAgents(daemon_pb2.ListAgentsRequest(), timeout=10)

    def running(self) -> dict[str, int]:
        """agent id -> pid of agents in phase Running."""
        return {
            agent_id: info.pid
            for agent_id, info in self.agents().items()
            if info.phase == agent_pb2.AGENT_PHASE_RUNNING
        }

    def operate(self, agent_id: str, operation: int, operation_id: str = "") -> Any:
        with self.channel() as channel:
            request = agent_pb2.AgentOperationRequest(
                agent_id=agent_id, operation=operation, operation_id=operation_id
            )
            return self.stub(channel).OperateAgent(request, timeout=10)

    def node_processes(self) -> list[psutil.Process]:
        """Every live process started for this node (found by its environment)."""
        return node_processes(self.node_id)

    def close(self) -> None:
        self.kill()
        kill_node_processes(self.node_id)


def node_processes(node_id: str) -> list[psutil.Process]:
    marker = f"RECONCILER_NODE_ID={node_id}".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as env:
                mine = marker in env.read().split(b"\0")
            if mine and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def kill_node_processes(node_id: str) -> None:
    for proc in node_processes(node_id):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()

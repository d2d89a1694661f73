"""A real ``reconciler daemon`` process for benchmarks, in its own temp dir.

What: ``Daemon`` writes a configuration (default settings except for the paths, the
loopback ports, an allow-list of /bin and /usr/bin, and ``stop_agents_on_exit``), runs
``python -m reconciler daemon`` as a child, and talks to it: SyncAgentStates and
ListAgents over one gRPC channel connected once it serves (as the Manager keeps one per
daemon), ``GET /stats`` over its HTTP heartbeat port. ``close`` stops it
with SIGTERM (which stops its agents), then SIGKILLs anything left carrying its node
id, so nothing outlives a benchmark.

What not: no measuring (``bench.agents``, ``bench.heartbeats``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import kill_marked
from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc

__all__ = ["MARKER", "Daemon", "sleep_spec"]

MARKER = "RECONCILER_AGENT_ID"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sleep_spec(agent_id: str, argv: Sequence[str]) -> agent_pb2.AgentSpec:
    """A running, always-restarted agent with no heartbeat section."""
    return agent_pb2.AgentSpec(
        id=agent_id,
        command=list(argv),
        state=agent_pb2.DESIRED_STATE_RUNNING,
        restart_policy=agent_pb2.RESTART_POLICY_ALWAYS,
        stop_grace_period_seconds=5.0,
    )


class Daemon:
    """One daemon child process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.grpc_port = _free_port()
        self.http_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self._channel: grpc.Channel | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "heartbeat.sock"

    def _config(self) -> dict[str, Any]:
        return {
            "node": {"id": self.node_id},
            "state_dir": str(self.root / "state"),
            "grpc": {"listen": self.address},
            "heartbeat": {
                "socket_path": str(self.socket_path),
                "http_listen": f"127.0.0.1:{self.http_port}",
            },
            "agents": {
                "allowed_commands": ["/bin/*", "/usr/bin/*"],
                "stop_agents_on_exit": True,
            },
            "logging": {"level": "warning"},
        }

    def start(self, *, timeout_s: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "daemon.yaml"
        config.write_text(yaml.safe_dump(self._config()))
        out = (self.root / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "daemon", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self._tail()}")
            if self._serving():
                # One connected channel for every later call, as the Manager keeps one
                # per daemon: a timed call then costs the daemon's work, not a handshake.
                self._channel = grpc.insecure_channel(self.address)
                grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
                return
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not serve within {timeout_s}s: {self._tail()}")

    def _serving(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def sync(self, agents: Sequence[agent_pb2.AgentSpec]) -> None:
        """Send the next generation of the desired state."""
        self.generation += 1
        request = daemon_pb2.SyncAgentStatesRequest(
            node_id=self.node_id, generation=self.generation, agents=list(agents)
        )
        daemon_pb2_grpc.DaemonServiceStub(self._connected()).SyncAgentStates(request, timeout=60)

    def phases(self) -> dict[str, int]:
        """agent id -> phase (agent_pb2.AGENT_PHASE_*)."""
        answer = daemon_pb2_grpc.DaemonServiceStub(self._connected()).ListAgents(
            daemon_pb2.ListAgentsRequest(), timeout=30
        )
        return {state.info.agent_id: state.info.phase for state in answer.agents}

    def all_running(self) -> bool:
        return all(phase == agent_pb2.AGENT_PHASE_RUNNING for phase in self.phases().values())

    def heartbeat_stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/stats"
        with urllib.request.urlopen(url, timeout=10) as answer:
            stats: dict[str, Any] = json.loads(answer.read())
        return stats

    def _connected(self) -> grpc.Channel:
        if self._channel is None:
            raise RuntimeError("the daemon is not started")
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            kill_marked(f"RECONCILER_NODE_ID={self.node_id}")

    def _tail(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

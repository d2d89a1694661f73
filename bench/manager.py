"""The Manager under a simulated fleet: heartbeat latency, cost, headroom, fan-out.

What, with ``reconciler manager`` as a real child process and the simulated daemons in
another (``bench.manager_load``):

- fleet load, for SQLite and for PostgreSQL (a throwaway server started by
  ``tests.support.postgres``): 5,000 nodes register, heartbeat every 10 s and report
  their observed state every 30 s; heartbeat p99 seen by the nodes, and the Manager's
  CPU (utime + stime over the window) and RSS;
- headroom: heartbeats open-loop at rising rates until p99 reaches 50 ms, against the
  Manager (SQLite, its 5,000 nodes registered) and against a bare grpc.aio server that
  answers Heartbeat with a constant, with the same client;
- fan-out: 1,000 nodes registered with the address of one DaemonService in the load
  process; the time from ApplyAgentSet selecting them all until every node has
  answered the Manager's push.

What not: no daemon processes (the daemons are simulated), no TLS.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import CpuWindow, rss_bytes
from bench.report import Figure, Section, at_least_ratio, below
from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc

__all__ = ["Sizes", "run"]

P99_LIMIT_MS = 50.0
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sizes:
    nodes: int
    interval_s: float
    window_s: float
    rates: str
    step_s: float
    fanout_nodes: int
    postgres: bool


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(50, 1.0, 2.0, "100,200", 1.0, 20, postgres=False)
    rates = "250,500,750,1000,1250,1500,1750,2000,2500,3000,3500,4000"
    return Sizes(5000, 10.0, 20.0, rates, 4.0, 1000, postgres=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _manager(root: Path, store: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """A Manager process; yields (pid, address)."""
    root.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{_free_port()}"
    config = {
        "state_dir": str(root / "state"),
        "grpc": {"listen": address},
        "metrics": {"listen": ""},
        "store": store,
        "logging": {"level": "warning"},
    }
    (root / "manager.yaml").write_text(yaml.safe_dump(config))
    with (root / "manager.log").open("ab") as log:
        argv = [
            sys.executable,
            "-m",
            "reconciler",
            "manager",
            "--config",
            str(root / "manager.yaml"),
        ]
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        _wait_serving(proc, address, root / "manager.log")
        yield proc.pid, address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_serving(proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Manager exited: {log.read_text(errors='replace')[-2000:]}")
        with grpc.insecure_channel(address) as channel, contextlib.suppress(grpc.RpcError):
            request = health_pb2.HealthCheckRequest()
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.1)
    raise RuntimeError("the Manager did not serve within 60 s")


@contextlib.contextmanager
def _load(*args: str) -> Iterator[subprocess.Popen[str]]:
    argv = [sys.executable, "-m", "bench.manager_load", *args]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _line(stream: IO[str] | None) -> str:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError("the load process ended early")
    return line.strip()


def _fleet(pid: int, address: str, size: Sizes) -> dict[str, Any]:
    args = ["fleet", "--target", address, "--nodes", str(size.nodes)]
    args += ["--interval", str(size.interval_s), "--duration", str(size.window_s)]
    with _load(*args) as proc:
        if _line(proc.stdout) != "ready":
            raise RuntimeError("the simulated fleet did not register")
        time.sleep(size.interval_s)
        window = CpuWindow.start(pid)
        time.sleep(size.window_s)
        cpu = window.percent_of_core()
        rss = rss_bytes(pid)
        result: dict[str, Any] = json.loads(_line(proc.stdout))
    result.update(cpu_percent=cpu, rss_mib=rss / _MIB)
    return result


def _ladder(address: str, size: Sizes, *, register: bool) -> tuple[float, list[dict[str, Any]]]:
    """The highest rate that kept p99 under the limit, and every step."""
    args = ["ladder", "--target", address, "--nodes", str(size.nodes), "--rates", size.rates]
    args += ["--step", str(size.step_s), "--p99-limit-ms", str(P99_LIMIT_MS)]
    steps = []
    with _load(*args, *(["--register"] if register else [])) as proc:
        assert proc.stdout is not None
        steps = [json.loads(line) for line in proc.stdout]
    return max((s["rate"] for s in steps if _sustained(s)), default=0.0), steps


def _sustained(step: dict[str, Any]) -> bool:
    """No errors, p99 under the limit, and at least 95% of the offered rate achieved."""
    if step["errors"] or step["p99_ms"] >= P99_LIMIT_MS:
        return False
    return bool(step["achieved"] >= 0.95 * step["rate"])


def _bare_ladder(size: Sizes) -> tuple[float, list[dict[str, Any]]]:
    with _load("bare") as server:
        port = _line(server.stdout).split()[1]
        return _ladder(f"127.0.0.1:{port}", size, register=False)


def _fanout(address: str, size: Sizes) -> float:
    """Seconds from ApplyAgentSet until every simulated node acknowledged its push."""
    args = ["daemons", "--target", address, "--nodes", str(size.fanout_nodes), "--prefix", "fan"]
    with _load(*args) as proc:
        _line(proc.stdout)  # port
        if _line(proc.stdout) != "ready":
            raise RuntimeError("the simulated daemons did not register")
        message = fleet_pb2.AgentSet(api_version="reconciler/v1", kind="AgentSet")
        message.metadata.name = "bench-fanout"
        message.spec.node_selector.match_labels["bench"] = "fanout"
        message.spec.agents.add(
            id="shipper", command=["/bin/sleep", "3600"], version="1",
            state=agent_pb2.DESIRED_STATE_RUNNING, restart_policy=agent_pb2.RESTART_POLICY_ALWAYS,
        )  # fmt: skip
        with grpc.insecure_channel(address) as channel:
            started = time.monotonic()
            fleet_pb2_grpc.FleetServiceStub(channel).ApplyAgentSet(
                fleet_pb2.ApplyAgentSetRequest(agent_set=message), timeout=60
            )
        done = _line(proc.stdout)
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
    return float(done.split()[1]) - started


def _fleet_figures(name: str, result: dict[str, Any], size: Sizes) -> list[Figure]:
    n = f"{size.nodes:,} nodes"
    return [
        Figure(f"{n} ({name}): heartbeat p99", "ms", result["p99_ms"],
               target=below(P99_LIMIT_MS, "< 50 ms")),
        Figure(f"{n} ({name}): heartbeat p50", "ms", result["p50_ms"]),
        Figure(f"{n} ({name}): Manager CPU", "% of a core", result["cpu_percent"]),
        Figure(f"{n} ({name}): Manager RSS", "MiB", result["rss_mib"]),
    ]  # fmt: skip


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    from tests.support.postgres import ensure_bindir, start_server

    server = start_server(ensure_bindir())
    try:
        yield server.dsn
    finally:
        server.stop()


def _describe(result: dict[str, Any]) -> str:
    codes = ", ".join(f"{code} {n}" for code, n in result["error_codes"].items())
    return f"{result['count']} heartbeats in the window, {result['errors']} errors {codes}".strip()


def _steps(steps: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['rate']:.0f}/s → p99 {s['p99_ms']:.1f} ms" for s in steps)


def run(*, quick: bool = False) -> Section:
    size = sizes(quick)
    figures: list[Figure] = []
    details: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-manager-") as tmp:
        with _manager(Path(tmp) / "sqlite", {"backend": "sqlite"}) as (pid, address):
            fleet = _fleet(pid, address, size)
            figures += _fleet_figures("SQLite", fleet, size)
            details["SQLite fleet"] = _describe(fleet)
            ours, our_steps = _ladder(address, size, register=False)
            fanout_s = _fanout(address, size)
        theirs, their_steps = _bare_ladder(size)
        if size.postgres:
            with _postgres() as dsn:
                store = {"backend": "postgres", "postgres_dsn": dsn}
                with _manager(Path(tmp) / "postgres", store) as (pid, address):
                    fleet = _fleet(pid, address, size)
            figures += _fleet_figures("PostgreSQL", fleet, size)
            details["PostgreSQL fleet"] = _describe(fleet)
    figures.append(
        Figure("Highest heartbeat rate with p99 < 50 ms (vs bare grpc.aio)", "RPC/s", ours,
               theirs, at_least_ratio(0.5, "≥ 1/2 of bare grpc.aio"))
    )  # fmt: skip
    figures.append(
        Figure(f"AgentSet change → acknowledged by {size.fanout_nodes:,} nodes", "s", fanout_s)
    )
    details["Manager steps"] = _steps(our_steps)
    details["bare grpc.aio steps"] = _steps(their_steps)
    return Section(
        key="manager",
        title="Manager",
        issue="issue 5 (Manager)",
        comparison="bare grpc.aio (same run)",
        method=(
            "`reconciler manager` with default settings except ports and store, in its own "
            "process. One load process (`bench/manager_load.py`, grpc.aio) simulates the "
            "daemons over 16 shared connections: each node registers, reports its observed "
            "state (2 agents) every third heartbeat and heartbeats every 10 s at its own "
            "random phase; latencies count over the window after one warm-up interval, "
            "and the Manager's CPU (utime+stime) and RSS over the same window. Headroom: "
            "the same client sends heartbeats open-loop at rising rates (4 s per step) to "
            "the Manager and to a bare grpc.aio server answering a constant; a rate counts "
            "when it ran without errors, with p99 under 50 ms and at least 95% of the "
            "offered rate achieved; one Python "
            "client on a 2-core machine, so the bare figure may be bounded by the client. "
            "Fan-out: nodes registered with the address of one DaemonService in the load "
            "process; from ApplyAgentSet until the last node answered SyncAgentStates."
        ),
        figures=figures,
        details=details,
    )

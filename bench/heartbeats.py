"""Heartbeat ingestion: Unix socket, HTTP, and the daemon's cost at 1 Hz per agent.

What, all in one run:

- Unix-socket ingest rate: ``bench.heartbeat_ingest.run()`` (the full receiver against
  a bare asyncio Protocol that only splits lines and decodes them);
- a real daemon with 1,000 ``/bin/sleep`` agents (20 with ``--quick``): its CPU while
  one sender process speaks for every agent over its own Unix-socket connection once a
  second (each line carries the agent's token, read from the agent's environment,
  since the sender is not in the agent's process tree), and the daemon's own count of
  accepted heartbeats to prove they were taken, not refused;
- HTTP ingestion: ``wrk`` posting heartbeats of those 1,000 agents with their bearer
  tokens to the daemon, then the same load against a bare aiohttp handler in its own
  process.

What not: the receivers' correctness (tests/integration), the Manager.
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
from typing import Any

from bench import heartbeat_ingest
from bench.daemon_run import MARKER, Daemon, sleep_spec
from bench.hb_load import AgentKey, WrkResult, wrk_available, wrk_post
from bench.procs import ChildWatcher, CpuWindow
from bench.report import Figure, Section, at_least_ratio, below

__all__ = ["Sizes", "run"]

WARMUP_S = 2.0


@dataclass(frozen=True, slots=True)
class Sizes:
    agents: int
    window_s: float
    ingest_connections: int
    ingest_lines: int
    ingest_rounds: int
    http_connections: int
    http_duration_s: float


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(20, 1.0, 50, 20, 1, 20, 1.0)
    return Sizes(1000, 10.0, 1000, 300, 2, 1000, 10.0)


def _agent_keys(watcher: ChildWatcher) -> list[AgentKey]:
    keys = []
    for pid, agent_id in sorted(watcher.children.items(), key=lambda item: item[1]):
        with open(f"/proc/{pid}/environ", "rb") as env:
            items = dict(item.split(b"=", 1) for item in env.read().split(b"\0") if b"=" in item)
        keys.append(AgentKey(agent_id, pid, items[b"RECONCILER_AGENT_TOKEN"].decode()))
    return keys


def _start_agents(daemon: Daemon, count: int) -> list[AgentKey]:
    watcher = ChildWatcher(daemon.pid, MARKER)
    daemon.sync([sleep_spec(f"agent-{i:04d}", ("/bin/sleep", "3600")) for i in range(count)])
    deadline = time.monotonic() + 300
    while len(watcher.children) < count or not daemon.all_running():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(watcher.children)} of {count} agents after 300 s")
        watcher.scan()
        time.sleep(0.1)
    return _agent_keys(watcher)


def _unix_accepted(daemon: Daemon) -> int:
    return int(daemon.heartbeat_stats()["transports"]["unix"]["accepted"])


def _socket_cpu(daemon: Daemon, keys: list[AgentKey], window_s: float) -> dict[str, Any]:
    """Daemon CPU while every agent heartbeats once a second over the socket."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump([_as_dict(key) for key in keys], file)
    before = _unix_accepted(daemon)
    argv = [sys.executable, "-m", "bench.hb_load", "sender", "--socket", str(daemon.socket_path)]
    argv += ["--agents", file.name, "--duration", str(WARMUP_S + window_s + 1.0)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the heartbeat sender did not connect")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(WARMUP_S)
        window = CpuWindow.start(daemon.pid)
        time.sleep(window_s)
        cpu = window.percent_of_core()
        summary: dict[str, Any] = json.loads(proc.stdout.readline())
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Path(file.name).unlink(missing_ok=True)
    summary["accepted"] = _unix_accepted(daemon) - before
    summary["cpu_percent"] = cpu
    return summary


def _as_dict(key: AgentKey) -> dict[str, object]:
    return {"agent_id": key.agent_id, "pid": key.pid, "token": key.token}


def _wait_port(port: int, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def _bare_http() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    argv = [sys.executable, "-m", "bench.hb_load", "bare-http", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _http(daemon: Daemon, keys: list[AgentKey], size: Sizes) -> tuple[WrkResult, WrkResult]:
    def load(port: int) -> WrkResult:
        url = f"http://127.0.0.1:{port}/heartbeat"
        return wrk_post(
            url, keys, connections=size.http_connections, duration_s=size.http_duration_s
        )

    ours = load(daemon.http_port)
    with _bare_http() as port:
        theirs = load(port)
    return ours, theirs


def _ingest_figure(size: Sizes) -> tuple[Figure, dict[str, str]]:
    result = heartbeat_ingest.run(
        connections=size.ingest_connections, lines=size.ingest_lines, rounds=size.ingest_rounds
    )
    figure = Figure(
        f"Unix-socket lines/s, {size.ingest_connections} connections (vs bare Protocol + orjson)",
        "lines/s",
        result["receiver_lines_per_s"],
        result["bare_lines_per_s"],
        at_least_ratio(0.25, "≥ 1/4 of the bare reader"),
    )
    detail = f"{size.ingest_lines} lines per connection, best of {size.ingest_rounds} rounds"
    return figure, {"Unix-socket ingest": detail}


def _http_figures(ours: WrkResult, theirs: WrkResult, size: Sizes) -> list[Figure]:
    n = size.agents
    return [
        Figure(f"HTTP heartbeats/s answered 202, {n} agents (vs bare aiohttp)", "req/s",
               ours.ok_per_s, theirs.ok_per_s, at_least_ratio(0.6, "≥ 60% of bare aiohttp")),
        Figure(f"HTTP p50 latency, {size.http_connections} connections (vs bare aiohttp)", "ms",
               ours.p50_ms, theirs.p50_ms),
        Figure(f"HTTP p99 latency, {size.http_connections} connections (vs bare aiohttp)", "ms",
               ours.p99_ms, theirs.p99_ms),
    ]  # fmt: skip


def run(*, quick: bool = False) -> Section:
    size = sizes(quick)
    ingest, details = _ingest_figure(size)
    figures = [ingest]
    with tempfile.TemporaryDirectory(prefix="bench-heartbeats-") as tmp:
        daemon = Daemon(Path(tmp) / "daemon")
        try:
            daemon.start()
            keys = _start_agents(daemon, size.agents)
            time.sleep(WARMUP_S)
            idle = CpuWindow.start(daemon.pid)
            time.sleep(size.window_s)
            idle_cpu = idle.percent_of_core()
            load = _socket_cpu(daemon, keys, size.window_s)
            figures.append(
                Figure(f"Daemon CPU, {size.agents} agents heartbeating at 1 Hz over the socket "
                       "(vs the same daemon without heartbeats)",
                       "% of a core", load["cpu_percent"], idle_cpu, below(10, "< 10% of a core"))
            )  # fmt: skip
            details["1 Hz sender"] = (
                f"{load['sent']} lines sent, {load['accepted']} accepted by the daemon, "
                f"{load['failed']} send failures, {load['answered']} connections answered or "
                f"closed by the daemon; CPU window {size.window_s:.0f} s after {WARMUP_S:.0f} s"
            )
            if wrk_available():
                ours, theirs = _http(daemon, keys, size)
                figures += _http_figures(ours, theirs, size)
                details["HTTP load"] = (
                    f"wrk, 1 thread, {size.http_connections} keep-alive connections, "
                    f"{size.http_duration_s:.0f} s each; daemon: {ours.requests} requests, "
                    f"{ours.non_2xx} not 202, {ours.socket_errors} socket errors; bare: "
                    f"{theirs.requests} requests, {theirs.non_2xx} not 202"
                )
            else:
                details["HTTP load"] = "not run: wrk is not installed (apt-get install wrk)"
        finally:
            daemon.close()
    return Section(
        key="heartbeats",
        title="Heartbeat ingestion",
        issue="issue 4 (heartbeats)",
        comparison="comparison (same run)",
        method=(
            "Unix-socket ingest: `bench/heartbeat_ingest.py` (the full receiver with "
            "validation, peer checks and a sink, against a bare asyncio Protocol that only "
            "splits lines and decodes them, over the same connections). Daemon CPU: a real "
            "daemon with `/bin/sleep` agents; one sender process holds a socket connection "
            "per agent and sends each agent's heartbeat (with its token) once a second, "
            "spread evenly; CPU is utime+stime of the daemon over the window, beside the "
            "same daemon idle just before. HTTP: `wrk` posts heartbeats of the same agents "
            "round-robin with their bearer tokens to the daemon, then the same script to a "
            "bare aiohttp handler (reads the body, answers 202) in its own process; only "
            "202 answers count."
        ),
        figures=figures,
        details=details,
    )

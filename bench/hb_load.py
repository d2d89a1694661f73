"""Load for the heartbeat benchmarks, each part run as its own process.

What:
- ``sender``: one process holding a Unix-socket connection per agent and sending each
  agent's heartbeat line (with the agent's token, read by the benchmark from the
  agent's environment) at a steady rate, spread evenly over the second; it prints a
  JSON summary (lines sent, connections the daemon answered or closed).
- ``bare-http``: the comparison for HTTP ingestion, a bare aiohttp handler that reads
  the body and answers 202, nothing else.
- ``wrk_post``: runs ``wrk`` against a ``/heartbeat`` URL with a Lua script that
  cycles through the agents (their ids, pids and bearer tokens), and returns requests
  per second of 2xx answers, the non-2xx count and latency percentiles.

What not: no daemon handling, no judging (``bench.heartbeats``).
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AgentKey", "WrkResult", "heartbeat_line", "main", "wrk_post"]


@dataclass(frozen=True, slots=True)
class AgentKey:
    """What a sender needs to speak for one agent."""

    agent_id: str
    pid: int
    token: str


def heartbeat_line(agent: AgentKey, seq: int, *, with_token: bool) -> bytes:
    body: dict[str, Any] = {
        "agent_id": agent.agent_id,
        "pid": agent.pid,
        "timestamp": time.time(),
        "version": "",
        "status": "healthy",
        "cpu": 0.5,
        "memory": 1_048_576,
        "seq": seq,
    }
    if with_token:
        body["token"] = agent.token
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _load_agents(path: str) -> list[AgentKey]:
    return [AgentKey(**item) for item in json.loads(Path(path).read_text())]


def sender(socket_path: str, agents_file: str, *, rate_hz: float, duration_s: float) -> None:
    """Connect one socket per agent, wait for 'go' on stdin, send at ``rate_hz`` each."""
    agents = _load_agents(agents_file)
    socks = []
    for _ in agents:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(socket_path)
        socks.append(sock)
    print("ready", flush=True)
    sys.stdin.readline()
    interval_s = 1.0 / (rate_hz * len(agents))
    started = time.monotonic()
    sent = failed = 0
    while (elapsed := time.monotonic() - started) < duration_s:
        due = int(elapsed / interval_s) + 1
        while sent < due:
            index = sent % len(agents)
            try:
                socks[index].sendall(heartbeat_line(agents[index], sent, with_token=True))
            except OSError:
                failed += 1
            sent += 1
        time.sleep(0.002)
    readable, _, _ = select.select(socks, [], [], 0.5)
    print(json.dumps({"sent": sent, "failed": failed, "answered": len(readable)}), flush=True)
    for sock in socks:
        sock.close()


def bare_http(port: int) -> None:
    """A bare aiohttp server: POST /heartbeat reads the body and answers 202."""
    from aiohttp import web

    async def heartbeat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202, body=b'{"accepted":true}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/heartbeat", heartbeat)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


_WRK_SCRIPT = """
local agents = {%(agents)s}
local n = #agents
local i = 0
request = function()
  i = i + 1
  local a = agents[(i %% n) + 1]
  local body = string.format(
    '{"agent_id":"%%s","pid":%%d,"timestamp":%%d.5,"version":"","status":"healthy",' ..
    '"cpu":0.5,"memory":1048576,"seq":%%d}', a[1], a[2], os.time(), i)
  return wrk.format("POST", "/heartbeat",
    {["Authorization"] = "Bearer " .. a[3], ["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRK {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    ok_per_s: float
    requests: int
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_post(
    url: str, agents: Sequence[AgentKey], *, connections: int, duration_s: float
) -> WrkResult:
    """POST heartbeats of ``agents`` round-robin to ``url`` with one wrk thread."""
    rows = ",".join(f'{{"{a.agent_id}",{a.pid},"{a.token}"}}' for a in agents)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % {"agents": rows})
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s",
             "-s", script.name, url],
            capture_output=True, text=True, timeout=duration_s + 60, check=True,
        )  # fmt: skip
    finally:
        Path(script.name).unlink(missing_ok=True)
    line = next(row for row in out.stdout.splitlines() if row.startswith("WRK "))
    data = json.loads(line[4:])
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        ok_per_s=(data["requests"] - data["status_errors"]) / seconds,
        requests=data["requests"],
        non_2xx=data["status_errors"],
        socket_errors=data["socket_errors"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hb_load")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("sender")
    send.add_argument("--socket", required=True)
    send.add_argument("--agents", required=True, help="JSON list of {agent_id, pid, token}")
    send.add_argument("--rate", type=float, default=1.0, help="heartbeats per agent per second")
    send.add_argument("--duration", type=float, required=True)
    http = commands.add_parser("bare-http")
    http.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "sender":
        sender(args.socket, args.agents, rate_hz=args.rate, duration_s=args.duration)
    else:
        bare_http(args.port)


if __name__ == "__main__":
    main()

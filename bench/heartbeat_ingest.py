"""Unix-socket heartbeat ingest: the full receiver against a bare line reader, one run.

What: starts a client process that opens ``connections`` Unix-socket connections (one
agent id each) and streams ``lines_per_connection`` heartbeat lines on each as fast as
the server takes them; the server side runs twice in this process on one event loop:

- ``bare``: an ``asyncio.Protocol`` that only splits lines and decodes them with
  ``orjson.loads`` (the ceiling DESIGN section 9 and the heartbeat issue name);
- ``receiver``: ``UnixHeartbeatReceiver`` with full validation, SO_PEERCRED process-tree
  checks against a directory, counting, and a sink that updates per-agent state the
  way the daemon's controller does (it keeps the latest heartbeat of each agent).

``run()`` returns lines/s of each and their ratio (the goal is a ratio >= 0.25).
Run it as ``python -m bench.heartbeat_ingest [--connections N] [--lines N]``.

What not: no HTTP (a separate benchmark), no controller work behind the sink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from reconciler.daemon.heartbeat import (
    AgentIdentity,
    FakeAgentDirectory,
    UnixHeartbeatReceiver,
    UnixReceiverConfig,
)
from reconciler.model.heartbeat import Heartbeat

__all__ = ["main", "run"]

_CHUNK_BYTES = 64 * 1024
_ROOT = Path(__file__).resolve().parent.parent


def heartbeat_line(agent_id: str, seq: int) -> bytes:
    body = {
        "agent_id": agent_id,
        "pid": 4242,
        "timestamp": 1_700_000_000.0 + seq,
        "version": "1.4.2",
        "status": "healthy",
        "cpu": 2.5,
        "memory": 52_428_800,
        "seq": seq,
    }
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def client(path: str, connections: int, lines: int) -> None:
    """The load: connect everything, wait for 'go' on stdin, stream round-robin."""
    socks = []
    payloads = []
    for i in range(connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        socks.append(sock)
        payloads.append(b"".join(heartbeat_line(f"agent-{i}", s) for s in range(lines)))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    offsets = [0] * connections
    pending = set(range(connections))
    while pending:
        for i in list(pending):
            chunk = payloads[i][offsets[i] : offsets[i] + _CHUNK_BYTES]
            socks[i].sendall(chunk)
            offsets[i] += len(chunk)
            if offsets[i] >= len(payloads[i]):
                pending.discard(i)
    sys.stdin.readline()  # keep the sockets open until the server has counted
    for sock in socks:
        sock.close()


class _Counter:
    def __init__(self, total: int) -> None:
        self.count = 0
        self.total = total
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def add(self, n: int) -> None:
        self.count += n
        if self.count >= self.total and not self.done.done():
            self.done.set_result(time.perf_counter())


class _BareProtocol(asyncio.Protocol):
    """Split lines and decode them: nothing else."""

    def __init__(self, counter: _Counter) -> None:
        self._counter = counter
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        decode = orjson.loads
        for line in lines:
            decode(line)
        self._counter.add(len(lines))


class _CountingSink:
    """Keeps each agent's latest heartbeat, as ``Controller.record`` does, and counts."""

    def __init__(self, counter: _Counter) -> None:
        self._counter = counter
        self.latest: dict[str, tuple[Heartbeat, float]] = {}

    def record(self, heartbeat: Heartbeat, *, received_at_s: float, transport: str) -> None:
        self.latest[heartbeat.agent_id] = (heartbeat, received_at_s)
        self._counter.add(1)


async def _measure(
    path: Path, *, connections: int, lines: int, serve: Callable[[_Counter, int], Any]
) -> float:
    """Lines per second for one server set up by ``serve(counter, client_pid)``."""
    counter = _Counter(connections * lines)
    argv = [sys.executable, "-m", "bench.heartbeat_ingest", "--client", str(path)]
    argv += ["--connections", str(connections), "--lines", str(lines)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_ROOT)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        stop = await serve(counter, proc.pid)
        ready = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        assert ready == b"ready\n", ready
        started = time.perf_counter()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        finished = await asyncio.wait_for(counter.done, timeout=300)
        proc.stdin.write(b"bye\n")
        proc.stdin.flush()
        await stop()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return counter.total / (finished - started)


def _bare_server(path: Path) -> Callable[[_Counter, int], Any]:
    async def serve(counter: _Counter, client_pid: int) -> Callable[[], Any]:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(
            lambda: _BareProtocol(counter), str(path), backlog=4096
        )

        async def stop() -> None:
            server.close()
            await server.wait_closed()
            path.unlink(missing_ok=True)

        return stop

    return serve


def _receiver_server(path: Path, connections: int) -> Callable[[_Counter, int], Any]:
    async def serve(counter: _Counter, client_pid: int) -> Callable[[], Any]:
        directory = FakeAgentDirectory(
            {f"agent-{i}": AgentIdentity(client_pid, f"token-{i}") for i in range(connections)}
        )
        config = UnixReceiverConfig(socket_path=path, backlog=4096)
        receiver = UnixHeartbeatReceiver(config, directory=directory, sink=_CountingSink(counter))
        await receiver.start()
        return receiver.stop

    return serve


async def _run(connections: int, lines: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hb-bench-") as tmp:
        path = Path(tmp) / "sock" / "hb.sock"
        path.parent.mkdir(mode=0o700)
        bare: list[float] = []
        full: list[float] = []
        for _ in range(rounds):
            kwargs = {"connections": connections, "lines": lines}
            bare.append(await _measure(path, serve=_bare_server(path), **kwargs))
            full.append(await _measure(path, serve=_receiver_server(path, connections), **kwargs))
    return {
        "connections": connections,
        "lines_per_connection": lines,
        "bare_lines_per_s": max(bare),
        "receiver_lines_per_s": max(full),
        "ratio": max(full) / max(bare),
    }


def run(*, connections: int = 1000, lines: int = 300, rounds: int = 2) -> dict[str, Any]:
    """Measure both servers in this run; the best of ``rounds`` each."""
    return asyncio.run(_run(connections, lines, rounds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--lines", type=int, default=300, help="lines per connection")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client(args.client, args.connections, args.lines)
        return
    result = run(connections=args.connections, lines=args.lines, rounds=args.rounds)
    print(f"bare Protocol + orjson  : {result['bare_lines_per_s']:>10,.0f} lines/s")
    print(f"UnixHeartbeatReceiver   : {result['receiver_lines_per_s']:>10,.0f} lines/s")
    print(f"ratio                   : {result['ratio']:.2f}")


if __name__ == "__main__":
    main()

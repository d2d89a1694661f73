"""Hostile heartbeats against a real daemon while good agents keep heartbeating.

One hundred agents heartbeat once a second over the Unix socket (one sender thread
holding a connection per agent, each line carrying that agent's token, as the daemon
handed it over in RECONCILER_AGENT_TOKEN). Meanwhile 10,000 malformed heartbeats arrive
over the socket and HTTP: random bytes, truncated JSON, wrong types, NaN, duplicate
keys, 100,000-deep nesting, 5,000-digit numbers, invalid UTF-8, a 100 MiB line with no
newline, a 10 MiB HTTP body, a lying Content-Length. The daemon must stay up with
bounded memory, answer each bad one as the wire contract says and count it, lose no
good heartbeat, and leave the desired state alone.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import DaemonProcess, spec, wait_for

pytestmark = pytest.mark.slow

AGENTS = 100
BAD = 10_000


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "daemon")
    process.start()
    yield process
    process.close()


def token_of(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"RECONCILER_AGENT_TOKEN="):
            return entry.split(b"=", 1)[1].decode()
    raise AssertionError(f"no token in the environment of {pid}")


class GoodSenders(threading.Thread):
    """Heartbeats for every agent once a second until stopped; counts what it sent."""

    def __init__(self, socket_path: Path, agents: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.sent = 0
        self.failures: list[str] = []
        self._path = socket_path
        self._agents = {agent: (pid, token_of(pid)) for agent, pid in agents.items()}

    def run(self) -> None:
        connections = {}
        for agent in self._agents:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(self._path))
            connections[agent] = conn
        seq = 0
        while not self.stop.is_set():
            started = time.monotonic()
            for agent, (pid, token) in self._agents.items():
                line = {
                    "agent_id": agent,
                    "pid": pid,
                    "timestamp": time.time(),
                    "version": "1",
                    "status": "healthy",
                    "cpu": 0.1,
                    "memory": 1024,
                    "seq": seq,
                    "token": token,
                }
                try:
                    connections[agent].sendall(json.dumps(line).encode() + b"\n")
                    self.sent += 1
                except OSError as error:
                    self.failures.append(f"{agent}: {error}")
            seq += 1
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))
        for conn in connections.values():
            conn.close()


def bad_lines(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """(kind, one malformed line) forever, cycling through the kinds."""
    good = {
        "agent_id": "a000",
        "pid": 1,
        "timestamp": 1.0,
        "version": "1",
        "status": "healthy",
        "cpu": 0.0,
        "memory": 0,
    }
    text = json.dumps(good)
    kinds = [
        ("random", lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))),
        ("truncated", lambda: text[: rng.randint(1, len(text) - 1)].encode()),
        ("wrong-type", lambda: json.dumps({**good, "pid": "one"}).encode()),
        ("nan", lambda: text.replace('"cpu": 0.0', '"cpu": NaN').encode()),
        ("duplicate-key", lambda: text.replace("{", '{"pid": 2, ', 1).encode()),
        ("deep", lambda: b"[" * 100_000 + b"]" * 100_000),
        ("long-number", lambda: text.replace('"memory": 0', '"memory": ' + "9" * 5000).encode()),
        ("invalid-utf8", lambda: text.replace('"1"', '"\xff\xfe"').encode("latin-1")),
        ("unknown-agent", lambda: json.dumps({**good, "agent_id": "nobody"}).encode()),
    ]
    while True:
        for kind, make in kinds:
            line = make().replace(b"\n", b" ")
            yield kind, line + b"\n"


def send_bad_line(path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(line)
        try:
            return conn.recv(4096)
        except ConnectionResetError:
            return b""


def test_a_flood_of_hostile_heartbeats_changes_nothing_and_loses_no_good_one(
    daemon: DaemonProcess,
) -> None:
    agents = [spec(f"a{i:03d}", heartbeat=(1.0, 10.0)) for i in range(AGENTS)]
    daemon.sync(1, agents)

    def spawned() -> dict[str, int] | None:
        found = {agent: info.pid for agent, info in daemon.agents().items() if info.pid}
        return found if len(found) == AGENTS else None

    pids = wait_for(spawned, timeout_s=60, what="every agent's process")
    server = psutil.Process(daemon.proc.pid if daemon.proc else 0)
    senders = GoodSenders(daemon.socket_path, pids)
    senders.start()
    wait_for(lambda: len(daemon.running()) == AGENTS, what="every agent Running")
    rss_before = server.memory_info().rss

    answers: Counter[str] = Counter()
    rng = random.Random(7)
    lines = bad_lines(rng)
    http_bad = 0
    for n in range(BAD):
        if n % 10 == 0:
            answers[http_answer(daemon.http_port, n)] += 1
            http_bad += 1
            continue
        kind, line = next(lines)
        reply = send_bad_line(daemon.socket_path, line)
        assert reply.startswith(b'{"error":'), (kind, reply[:200])
        answers[json.loads(reply.splitlines()[0])["error"]] += 1
    assert giant_line(daemon.socket_path) == "too_large"
    assert huge_body(daemon.http_port) == 413
    assert lying_length(daemon.http_port) in (400, 401)

    time.sleep(2.5)  # two more good rounds after the flood
    senders.stop.set()
    senders.join(timeout=10)

    assert server.is_running()
    assert not senders.failures
    stats = http_stats(daemon.http_port)
    unix = stats["transports"]["unix"]
    assert unix["accepted"] == senders.sent, "every good heartbeat was accepted"
    rejected_unix = sum(unix["rejected"].values())
    assert rejected_unix == BAD - http_bad + 1
    assert sum(stats["rejected"].values()) >= http_bad + 1, stats["rejected"]
    assert set(answers) == {"bad_json", "bad_field", "too_large", "unknown_agent"} | {
        "http-400",
        "http-401",
    }
    assert server.memory_info().rss < rss_before * 1.5 + 32 * 2**20
    listed = daemon.list()
    assert listed.current_generation == 1
    infos = daemon.agents()
    assert all(i.restart_count == 0 for i in infos.values()), "no good agent was restarted"
    assert {a: i.pid for a, i in infos.items()} == pids


def http_answer(port: int, n: int) -> str:
    bodies = [
        (b"{", "application/json", "Bearer x"),
        (b'{"agent_id": 5}', "application/json", "Bearer x"),
        (json.dumps({"agent_id": "a000"}).encode(), "application/json", ""),
    ]
    body, kind, auth = bodies[n % len(bodies)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": kind}
    if auth:
        headers["Authorization"] = auth
    conn.request("POST", "/heartbeat", body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    assert status in (400, 401), status
    return f"http-{status}"


def giant_line(path: Path) -> str:
    """100 MiB with no newline: the daemon must answer too_large and close early."""
    chunk = b"x" * 2**20
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        sent = 0
        try:
            for _ in range(100):
                conn.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = conn.recv(4096)
    assert sent < 100 * 2**20, "the daemon read a 100 MiB line to its end"
    return str(json.loads(reply.splitlines()[0])["error"])


def huge_body(port: int) -> int:
    """A 10 MiB body is refused without being read whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        size = 10 * 2**20
        head = (
            f"POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer x\r\nContent-Length: {size}\r\n\r\n"
        ).encode()
        conn.sendall(head)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(b"{" * 2**20)
        reply = conn.recv(4096)
    return int(reply.split()[1])


def lying_length(port: int) -> int:
    """A Content-Length shorter than the body: the declared bytes are judged alone."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        body = json.dumps({"agent_id": "a000", "pid": 1}).encode()
        conn.sendall(
            b"POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer x\r\nContent-Length: 2\r\n\r\n" + body
        )
        reply = conn.recv(4096)
    return int(reply.split()[1]) if reply else 0


def http_stats(port: int) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/stats")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return dict(body)

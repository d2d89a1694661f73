"""The Unix-socket heartbeat receiver on a real socket, with real client processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.daemon.heartbeat import (
    AgentIdentity,
    FakeAgentDirectory,
    HeartbeatStats,
    RecordingSink,
    RejectReason,
    SocketPathError,
    Transport,
    UnixHeartbeatReceiver,
    UnixReceiverConfig,
)
from reconciler.daemon.heartbeat.identity import MAX_TREE_DEPTH, is_same_or_descendant

DEADLINE_S = 20.0

# A client process: waits for "go" on stdin, then (itself, or a child it starts) connects,
# sends one heartbeat naming the given agent id with its own pid, and prints the reply.
CLIENT = r"""
import json, os, socket, subprocess, sys
path, agent_id, token, mode = sys.argv[1:5]
sys.stdin.readline()
if mode == "grandchild":
    argv = [sys.executable, "-c", sys.argv[5], path, agent_id, token, "self", sys.argv[5]]
    out = subprocess.run(argv, input=b"go\n", capture_output=True, timeout=30)
    sys.stdout.write(out.stdout.decode()); sys.exit(out.returncode)
body = {"agent_id": agent_id, "pid": os.getpid(), "timestamp": 1.0, "version": "1",
        "status": "healthy", "cpu": 0.0, "memory": 1, "seq": 0}
if token:
    body["token"] = token
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(path)
s.sendall(json.dumps(body).encode() + b"\n")
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
sys.stdout.write(reply.decode() or "OK")
"""


async def wait_until(condition: Callable[[], bool], *, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def heartbeat_line(agent_id: str, *, seq: int = 0, token: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "agent_id": agent_id,
        "pid": os.getpid(),
        "timestamp": 1_700_000_000.0,
        "version": "1.0",
        "status": "healthy",
        "cpu": 1.0,
        "memory": 1024,
        "seq": seq,
        **extra,
    }
    if token is not None:
        body["token"] = token
    return json.dumps(body).encode() + b"\n"


class Harness:
    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.path = tmp_path / "run" / "hb.sock"
        self.directory = FakeAgentDirectory()
        self.sink = RecordingSink()
        self.stats = HeartbeatStats()
        self.config = UnixReceiverConfig(socket_path=self.path, **config)
        self.receiver = self.new_receiver()

    def new_receiver(self) -> UnixHeartbeatReceiver:
        return UnixHeartbeatReceiver(
            self.config, directory=self.directory, sink=self.sink, stats=self.stats
        )

    def rejected(self, reason: RejectReason) -> int:
        return self.stats.snapshot().get(Transport.UNIX).rejected.get(reason, 0)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.path)

    async def send_and_read_reply(self, data: bytes) -> dict[str, Any]:
        reader, writer = await self.connect()
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(DEADLINE_S):
            reply = await reader.readline()
            rest = await reader.read()
        writer.close()
        assert rest == b"", "the connection must be closed after an error line"
        return dict(json.loads(reply))

    async def run_client(self, agent_id: str, *, token: str = "", mode: str = "self") -> str:
        """Start a client process, register it as ``agent_id`` when asked, let it send."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(self.path), agent_id, token, mode, CLIENT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.last_pid = proc.pid
        if self.register_next is not None:
            self.directory.agents[self.register_next] = AgentIdentity(proc.pid, "agent-token")
        async with asyncio.timeout(DEADLINE_S):
            out, _ = await proc.communicate(b"go\n")
        assert proc.returncode == 0
        return out.decode()

    register_next: str | None = None


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    await h.receiver.start()
    yield h
    await h.receiver.stop()


@pytest.fixture
async def victim() -> AsyncIterator[int]:
    """A running process that stands for an agent nobody else may speak for."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=-1
    )
    yield proc.pid
    assert proc.stdin is not None
    proc.stdin.close()
    await proc.wait()


# -- identity --------------------------------------------------------------------------


async def test_an_agent_process_heartbeats_and_the_sink_gets_it_with_its_receipt_time(
    harness: Harness,
) -> None:
    harness.register_next = "worker"
    before = harness.receiver.clock.monotonic()
    assert await harness.run_client("worker") == "OK"
    await wait_until(lambda: len(harness.sink.records) == 1, what="the heartbeat")
    record = harness.sink.records[0]
    assert record.heartbeat.agent_id == "worker"
    assert record.heartbeat.pid == harness.last_pid
    assert record.transport == "unix"
    assert before <= record.received_at_s <= harness.receiver.clock.monotonic()


async def test_a_descendant_of_the_agent_process_may_heartbeat_for_it(harness: Harness) -> None:
    harness.register_next = "shim"
    assert await harness.run_client("shim", mode="grandchild") == "OK"
    await wait_until(lambda: len(harness.sink.for_agent("shim")) == 1, what="the heartbeat")
    assert harness.sink.records[0].heartbeat.pid != harness.last_pid


async def test_a_process_claiming_another_agents_id_is_forbidden_counted_and_changes_nothing(
    harness: Harness, victim: int
) -> None:
    harness.directory.agents["victim"] = AgentIdentity(victim, "victim-token")
    reply = await harness.run_client("victim")
    assert json.loads(reply) == {"error": "forbidden", "field": "agent_id"}
    assert harness.rejected(RejectReason.FORBIDDEN) == 1
    assert harness.sink.for_agent("victim") == []


async def test_a_wrong_token_does_not_help_an_impostor(harness: Harness, victim: int) -> None:
    harness.directory.agents["victim"] = AgentIdentity(victim, "victim-token")
    reply = await harness.run_client("victim", token="guess")
    assert json.loads(reply)["error"] == "forbidden"
    assert harness.sink.for_agent("victim") == []


async def test_the_agents_token_lets_an_unrelated_process_heartbeat(
    harness: Harness, victim: int
) -> None:
    harness.directory.agents["victim"] = AgentIdentity(victim, "victim-token")
    assert await harness.run_client("victim", token="victim-token") == "OK"
    await wait_until(lambda: len(harness.sink.for_agent("victim")) == 1, what="the heartbeat")


async def test_an_agent_that_is_not_running_can_only_use_its_token(harness: Harness) -> None:
    harness.directory.agents["stopped"] = AgentIdentity(None, "t0k")
    assert (await harness.send_and_read_reply(heartbeat_line("stopped")))["error"] == "forbidden"
    _, writer = await harness.connect()
    writer.write(heartbeat_line("stopped", token="t0k"))
    await wait_until(lambda: len(harness.sink.records) == 1, what="the heartbeat")
    writer.close()


async def test_an_unknown_agent_is_refused_and_counted(harness: Harness) -> None:
    reply = await harness.send_and_read_reply(heartbeat_line("nobody"))
    assert reply == {"error": "unknown_agent", "field": "agent_id"}
    assert harness.rejected(RejectReason.UNKNOWN_AGENT) == 1
    assert harness.sink.records == []


async def test_an_unknown_agent_reaches_the_sink_when_unmanaged_agents_are_allowed(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, allow_unmanaged=True)
    await h.receiver.start()
    try:
        _, writer = await h.connect()
        writer.write(heartbeat_line("stranger"))
        await wait_until(lambda: len(h.sink.for_agent("stranger")) == 1, what="the heartbeat")
        writer.close()
    finally:
        await h.receiver.stop()


@pytest.mark.parametrize(
    ("parents", "peer", "agent", "expected"),
    [
        pytest.param({}, 50, 50, True, id="the-agent-itself"),
        pytest.param({60: 50}, 60, 50, True, id="a-child"),
        pytest.param({70: 60, 60: 50}, 70, 50, True, id="a-grandchild"),
        pytest.param({60: 1}, 60, 50, False, id="reparented-to-init"),
        pytest.param({50: 60}, 60, 50, False, id="the-agents-parent"),
        pytest.param({}, 60, 50, False, id="a-vanished-process"),
        pytest.param({60: 61, 61: 60}, 60, 50, False, id="a-cycle-ends"),
        pytest.param(
            {100 + i: 101 + i for i in range(MAX_TREE_DEPTH + 5)},
            100,
            100 + MAX_TREE_DEPTH + 5,
            False,
            id="deeper-than-the-bound",
        ),
    ],
)
def test_the_process_tree_check(
    parents: dict[int, int], peer: int, agent: int, expected: bool
) -> None:
    assert is_same_or_descendant(peer, agent, read_parent=parents.get) is expected


# -- the socket file -------------------------------------------------------------------


async def test_the_socket_is_0660_in_a_0700_directory_and_is_removed_on_stop(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    await h.receiver.start()
    assert stat.S_IMODE(os.stat(h.path.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.lstat(h.path).st_mode)
    assert stat.S_IMODE(os.lstat(h.path).st_mode) == 0o660
    await h.receiver.stop()
    assert not h.path.exists()


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.receiver.start()
    await h.receiver.stop()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(h.path))
    stale.close()
    receiver = h.new_receiver()
    await receiver.start()
    await one_heartbeat_arrives(h)
    await receiver.stop()


async def test_a_socket_another_receiver_serves_is_never_taken_over(harness: Harness) -> None:
    second = harness.new_receiver()
    with pytest.raises(SocketPathError, match="is served by another process"):
        await second.start()
    await second.stop()
    await one_heartbeat_arrives(harness)  # the first receiver still has its socket


async def one_heartbeat_arrives(h: Harness) -> None:
    h.directory.agents["a"] = AgentIdentity(os.getpid(), "")
    _, writer = await h.connect()
    writer.write(heartbeat_line("a"))
    await wait_until(lambda: len(h.sink.records) == 1, what="the heartbeat")
    writer.close()


async def test_a_regular_file_at_the_socket_path_is_never_removed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.path.parent.mkdir(mode=0o700)
    h.path.write_text("precious")
    with pytest.raises(SocketPathError):
        await h.receiver.start()
    assert h.path.read_text() == "precious"


async def test_after_a_restart_clients_reconnect_and_heartbeats_resume(harness: Harness) -> None:
    harness.directory.agents["a"] = AgentIdentity(os.getpid(), "")
    _, writer = await harness.connect()
    writer.write(heartbeat_line("a", seq=0))
    await wait_until(lambda: len(harness.sink.records) == 1, what="the first heartbeat")
    await harness.receiver.stop()
    harness.receiver = harness.new_receiver()
    await harness.receiver.start()
    writer.close()
    _, writer = await harness.connect()
    writer.write(heartbeat_line("a", seq=1))
    await wait_until(lambda: len(harness.sink.records) == 2, what="the heartbeat after restart")
    assert [r.heartbeat.seq for r in harness.sink.records] == [0, 1]
    writer.close()


# -- limits ----------------------------------------------------------------------------


async def test_a_100_mib_line_without_newline_is_refused_before_it_is_read(
    harness: Harness,
) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(harness.path))
        sent = await stream_without_newline(sock, total_bytes=100 << 20)
        async with asyncio.timeout(DEADLINE_S):
            reply = await loop.sock_recv(sock, 4096)
    assert json.loads(reply) == {"error": "too_large", "field": None}
    assert sent < 20 << 20, "the receiver must close long before 100 MiB"
    assert harness.rejected(RejectReason.TOO_LARGE) == 1


async def stream_without_newline(sock: socket.socket, *, total_bytes: int) -> int:
    """Send ``total_bytes`` of 'x' until the peer hangs up; return how much went out."""
    loop = asyncio.get_running_loop()
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < total_bytes:
            await loop.sock_sendall(sock, chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        return sent
    raise AssertionError("the receiver read 100 MiB without closing")


async def test_a_line_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not(
    harness: Harness,
) -> None:
    harness.directory.agents["a"] = AgentIdentity(os.getpid(), "")
    base = heartbeat_line("a")
    padded = base[:-2] + b" " * (65_536 - len(base)) + b"}\n"
    assert len(padded) == 65_536
    _, writer = await harness.connect()
    writer.write(padded)
    await wait_until(lambda: len(harness.sink.records) == 1, what="the padded heartbeat")
    writer.close()
    too_long = base[:-2] + b" " * (65_537 - len(base)) + b"}\n"
    assert (await harness.send_and_read_reply(too_long))["error"] == "too_large"


async def test_connections_over_the_limit_are_refused_with_a_line(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_connections=3)
    await h.receiver.start()
    try:
        kept = [await h.connect() for _ in range(3)]
        await wait_until(lambda: len(h.receiver.connections) == 3, what="three connections")
        reader, refused = await h.connect()
        async with asyncio.timeout(DEADLINE_S):
            assert json.loads(await reader.readline())["error"] == "too_many_connections"
            assert await reader.read() == b""
        refused.close()
        assert h.rejected(RejectReason.TOO_MANY_CONNECTIONS) == 1
        for _, writer in kept:
            writer.close()
    finally:
        await h.receiver.stop()


async def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    h = Harness(tmp_path, idle_timeout_s=0.2)
    await h.receiver.start()
    try:
        reader, writer = await h.connect()
        async with asyncio.timeout(DEADLINE_S):
            assert await reader.read() == b""
        await wait_until(lambda: not h.receiver.connections, what="the connection to be gone")
        writer.close()
    finally:
        await h.receiver.stop()


async def test_a_flood_over_many_connections_gives_the_loop_a_turn_every_few_lines(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, lines_per_turn=50)
    agents = [f"a{i}" for i in range(8)]
    h.directory.agents.update({a: AgentIdentity(os.getpid(), "") for a in agents})
    await h.receiver.start()
    samples: list[int] = []

    async def ticker() -> None:
        while True:
            samples.append(len(h.sink.records))
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    writers = []
    try:
        for agent in agents:
            _, writer = await h.connect()
            writer.write(b"".join(heartbeat_line(agent, seq=i) for i in range(2_000)))
            writers.append(writer)
        await wait_until(lambda: len(h.sink.records) == 16_000, what="every heartbeat")
    finally:
        tick.cancel()
        for writer in writers:
            writer.close()
        await h.receiver.stop()
    steps = [b - a for a, b in itertools.pairwise(samples)]
    assert max(steps) <= 50
    for agent in agents:
        assert [r.heartbeat.seq for r in h.sink.for_agent(agent)] == list(range(2_000))


# -- hostile input while good agents heartbeat ------------------------------------------


def malformed_lines(rng: random.Random) -> list[tuple[bytes, str]]:
    good = heartbeat_line("good-0")[:-1]
    cases: list[tuple[bytes, str]] = []
    for _ in range(150):
        noise = rng.randbytes(rng.randint(1, 300)).replace(b"\n", b"") or b"\x00"
        cases.append((noise, "bad_json"))
        cases.append((good[: rng.randint(1, len(good) - 1)], "bad_json"))
    cases += [
        (
            good.replace(b'"pid": ', b'"pid": "').replace(b', "timestamp"', b'", "timestamp"'),
            "bad_field",
        ),
        (good.replace(b"1.0,", b"NaN,", 1), "bad_json"),
        (good[:-1] + b', "pid": 1}', "bad_json"),
        (b"[" * 100_000, "too_large"),
        (b"[" * 60_000, "bad_json"),
        (good[:-1] + b', "x": ' + b"[" * 50_000 + b"}", "bad_field"),
        (good.replace(b'"memory": 1024', b'"memory": ' + b"9" * 5000), "bad_json"),
        (good.replace(b"1700000000.0", b"9" * 5000), "bad_json"),
        (good.replace(b'"1.0"', b'"\xff\xfe"'), "bad_json"),
        (good.replace(b'"healthy"', b'"zombie"'), "bad_field"),
        (heartbeat_line("victim")[:-1], "forbidden"),
        (heartbeat_line("nobody")[:-1], "unknown_agent"),
    ] * 25
    rng.shuffle(cases)
    return cases


async def test_a_flood_of_malformed_lines_is_refused_while_good_heartbeats_all_arrive(
    harness: Harness, victim: int
) -> None:
    harness.directory.agents["victim"] = AgentIdentity(victim, "victim-token")
    agents = [f"good-{i}" for i in range(20)]
    for agent in agents:
        harness.directory.agents[agent] = AgentIdentity(os.getpid(), "")
    per_agent = 50
    bad = malformed_lines(random.Random(4))
    gate = asyncio.Semaphore(32)

    async def send_good(agent: str) -> None:
        _, writer = await harness.connect()
        for seq in range(per_agent):
            writer.write(heartbeat_line(agent, seq=seq))
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    async def send_bad(line: bytes, expected: str) -> None:
        async with gate:
            reply = await harness.send_and_read_reply(line + b"\n")
        assert reply["error"] == expected, line[:80]

    await asyncio.gather(
        *(send_good(a) for a in agents), *(send_bad(line, reason) for line, reason in bad)
    )
    total = len(agents) * per_agent
    await wait_until(lambda: len(harness.sink.records) == total, what="every good heartbeat")
    for agent in agents:
        assert [r.heartbeat.seq for r in harness.sink.for_agent(agent)] == list(range(per_agent))
    assert harness.sink.for_agent("victim") == []
    snapshot = harness.stats.snapshot().get(Transport.UNIX)
    expected_counts: dict[str, int] = {}
    for _, reason in bad:
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert {str(k): v for k, v in snapshot.rejected.items()} == expected_counts
    assert snapshot.accepted == total
    assert snapshot.received == total + len(bad)

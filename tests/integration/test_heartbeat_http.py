"""The HTTP heartbeat receiver on a real aiohttp server (port 0) with real clients."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from reconciler.daemon.heartbeat import (
    AgentIdentity,
    FakeAgentDirectory,
    HeartbeatStats,
    HttpHeartbeatReceiver,
    HttpReceiverConfig,
    RecordingSink,
    RejectReason,
    Transport,
    parse_listen,
)

DEADLINE_S = 20.0
TOKEN = "agent-token-1"
TEN_MIB = object()  # a 10 MiB body, made afresh for each request


async def wait_until(condition: Callable[[], bool], *, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def body(agent_id: str = "agent-1", *, seq: int = 0, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "agent_id": agent_id,
        "pid": os.getpid(),
        "timestamp": 1_700_000_000.0,
        "version": "1.0",
        "status": "healthy",
        "cpu": 1.0,
        "memory": 1024,
        "seq": seq,
        **changes,
    }
    return json.dumps(fields).encode()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


class Harness:
    def __init__(self, **config: Any) -> None:
        self.directory = FakeAgentDirectory({"agent-1": AgentIdentity(os.getpid(), TOKEN)})
        self.sink = RecordingSink()
        self.stats = HeartbeatStats()
        defaults: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "body_timeout_s": 0.5}
        self.receiver = HttpHeartbeatReceiver(
            HttpReceiverConfig(**{**defaults, **config}),
            directory=self.directory,
            sink=self.sink,
            stats=self.stats,
        )
        self.session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.receiver.port}"

    async def post(
        self, data: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with self.session.post(
            f"{self.url}/heartbeat", data=data, headers=bearer() if headers is None else headers
        ) as response:
            return response.status, await response.json(), dict(response.headers)

    async def get_stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/stats") as response:
            assert response.status == 200
            return dict(await response.json())

    async def raw(self, request: bytes, *, then: bytes = b"") -> bytes:
        """Send raw bytes on a fresh connection; return everything the server answers."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.receiver.port)
        writer.write(request)
        if then:
            writer.write(then)
        await writer.drain()
        async with asyncio.timeout(DEADLINE_S):
            answer = await reader.read()
        writer.close()
        return answer

    def rejected(self, reason: RejectReason) -> int:
        return self.stats.snapshot().get(Transport.HTTP).rejected.get(reason, 0)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.receiver.start()
    async with aiohttp.ClientSession() as session:
        h.session = session
        yield h
    await h.receiver.stop()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_a_good_heartbeat_is_accepted_and_reaches_the_sink(harness: Harness) -> None:
    before = harness.receiver.clock.monotonic()
    status, answer, _ = await harness.post(body(seq=3))
    assert (status, answer) == (202, {"accepted": True})
    await wait_until(lambda: len(harness.sink.records) == 1, what="the heartbeat")
    record = harness.sink.records[0]
    assert (record.heartbeat.agent_id, record.heartbeat.seq, record.transport) == (
        "agent-1",
        3,
        "http",
    )
    assert before <= record.received_at_s <= harness.receiver.clock.monotonic()


@pytest.mark.parametrize(
    ("headers", "agent_id"),
    [
        pytest.param(bearer("wrong"), "agent-1", id="wrong-token"),
        pytest.param({}, "agent-1", id="no-authorization-header"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, "agent-1", id="not-a-bearer"),
        pytest.param({"Authorization": "Bearer "}, "agent-1", id="empty-bearer"),
        pytest.param(bearer(), "someone-else", id="unknown-agent-looks-the-same"),
    ],
)
async def test_a_wrong_or_missing_token_is_401_counted_and_changes_nothing(
    harness: Harness, headers: dict[str, str], agent_id: str
) -> None:
    status, answer, _ = await harness.post(body(agent_id), headers)
    assert (status, answer) == (401, {"error": "unauthorized"})
    assert harness.rejected(RejectReason.UNAUTHORIZED) == 1
    assert harness.sink.records == []


async def test_an_agent_cannot_use_its_token_for_another_agent(harness: Harness) -> None:
    harness.directory.agents["victim"] = AgentIdentity(os.getpid(), "victim-token")
    status, _, _ = await harness.post(body("victim"))
    assert status == 401
    assert harness.sink.for_agent("victim") == []


@pytest.mark.parametrize(
    ("data", "reason", "field"),
    [
        pytest.param(b"{nope", "bad_json", None, id="bad-json"),
        pytest.param(body().replace(b"1.0,", b"NaN,", 1), "bad_json", None, id="nan"),
        pytest.param(body()[:-1] + b', "pid": 1}', "bad_json", "pid", id="duplicate-key"),
        pytest.param(body(pid="x"), "bad_field", "pid", id="wrong-type"),
        pytest.param(body(token=TOKEN), "bad_field", "token", id="token-in-the-body"),
        pytest.param(b"\xff" * 10, "bad_json", None, id="invalid-utf8"),
    ],
)
async def test_a_bad_body_is_400_with_reason_field_and_detail(
    harness: Harness, data: bytes, reason: str, field: str | None
) -> None:
    status, answer, _ = await harness.post(data)
    assert status == 400
    assert (answer["error"], answer["field"]) == (reason, field)
    assert answer["detail"]
    assert harness.rejected(RejectReason(reason)) == 1


async def test_a_10_mib_body_is_413_and_the_server_stays_up(harness: Harness) -> None:
    status, answer, _ = await harness.post(io.BytesIO(b" " * (10 << 20)))
    assert (status, answer) == (413, {"error": "too_large"})
    assert (await harness.post(body()))[0] == 202


async def test_a_declared_oversized_body_is_refused_before_it_is_sent(harness: Harness) -> None:
    head = (
        b"POST /heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: 104857600\r\nConnection: close\r\n\r\n"
    )
    answer = await harness.raw(head)
    assert status_of(answer) == 413
    assert harness.rejected(RejectReason.TOO_LARGE) == 1


async def test_a_chunked_body_over_the_limit_is_refused_while_reading(harness: Harness) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield b" " * 4096

    status, answer, _ = await harness.post(chunks())
    assert (status, answer) == (413, {"error": "too_large"})


async def test_a_content_length_shorter_than_the_body_is_refused_and_records_nothing(
    harness: Harness,
) -> None:
    data = body()
    head = (
        b"POST /heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: 10\r\n\r\n"
    )
    answer = await harness.raw(head + data)
    assert status_of(answer) == 400
    assert harness.sink.records == []
    assert (await harness.post(body()))[0] == 202


async def test_a_content_length_longer_than_the_body_times_out(harness: Harness) -> None:
    head = (
        b"POST /heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: 60000\r\n\r\n"
    )
    answer = await harness.raw(head + body())
    assert status_of(answer) == 408
    assert harness.rejected(RejectReason.TIMEOUT) == 1
    assert harness.sink.records == []


async def test_a_connection_that_never_finishes_its_headers_is_closed() -> None:
    h = Harness(idle_timeout_s=0.3)
    await h.receiver.start()
    try:
        answer = await h.raw(b"POST /heartbeat HTTP/1.1\r\nHost: x\r\n")
        assert answer == b""
    finally:
        await h.receiver.stop()


async def test_a_full_queue_answers_429_with_retry_after_and_the_counts_add_up() -> None:
    h = Harness(queue_size=1, workers=1)
    h.directory.agents.update({f"a{i}": AgentIdentity(os.getpid(), TOKEN) for i in range(200)})
    await h.receiver.start()
    connector = aiohttp.TCPConnector(limit=200)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            h.session = session
            results = await asyncio.gather(*(h.post(body(f"a{i}")) for i in range(200)))
            stats = await h.get_stats()
    finally:
        await h.receiver.stop()
    statuses = [status for status, _, _ in results]
    busy = [headers for status, _, headers in results if status == 429]
    assert busy, "200 simultaneous posts must overflow a queue of one"
    assert all(headers["Retry-After"] == "1" for headers in busy)
    assert set(statuses) == {202, 429}
    assert stats["received"] == 200
    assert stats["accepted"] + stats["rejected_total"] == 200
    assert stats["accepted"] == statuses.count(202)
    assert stats["rejected"] == {"busy": statuses.count(429)}
    assert len(h.sink.records) == statuses.count(202)


async def test_stats_show_counts_queue_depth_and_latency(harness: Harness) -> None:
    for seq in range(3):
        await harness.post(body(seq=seq))
    await harness.post(b"{")
    await wait_until(lambda: len(harness.sink.records) == 3, what="three heartbeats")
    stats = await harness.get_stats()
    assert stats["received"] == 4
    assert stats["accepted"] == 3
    assert stats["rejected"] == {"bad_json": 1}
    assert stats["queue_depth"] == 0
    assert stats["recorded"] == 3
    assert stats["avg_latency_ms"] > 0


async def test_while_shutting_down_heartbeats_get_503(harness: Harness) -> None:
    harness.receiver.begin_shutdown()
    status, answer, _ = await harness.post(body())
    assert (status, answer) == (503, {"error": "shutting_down"})
    assert harness.sink.records == []


async def test_stop_closes_the_listener() -> None:
    h = Harness()
    await h.receiver.start()
    port = h.receiver.port
    await h.receiver.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_flood_of_hostile_requests_is_refused_while_good_heartbeats_all_arrive(
    harness: Harness,
) -> None:
    agents = [f"good-{i}" for i in range(10)]
    harness.directory.agents.update({a: AgentIdentity(None, f"tok-{a}") for a in agents})
    harness.directory.agents["victim"] = AgentIdentity(None, "victim-token")
    per_agent = 20
    bad: list[tuple[Any, dict[str, str] | None, int]] = [
        (b"\x00\x01garbage", None, 400),
        (body()[:25], None, 400),
        (body(cpu="hot"), None, 400),
        (body().replace(b"1.0,", b"Infinity,", 1), None, 400),
        (b"[" * 60_000, None, 400),
        (body(memory=0).replace(b'"memory": 0', b'"memory": ' + b"9" * 5000), None, 400),
        (b'{"agent_id": "\xc3\x28"}', None, 400),
        (body("victim"), None, 401),
        (body("victim"), bearer("guess"), 401),
        (TEN_MIB, None, 413),
    ] * 5

    async def send_good(agent: str) -> None:
        for seq in range(per_agent):
            status, _, _ = await harness.post(body(agent, seq=seq), bearer(f"tok-{agent}"))
            assert status == 202

    async def send_bad(data: Any, headers: dict[str, str] | None, expected: int) -> None:
        payload = io.BytesIO(b" " * (10 << 20)) if data is TEN_MIB else data
        assert (await harness.post(payload, headers))[0] == expected

    await asyncio.gather(*(send_good(a) for a in agents), *(send_bad(*case) for case in bad))
    total = len(agents) * per_agent
    await wait_until(lambda: len(harness.sink.records) == total, what="every good heartbeat")
    for agent in agents:
        assert [r.heartbeat.seq for r in harness.sink.for_agent(agent)] == list(range(per_agent))
    assert harness.sink.for_agent("victim") == []
    stats = await harness.get_stats()
    assert stats["accepted"] == total
    assert stats["rejected"] == {
        "bad_json": 30,
        "bad_field": 5,
        "unauthorized": 10,
        "too_large": 5,
    }
    assert stats["received"] == total + len(bad)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        pytest.param("127.0.0.1:7071", ("127.0.0.1", 7071), id="ipv4"),
        pytest.param("[::1]:7071", ("::1", 7071), id="ipv6"),
        pytest.param("localhost:0", ("localhost", 0), id="port-zero"),
    ],
)
def test_listen_addresses_parse(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["7071", ":7071", "host:", "host:x", "host:70000"])
def test_malformed_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(listen)

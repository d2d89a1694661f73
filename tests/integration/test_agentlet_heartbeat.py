"""agentlet heartbeats against real receivers: a Unix socket server and an aiohttp server."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pwd
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agentlet import AgentletConfig, BackoffPolicy, Heartbeater, TransportError
from agentlet.heartbeat import Heartbeat, HeartbeatStatus
from agentlet.heartbeater import make_transport
from agentlet.transport import HeartbeatRejected, SocketOrHttpTransport, Transport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_agentlet_support import SocketReceiver, until

INTERVAL_S = 0.1
FAST = BackoffPolicy(initial_s=0.01, max_s=0.1)


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[SocketReceiver]:
    server = SocketReceiver(tmp_path / "hb.sock")
    await server.start()
    yield server
    await server.stop()
    assert server.problems == []


@pytest.fixture
async def start() -> AsyncIterator[Callable[[Heartbeater], Heartbeater]]:
    running: list[tuple[Heartbeater, asyncio.Task[None]]] = []

    def launch(heartbeater: Heartbeater) -> Heartbeater:
        running.append((heartbeater, asyncio.create_task(heartbeater.run())))
        return heartbeater

    yield launch
    for heartbeater, task in running:
        heartbeater.stop()
        await asyncio.wait_for(task, 10)


def socket_config(receiver: SocketReceiver, **changes: object) -> AgentletConfig:
    fields: dict[str, object] = {
        "agent_id": "steady-1",
        "heartbeat_socket": str(receiver.path),
        "interval_s": INTERVAL_S,
        "version": "1.0",
        "token": "tok-1",
    }
    fields.update(changes)
    return AgentletConfig(**fields)  # type: ignore[arg-type]


async def test_heartbeats_arrive_at_the_interval_with_increasing_seq(
    receiver: SocketReceiver, start: Callable[[Heartbeater], Heartbeater]
) -> None:
    start(Heartbeater.from_config(socket_config(receiver), backoff=FAST))
    await until(lambda: len(receiver.lines) >= 5)
    bodies = [line.body for line in receiver.lines]
    assert [body["seq"] for body in bodies] == list(range(len(bodies)))
    assert {body["pid"] for body in bodies} == {os.getpid()}
    assert bodies[0]["status"] == "starting"
    assert bodies[-1]["status"] == "healthy"
    assert bodies[0]["token"] == "tok-1"
    assert all(body["memory"] > 0 for body in bodies)
    sent_at = [body["timestamp"] for body in bodies]
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    assert min(gaps) >= 0.9 * INTERVAL_S  # paced by the interval, never early


async def test_one_connection_carries_all_heartbeats(
    receiver: SocketReceiver, start: Callable[[Heartbeater], Heartbeater]
) -> None:
    start(Heartbeater.from_config(socket_config(receiver), backoff=FAST))
    await until(lambda: len(receiver.lines) >= 4)
    assert receiver.connections == 1


async def test_heartbeats_resume_when_the_daemon_comes_back(
    receiver: SocketReceiver, start: Callable[[Heartbeater], Heartbeater]
) -> None:
    failures: list[TransportError] = []
    heartbeater = start(
        Heartbeater.from_config(socket_config(receiver), backoff=FAST, on_failure=failures.append)
    )
    await until(lambda: len(receiver.lines) >= 2)
    await receiver.stop()
    failed_before = heartbeater.failed
    await until(lambda: heartbeater.failed >= failed_before + 3)
    seen = len(receiver.lines)
    last_seq = receiver.lines[-1].body["seq"]
    await receiver.start()
    await until(lambda: len(receiver.lines) >= seen + 3)
    resumed = [line.body["seq"] for line in receiver.lines[seen:]]
    assert resumed[0] > last_seq
    assert resumed == sorted(resumed)
    assert receiver.lines[-1].connection == receiver.connections
    assert failures


async def test_an_error_line_from_the_daemon_is_reported_and_the_agent_reconnects(
    receiver: SocketReceiver, start: Callable[[Heartbeater], Heartbeater]
) -> None:
    failures: list[TransportError] = []
    receiver.reject_next = "forbidden"
    heartbeater = start(
        Heartbeater.from_config(socket_config(receiver), backoff=FAST, on_failure=failures.append)
    )
    await until(lambda: len(receiver.lines) >= 2)
    assert receiver.connections >= 2
    assert receiver.lines[0].connection >= 2
    rejection = failures[0]
    assert isinstance(rejection, HeartbeatRejected)
    assert (rejection.reason, rejection.field) == ("forbidden", None)
    assert heartbeater.failed >= 1


async def test_a_receiver_that_never_existed_is_retried_until_it_appears(
    tmp_path: Path, start: Callable[[Heartbeater], Heartbeater]
) -> None:
    late = SocketReceiver(tmp_path / "late.sock")
    heartbeater = start(Heartbeater.from_config(socket_config(late), backoff=FAST))
    await until(lambda: heartbeater.failed >= 2)
    await late.start()
    try:
        await until(lambda: len(late.lines) >= 1)
        assert late.lines[0].body["status"] == "starting"
        assert late.lines[0].body["seq"] == 0
    finally:
        await late.stop()


class HttpReceiver:
    """POST /heartbeat as the daemon answers it; ``answers`` queues non-202 replies."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.bodies: list[dict[str, object]] = []
        self.answers: list[web.Response] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.answers:
            return self.answers.pop(0)
        self.bodies.append(json.loads(await request.read()))
        return web.json_response({"accepted": True}, status=202)


@pytest.fixture
async def http_receiver() -> AsyncIterator[tuple[HttpReceiver, str]]:
    receiver = HttpReceiver(token="http-secret")
    app = web.Application()
    app.router.add_post("/heartbeat", receiver.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield receiver, str(server.make_url("/heartbeat"))
    await server.close()


def http_config(url: str, token: str) -> AgentletConfig:
    return AgentletConfig(agent_id="http-1", heartbeat_url=url, token=token, interval_s=INTERVAL_S)


async def test_http_heartbeats_carry_the_bearer_token_and_no_token_field(
    http_receiver: tuple[HttpReceiver, str], start: Callable[[Heartbeater], Heartbeater]
) -> None:
    receiver, url = http_receiver
    start(Heartbeater.from_config(http_config(url, "http-secret"), backoff=FAST))
    await until(lambda: len(receiver.bodies) >= 3)
    assert [body["seq"] for body in receiver.bodies[:3]] == [0, 1, 2]
    assert all("token" not in body for body in receiver.bodies)


async def test_a_wrong_http_token_is_reported_as_unauthorized(
    http_receiver: tuple[HttpReceiver, str], start: Callable[[Heartbeater], Heartbeater]
) -> None:
    _receiver, url = http_receiver
    failures: list[TransportError] = []
    heartbeater = start(
        Heartbeater.from_config(http_config(url, "wrong"), backoff=FAST, on_failure=failures.append)
    )
    await until(lambda: heartbeater.failed >= 2)
    assert heartbeater.sent == 0
    rejection = failures[0]
    assert isinstance(rejection, HeartbeatRejected)
    assert (rejection.reason, rejection.status) == ("unauthorized", 401)


async def test_a_busy_http_receiver_is_given_its_retry_after(
    http_receiver: tuple[HttpReceiver, str], start: Callable[[Heartbeater], Heartbeater]
) -> None:
    receiver, url = http_receiver
    busy = web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "1"})
    receiver.answers.append(busy)
    loop = asyncio.get_running_loop()
    failed_at: list[float] = []
    start(
        Heartbeater.from_config(
            http_config(url, "http-secret"),
            backoff=FAST,
            on_failure=lambda _error: failed_at.append(loop.time()),
        )
    )
    await until(lambda: len(receiver.bodies) >= 1)
    delivered_at = loop.time()
    assert len(failed_at) == 1
    assert delivered_at - failed_at[0] >= 1.0 * 0.95


async def test_an_agent_the_socket_refuses_sends_its_heartbeats_over_http(
    tmp_path: Path, http_receiver: tuple[HttpReceiver, str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("running as another user needs root")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # the daemon's socket directory, closed to other users
    socket_receiver = SocketReceiver(private / "hb.sock")
    await socket_receiver.start()
    receiver, url = http_receiver
    config = AgentletConfig(
        agent_id="as-nobody",
        heartbeat_socket=str(socket_receiver.path),
        heartbeat_url=url,
        token="http-secret",
        interval_s=INTERVAL_S,
    )
    nobody = pwd.getpwnam("nobody")
    child = os.fork()
    if child == 0:  # an agent running as another user than the daemon's
        code = 2
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            transport = make_transport(config)
            asyncio.run(send_twice(transport))
            code = 0 if isinstance(transport, SocketOrHttpTransport) and transport.using_http else 3
        finally:
            os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, child, 0)
    await socket_receiver.stop()
    assert os.waitstatus_to_exitcode(status) == 0
    assert [body["agent_id"] for body in receiver.bodies] == ["as-nobody", "as-nobody"]
    assert socket_receiver.lines == []


async def send_twice(transport: Transport) -> None:
    for seq in range(2):
        beat = Heartbeat(
            agent_id="as-nobody",
            pid=os.getpid(),
            timestamp=time.time(),
            version="1",
            status=HeartbeatStatus.HEALTHY,
            cpu=0.0,
            memory=0,
            seq=seq,
        )
        await transport.send(beat)
    await transport.close()

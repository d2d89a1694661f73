"""The agent HTTP API on a real port: /health, /reload and /metrics."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentlet import Agentlet, AgentletConfig, BackoffPolicy, ListenAddress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_agentlet_support import SocketReceiver, until

INTERVAL_S = 0.05
HEALTH_TIMEOUT_S = 0.3
TOKEN = "agent-secret"


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[SocketReceiver]:
    server = SocketReceiver(tmp_path / "hb.sock")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Reloads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
async def agent(receiver: SocketReceiver) -> AsyncIterator[tuple[Agentlet, Reloads]]:
    reloads = Reloads()
    config = AgentletConfig(
        agent_id="api-1",
        token=TOKEN,
        heartbeat_socket=str(receiver.path),
        interval_s=INTERVAL_S,
        http_listen=ListenAddress("127.0.0.1", 0),
    )
    agentlet = Agentlet(
        config,
        reload=reloads,
        backoff=BackoffPolicy(initial_s=0.01),
        health_timeout_s=HEALTH_TIMEOUT_S,
    )
    async with agentlet:
        yield agentlet, reloads


def base_url(agentlet: Agentlet) -> str:
    assert agentlet.http_api is not None
    return agentlet.http_api.url


async def test_health_is_200_while_heartbeats_are_delivered_then_503_when_they_stop(
    agent: tuple[Agentlet, Reloads], receiver: SocketReceiver, http: aiohttp.ClientSession
) -> None:
    agentlet, _ = agent
    await until(lambda: len(receiver.lines) >= 1)
    async with http.get(f"{base_url(agentlet)}/health") as response:
        assert response.status == 200
        body = await response.json()
    assert body["healthy"] is True
    assert 0 <= body["last_delivery_age_s"] <= HEALTH_TIMEOUT_S

    await receiver.stop()
    heartbeater = agentlet.heartbeater
    assert heartbeater is not None
    await until(lambda: (heartbeater.last_delivery_age_s() or 0.0) > HEALTH_TIMEOUT_S)
    async with http.get(f"{base_url(agentlet)}/health") as response:
        assert response.status == 503
        body = await response.json()
    assert body["healthy"] is False
    assert body["last_delivery_age_s"] > HEALTH_TIMEOUT_S
    assert body["heartbeats_failed"] >= 1


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"Authorization": TOKEN}, id="no-scheme"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="wrong-scheme"),
    ],
)
async def test_reload_without_the_agent_token_is_401_and_does_not_reload(
    agent: tuple[Agentlet, Reloads], http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    agentlet, reloads = agent
    async with http.post(f"{base_url(agentlet)}/reload", headers=headers) as response:
        assert response.status == 401
        assert await response.json() == {"error": "unauthorized"}
    assert reloads.count == 0


async def test_reload_with_the_agent_token_calls_the_reload_callback(
    agent: tuple[Agentlet, Reloads], http: aiohttp.ClientSession
) -> None:
    agentlet, reloads = agent
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.post(f"{base_url(agentlet)}/reload", headers=headers) as response:
        assert response.status == 200
        assert await response.json() == {"reloaded": True}
    assert reloads.count == 1


async def test_a_reload_callback_that_raises_answers_500(
    receiver: SocketReceiver, http: aiohttp.ClientSession
) -> None:
    def broken() -> None:
        raise RuntimeError("bad config")

    config = AgentletConfig(token=TOKEN, http_listen=ListenAddress("127.0.0.1", 0))
    async with Agentlet(config, reload=broken) as agentlet:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(f"{base_url(agentlet)}/reload", headers=headers) as response:
            assert response.status == 500
            assert (await response.json())["error"] == "reload_failed"


async def test_metrics_parse_as_prometheus_text_with_the_heartbeat_counters(
    agent: tuple[Agentlet, Reloads], receiver: SocketReceiver, http: aiohttp.ClientSession
) -> None:
    agentlet, _ = agent
    await until(lambda: len(receiver.lines) >= 3)
    async with http.get(f"{base_url(agentlet)}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples = {family.name: family.samples[0] for family in text_string_to_metric_families(text)}
    assert samples["agentlet_heartbeats_sent"].value >= 3
    assert samples["agentlet_heartbeats_failed"].value == 0
    assert samples["agentlet_memory_bytes"].value > 0
    assert samples["agentlet_cpu_percent"].labels == {"agent_id": "api-1"}


async def test_a_standalone_agent_serves_health_and_says_heartbeats_are_off(
    http: aiohttp.ClientSession,
) -> None:
    config = AgentletConfig(http_listen=ListenAddress("127.0.0.1", 0))
    async with Agentlet(config) as agentlet:
        assert agentlet.heartbeater is None
        async with http.get(f"{base_url(agentlet)}/health") as response:
            assert response.status == 200
            assert (await response.json())["heartbeats"] == "off"
        async with http.get(f"{base_url(agentlet)}/metrics") as response:
            text = await response.text()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "agentlet_memory_bytes" in names


async def test_a_taken_port_is_logged_and_the_agent_keeps_heartbeating(
    receiver: SocketReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    listen = ListenAddress("127.0.0.1", 0)
    async with Agentlet(AgentletConfig(http_listen=listen)) as first:
        assert first.http_api is not None
        taken = ListenAddress("127.0.0.1", first.http_api.port)
        config = AgentletConfig(
            agent_id="api-2",
            heartbeat_socket=str(receiver.path),
            interval_s=INTERVAL_S,
            http_listen=taken,
        )
        async with Agentlet(config) as second:
            assert second.http_api is None
            await until(lambda: len(receiver.lines) >= 2)
    assert "HTTP API not started" in caplog.text


async def test_the_threaded_runner_heartbeats_for_a_synchronous_program(
    receiver: SocketReceiver,
) -> None:
    from agentlet import ThreadedAgentlet

    config = AgentletConfig(
        agent_id="sync-1", heartbeat_socket=str(receiver.path), interval_s=INTERVAL_S
    )
    runner = ThreadedAgentlet(config)
    runner.start()
    try:
        await until(lambda: len(receiver.lines) >= 2)
        runner.set_status("degraded")
        await until(lambda: receiver.lines[-1].body["status"] == "degraded")
    finally:
        runner.stop()
    assert runner.agentlet.heartbeater is not None
    assert runner.agentlet.heartbeater.sent >= 3

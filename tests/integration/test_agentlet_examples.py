"""The example agents in examples/agents/, run as real processes against a real receiver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_agentlet_support import SocketReceiver, clean_env, until

AGENTS = Path(__file__).resolve().parents[2] / "examples" / "agents"
INTERVAL_S = 0.1


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[SocketReceiver]:
    server = SocketReceiver(tmp_path / "hb.sock")
    await server.start()
    yield server
    await server.stop()
    assert server.problems == []


def agent_env(receiver: SocketReceiver, agent_id: str) -> dict[str, str]:
    return clean_env(
        RECONCILER_AGENT_ID=agent_id,
        RECONCILER_HEARTBEAT_SOCKET=str(receiver.path),
        RECONCILER_HEARTBEAT_INTERVAL_S=str(INTERVAL_S),
    )


async def launch(
    name: str, *args: str, env: dict[str, str], stdout: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(AGENTS / name),
        *args,
        env=env,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, bytes]:
    try:
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err


def lines_from(receiver: SocketReceiver, agent_id: str) -> list[dict[str, object]]:
    return [line.body for line in receiver.lines if line.body["agent_id"] == agent_id]


async def test_always_fails_exits_1_at_once() -> None:
    code, err = await finish(await launch("always_fails.py", env=clean_env()))
    assert code == 1
    assert b"failing" in err


async def test_steady_heartbeats_until_sigterm_then_exits_0(receiver: SocketReceiver) -> None:
    agent = await launch("steady.py", env=agent_env(receiver, "steady"))
    await until(lambda: len(lines_from(receiver, "steady")) >= 3)
    assert lines_from(receiver, "steady")[0]["pid"] == agent.pid
    agent.send_signal(signal.SIGTERM)
    code, _ = await finish(agent)
    assert code == 0


async def test_crashy_heartbeats_then_exits_1_after_its_period(receiver: SocketReceiver) -> None:
    agent = await launch("crashy.py", "0.5", env=agent_env(receiver, "crashy"))
    code, err = await finish(agent)
    assert code == 1
    assert b"crashing" in err
    assert len(lines_from(receiver, "crashy")) >= 2


async def test_hanging_stops_heartbeating_but_stays_alive(receiver: SocketReceiver) -> None:
    agent = await launch("hanging.py", "2", env=agent_env(receiver, "hanging"))
    try:
        assert agent.stderr is not None
        while b"stopped heartbeating" not in await asyncio.wait_for(agent.stderr.readline(), 30):
            pass
        delivered = len(lines_from(receiver, "hanging"))
        assert delivered == 2
        await asyncio.sleep(5 * INTERVAL_S)  # checking an absence: nothing more arrives
        assert len(lines_from(receiver, "hanging")) == delivered
        assert agent.returncode is None
    finally:
        agent.send_signal(signal.SIGTERM)
        code, _ = await finish(agent)
    assert code == 0


async def test_ignores_sigterm_keeps_heartbeating_after_sigterm(receiver: SocketReceiver) -> None:
    agent = await launch("ignores_sigterm.py", env=agent_env(receiver, "stubborn"))
    try:
        await until(lambda: len(lines_from(receiver, "stubborn")) >= 2)
        agent.send_signal(signal.SIGTERM)
        after = len(lines_from(receiver, "stubborn"))
        await until(lambda: len(lines_from(receiver, "stubborn")) >= after + 3)
        assert agent.returncode is None
    finally:
        agent.kill()
        code, _ = await finish(agent)
    assert code == -signal.SIGKILL


async def test_forker_leaves_sleeping_grandchildren_behind(receiver: SocketReceiver) -> None:
    agent = await launch(
        "forker.py", "2", env=agent_env(receiver, "forker"), stdout=asyncio.subprocess.PIPE
    )
    children: list[int] = []
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 30)
        children = [int(pid) for pid in line.split()[2:]]
        assert len(children) == 2
        for pid in children:
            assert parent_of(pid) == agent.pid
        await until(lambda: len(lines_from(receiver, "forker")) >= 2)
        agent.send_signal(signal.SIGTERM)
        await until(lambda: agent.returncode is not None)  # wait() waits for the pipes too
        assert agent.returncode == 0
        for pid in children:
            os.kill(pid, 0)  # still there: cleaning the tree is the supervisor's job
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if agent.returncode is None:
            agent.kill()
        await asyncio.wait_for(agent.communicate(), 30)  # until the children's pipes close


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize(
    "name", [pytest.param(n, id=n) for n in ("steady.py", "hanging.py", "forker.py")]
)
async def test_without_the_environment_an_example_runs_standalone(name: str) -> None:
    agent = await launch(name, "0", env=clean_env(), stdout=asyncio.subprocess.DEVNULL)
    try:
        assert agent.stderr is not None
        while b"heartbeats are off" not in await asyncio.wait_for(agent.stderr.readline(), 30):
            pass
        assert agent.returncode is None
    finally:
        agent.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(agent.wait(), 30)
    assert code == 0

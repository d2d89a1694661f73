"""The `agentlet run -- CMD` shim as a real process with a real child."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_agentlet_support import SocketReceiver, clean_env, until

TOKEN = "shim-secret"

CHILD = """
import os, signal, sys, time
from pathlib import Path

marks = Path(sys.argv[1])
code = int(sys.argv[2])

def mark(name):
    (marks / (name + ".tmp")).write_text(str(os.getpid()))
    (marks / (name + ".tmp")).rename(marks / name)

def on_term(signum, frame):
    mark("term")
    sys.exit(code)

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGHUP, lambda signum, frame: mark("hup"))
signal.signal(signal.SIGUSR1, lambda signum, frame: mark("usr1"))
mark("ready")
while True:
    time.sleep(0.05)
"""


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[SocketReceiver]:
    server = SocketReceiver(tmp_path / "hb.sock")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    (tmp_path / "marks").mkdir()
    return script


async def start_shim(
    *argv: str, env: dict[str, str], stderr: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentlet", "run", *argv, env=env, stderr=stderr
    )


def shim_env(receiver: SocketReceiver) -> dict[str, str]:
    return clean_env(
        RECONCILER_AGENT_ID="shimmed-1",
        RECONCILER_AGENT_TOKEN=TOKEN,
        RECONCILER_HEARTBEAT_SOCKET=str(receiver.path),
        RECONCILER_HEARTBEAT_INTERVAL_S="0.1",
    )


async def finish(process: asyncio.subprocess.Process) -> int:
    try:
        return await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_is_passed_to_the_child_and_its_exit_code_is_returned(
    receiver: SocketReceiver, child_script: Path
) -> None:
    marks = child_script.parent / "marks"
    shim = await start_shim(
        "--", sys.executable, str(child_script), str(marks), "7", env=shim_env(receiver)
    )
    await until(lambda: (marks / "ready").exists())
    shim.send_signal(signal.SIGTERM)
    assert await finish(shim) == 7
    assert (marks / "term").exists()


async def test_other_signals_are_passed_through_without_ending_the_shim(
    receiver: SocketReceiver, child_script: Path
) -> None:
    marks = child_script.parent / "marks"
    shim = await start_shim(
        "--", sys.executable, str(child_script), str(marks), "0", env=shim_env(receiver)
    )
    await until(lambda: (marks / "ready").exists())
    shim.send_signal(signal.SIGUSR1)
    await until(lambda: (marks / "usr1").exists())
    assert shim.returncode is None
    shim.send_signal(signal.SIGTERM)
    assert await finish(shim) == 0


async def test_heartbeats_carry_the_shims_pid_and_the_childs_memory(
    receiver: SocketReceiver, child_script: Path
) -> None:
    marks = child_script.parent / "marks"
    shim = await start_shim(
        "--", sys.executable, str(child_script), str(marks), "0", env=shim_env(receiver)
    )
    try:
        await until(lambda: len(receiver.lines) >= 3)
        bodies = [line.body for line in receiver.lines]
        assert {body["pid"] for body in bodies} == {shim.pid}
        assert {body["agent_id"] for body in bodies} == {"shimmed-1"}
        child_pid = int((marks / "ready").read_text())
        assert child_pid != shim.pid
        assert bodies[-1]["memory"] > 1_000_000  # a Python interpreter's RSS
        assert [body["seq"] for body in bodies] == list(range(len(bodies)))
    finally:
        shim.send_signal(signal.SIGTERM)
        await finish(shim)


async def test_a_child_killed_by_a_signal_gives_128_plus_the_signal(
    receiver: SocketReceiver,
) -> None:
    kill_self = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    shim = await start_shim("--", sys.executable, "-c", kill_self, env=shim_env(receiver))
    assert await finish(shim) == 128 + signal.SIGKILL


async def test_the_childs_plain_exit_code_is_returned(receiver: SocketReceiver) -> None:
    shim = await start_shim(
        "--", sys.executable, "-c", "raise SystemExit(42)", env=shim_env(receiver)
    )
    assert await finish(shim) == 42


async def test_a_missing_command_exits_127(receiver: SocketReceiver, tmp_path: Path) -> None:
    shim = await start_shim("--", str(tmp_path / "absent"), env=shim_env(receiver))
    assert await finish(shim) == 127


async def test_reload_on_the_shim_sends_sighup_to_the_child(
    receiver: SocketReceiver, child_script: Path
) -> None:
    marks = child_script.parent / "marks"
    shim = await start_shim(
        "--http-listen",
        "127.0.0.1:0",
        "--",
        sys.executable,
        str(child_script),
        str(marks),
        "0",
        env=shim_env(receiver),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = await api_url_from(shim)
        await until(lambda: (marks / "ready").exists())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/reload") as response:
                assert response.status == 401
            assert not (marks / "hup").exists()
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(f"{url}/reload", headers=headers) as response:
                assert response.status == 200
        await until(lambda: (marks / "hup").exists())
        assert shim.returncode is None
    finally:
        shim.send_signal(signal.SIGTERM)
        await finish(shim)


async def api_url_from(shim: asyncio.subprocess.Process) -> str:
    """Read the shim's log until it says where its HTTP API listens."""
    assert shim.stderr is not None
    while True:
        line = await asyncio.wait_for(shim.stderr.readline(), 30)
        assert line, "the shim ended before its HTTP API started"
        found = re.search(rb"HTTP API on (http://\S+)", line)
        if found:
            return found.group(1).decode()


async def test_the_shim_dies_with_its_child_when_killed_outright(
    receiver: SocketReceiver, child_script: Path
) -> None:
    marks = child_script.parent / "marks"
    shim = await start_shim(
        "--", sys.executable, str(child_script), str(marks), "0", env=shim_env(receiver)
    )
    await until(lambda: (marks / "ready").exists())
    child_pid = int((marks / "ready").read_text())
    shim.kill()
    await finish(shim)
    await until(lambda: not pid_alive(child_pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


@pytest.mark.parametrize(
    "argv",
    [pytest.param(["--help"], id="top-level"), pytest.param(["run", "--help"], id="run")],
)
async def test_help_is_printed_and_exits_zero(argv: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentlet", *argv, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert b"usage: agentlet" in out


async def test_run_without_a_command_is_a_usage_error() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentlet", "run", "--", stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"give the command" in err


async def test_a_bad_flag_value_is_an_error_naming_the_flag() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentlet",
        "run",
        "--interval",
        "0",
        "--",
        "/bin/true",
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"--interval: must be between" in err

"""Heartbeat health end to end: a real daemon, real agentlet agents, real signals.

The agents are ``examples/agents/steady.py`` run by this interpreter with no arguments:
the daemon hands them the heartbeat socket, their id, token, version and interval in
``RECONCILER_*`` variables. SIGSTOP makes an agent hang (alive, silent); SIGCONT wakes
it. Every wait polls ListAgents for a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.api.agent.v1 import agent_pb2
from tests.support.daemon import ALLOWED_WITH_PYTHON, DaemonProcess, spec, wait_for

pytestmark = pytest.mark.slow

AGENTS = Path(__file__).resolve().parents[2] / "examples" / "agents"
#: The interpreter may be a venv symlink; the allow-list checks its real path too.
INTERVAL_S = 0.5
TIMEOUT_S = 3.0
VERSION = "1.2.3"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon", settings={"agents": {"allowed_commands": ALLOWED_WITH_PYTHON}}
    )
    process.start()
    yield process
    process.close()


def steady(
    agent_id: str, *, interval_s: float = INTERVAL_S, timeout_s: float = TIMEOUT_S
) -> agent_pb2.AgentSpec:
    return spec(
        agent_id,
        command=(sys.executable, str(AGENTS / "steady.py")),
        heartbeat=(interval_s, timeout_s),
        version=VERSION,
        grace=1.0,
    )


def info(daemon: DaemonProcess, agent_id: str) -> agent_pb2.AgentInfo:
    return daemon.agents()[agent_id]


def healthy(daemon: DaemonProcess, agent_id: str) -> agent_pb2.AgentInfo | None:
    """The agent's info once it runs and has reported itself healthy since it started."""
    current = info(daemon, agent_id)
    ok = (
        current.phase == agent_pb2.AGENT_PHASE_RUNNING
        and current.reported_status == agent_pb2.REPORTED_STATUS_HEALTHY
    )
    return current if ok else None


def test_an_agentlet_agent_heartbeats_with_no_arguments_and_lists_its_health(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("steady")])
    current = wait_for(lambda: healthy(daemon, "steady"), what="first healthy heartbeat")
    assert current.reported_version == VERSION
    assert current.desired_version == VERSION
    assert current.HasField("last_heartbeat_at")
    assert 0.0 <= current.last_heartbeat_age_seconds < TIMEOUT_S
    assert current.restart_count == 0
    first = current.last_heartbeat_at.ToNanoseconds()
    wait_for(
        lambda: info(daemon, "steady").last_heartbeat_at.ToNanoseconds() > first,
        what="the next heartbeat",
    )


def test_a_stopped_agent_is_degraded_after_an_interval_and_restarted_after_its_timeout(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("hangs")])
    pid = wait_for(lambda: healthy(daemon, "hangs"), what="healthy").pid
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: info(daemon, "hangs").phase == agent_pb2.AGENT_PHASE_DEGRADED,
            what="Degraded",
        )
        degraded_after = time.monotonic() - stopped_at
        assert "heartbeat late" in info(daemon, "hangs").message
        restarted = wait_for(
            lambda: (i := info(daemon, "hangs")).pid not in (0, pid) and i, what="restart"
        )
        restarted_after = time.monotonic() - stopped_at
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert degraded_after >= INTERVAL_S, "not Degraded before an interval passed"
    assert restarted_after >= TIMEOUT_S, "not restarted before its timeout"
    assert restarted_after > degraded_after
    assert restarted.restart_count == 1
    wait_for(lambda: not _alive(pid), what="the hung process gone")
    wait_for(lambda: healthy(daemon, "hangs"), what="the new process healthy")


def test_an_agent_continued_before_its_timeout_recovers_without_a_restart(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("pauses", timeout_s=10.0)])
    pid = wait_for(lambda: healthy(daemon, "pauses"), what="healthy").pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: info(daemon, "pauses").phase == agent_pb2.AGENT_PHASE_DEGRADED,
            what="Degraded",
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    current = wait_for(lambda: healthy(daemon, "pauses"), what="Running again")
    assert current.pid == pid
    assert current.restart_count == 0
    assert not current.HasField("last_exit")


def test_an_agent_killed_by_sigkill_shows_signal_9_and_is_restarted(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("killed")])
    pid = wait_for(lambda: healthy(daemon, "killed"), what="healthy").pid
    os.kill(pid, signal.SIGKILL)
    current = wait_for(
        lambda: (i := info(daemon, "killed")).pid not in (0, pid) and i, what="a new process"
    )
    assert current.last_exit.signal == signal.SIGKILL
    assert current.last_exit.exit_code == 0
    assert current.restart_count == 1


def test_a_restarted_daemon_hears_its_agents_again_within_two_intervals_and_restarts_none(
    daemon: DaemonProcess,
) -> None:
    interval_s = 1.0
    agents = [steady(f"s{i}", interval_s=interval_s, timeout_s=3 * interval_s) for i in range(3)]
    daemon.sync(1, agents)
    first = {
        a.id: wait_for(lambda a=a: healthy(daemon, a.id), what=f"{a.id} healthy") for a in agents
    }
    before = {agent_id: current.pid for agent_id, current in first.items()}
    assert daemon.terminate() == 0
    assert all(_alive(pid) for pid in before.values()), "agents outlive a stopped daemon"
    daemon.start()
    serving_at = time.time()

    def resumed() -> dict[str, agent_pb2.AgentInfo] | None:
        listed = daemon.agents()
        heard = all(i.reported_status == agent_pb2.REPORTED_STATUS_HEALTHY for i in listed.values())
        return listed if heard else None

    listed = wait_for(resumed, what="heartbeats from every agent", interval_s=0.05)
    for agent_id, current in listed.items():
        heard_after = current.last_heartbeat_at.ToNanoseconds() / 1e9 - serving_at
        assert heard_after <= 2 * interval_s, f"{agent_id} was silent for {heard_after:.2f}s"
    # Past a whole timeout later, none was taken for hung and restarted.
    wait_for(
        lambda: all(
            i.last_heartbeat_at.ToNanoseconds() / 1e9 > serving_at + 3 * interval_s
            for i in daemon.agents().values()
        ),
        what="a timeout's worth of heartbeats",
    )
    after = daemon.agents()
    for agent_id, pid in before.items():
        assert after[agent_id].pid == pid, f"{agent_id} was restarted"
        assert after[agent_id].restart_count == 0
        assert after[agent_id].phase == agent_pb2.AGENT_PHASE_RUNNING
        started = after[agent_id].started_at.ToNanoseconds() / 1e9
        assert started == pytest.approx(first[agent_id].started_at.ToNanoseconds() / 1e9, abs=0.5)
    assert len(daemon.node_processes()) == len(agents)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False

"""PushUpdate end to end: a real daemon rolls one agent to a new version behind a
health gate, and rolls it back when the new version does not become healthy.

The agents are ``examples/agents/steady.py`` (heartbeats, reports the version the
daemon hands it); the broken versions are ``always_fails.py`` (exits 1 at once) and
``/bin/sleep`` (runs, never heartbeats). Events are read from the daemon's log, where
its EventLog writes every event as ``<Type> <agent>: <message>``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from tests.support.daemon import ALLOWED_WITH_PYTHON, DaemonProcess, spec, wait_for

pytestmark = pytest.mark.slow

AGENTS = Path(__file__).resolve().parents[2] / "examples" / "agents"
STEADY = (sys.executable, str(AGENTS / "steady.py"))
FAILS = (sys.executable, str(AGENTS / "always_fails.py"))
SILENT = ("/bin/sleep", "3600")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon", settings={"agents": {"allowed_commands": ALLOWED_WITH_PYTHON}}
    )
    process.start()
    yield process
    process.close()


def steady(agent_id: str, version: str = "1") -> agent_pb2.AgentSpec:
    return spec(agent_id, command=STEADY, heartbeat=(0.5, 5.0), version=version, grace=2.0)


def push(
    daemon: DaemonProcess,
    agent_id: str,
    version: str,
    command: tuple[str, ...] = (),
    *,
    deadline_s: float,
    operation_id: str = "",
) -> daemon_pb2.PushUpdateResponse:
    request = daemon_pb2.PushUpdateRequest(
        agent_id=agent_id,
        version=version,
        command=list(command),
        health_deadline_seconds=deadline_s,
        operation_id=operation_id,
    )
    with daemon.channel() as channel:
        answer: daemon_pb2.PushUpdateResponse = daemon.stub(channel).PushUpdate(
            request, timeout=deadline_s * 3 + 30
        )
    return answer


def running_version(daemon: DaemonProcess, agent_id: str, version: str) -> agent_pb2.AgentInfo:
    """Wait until the agent runs healthy and reports ``version``; its info."""

    def reports() -> agent_pb2.AgentInfo | None:
        info = daemon.agents()[agent_id]
        ok = (
            info.phase == agent_pb2.AGENT_PHASE_RUNNING
            and info.reported_status == agent_pb2.REPORTED_STATUS_HEALTHY
            and info.reported_version == version
        )
        return info if ok else None

    result: agent_pb2.AgentInfo = wait_for(reports, what=f"{agent_id} running {version}")
    return result


def events(daemon: DaemonProcess, kind: str, agent_id: str) -> list[str]:
    text = (daemon.root / "daemon.log").read_text(errors="replace")
    return [line for line in text.splitlines() if f" {kind} {agent_id}: " in line]


def test_an_update_that_becomes_healthy_succeeds_and_a_retry_does_not_act_again(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("up")])
    before = running_version(daemon, "up", "1")
    answer = push(daemon, "up", "2", deadline_s=20.0, operation_id="update-1")
    assert answer.outcome == daemon_pb2.UPDATE_OUTCOME_SUCCEEDED
    assert (answer.previous_version, answer.current_version) == ("1", "2")
    assert not answer.duplicate
    assert answer.agent.desired_version == "2"
    after = running_version(daemon, "up", "2")
    assert after.pid != before.pid
    assert len(events(daemon, "UpdateSucceeded", "up")) == 1

    again = push(daemon, "up", "2", deadline_s=20.0, operation_id="update-1")
    assert again.duplicate
    assert again.outcome == answer.outcome
    assert (again.previous_version, again.current_version) == ("1", "2")
    assert again.message == answer.message
    current = daemon.agents()["up"]
    assert (current.pid, current.restart_count) == (after.pid, after.restart_count)
    assert len(events(daemon, "UpdateSucceeded", "up")) == 1


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(FAILS, id="exits-at-once"),
        pytest.param(SILENT, id="never-heartbeats"),
    ],
)
def test_an_update_that_never_becomes_healthy_is_rolled_back_to_the_previous_version(
    daemon: DaemonProcess, broken: tuple[str, ...]
) -> None:
    daemon.sync(1, [steady("rb")])
    running_version(daemon, "rb", "1")
    answer = push(daemon, "rb", "2", broken, deadline_s=4.0, operation_id="update-rb")
    assert answer.outcome == daemon_pb2.UPDATE_OUTCOME_ROLLED_BACK, answer.message
    assert (answer.previous_version, answer.current_version) == ("1", "1")
    assert "rolled back to 1" in answer.message
    assert answer.agent.desired_version == "1"
    restored = running_version(daemon, "rb", "1")
    assert daemon.agents()["rb"].desired_version == "1"
    assert len(daemon.node_processes()) == 1
    assert len(events(daemon, "UpdateRolledBack", "rb")) == 1

    again = push(daemon, "rb", "2", broken, deadline_s=4.0, operation_id="update-rb")
    assert again.duplicate
    assert again.outcome == daemon_pb2.UPDATE_OUTCOME_ROLLED_BACK
    assert again.message == answer.message
    current = daemon.agents()["rb"]
    assert (current.pid, current.restart_count) == (restored.pid, restored.restart_count)
    assert len(events(daemon, "UpdateRolledBack", "rb")) == 1


def test_a_retry_arriving_during_the_rollout_waits_for_it_and_answers_its_result(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("slow")])
    running_version(daemon, "slow", "1")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(push, daemon, "slow", "2", SILENT, deadline_s=3.0, operation_id="op")
        wait_for(lambda: daemon.agents()["slow"].desired_version == "2", what="rollout begun")
        retry = pool.submit(push, daemon, "slow", "2", SILENT, deadline_s=3.0, operation_id="op")
        answers = [first.result(), retry.result()]
    assert [a.duplicate for a in answers] == [False, True]
    assert {a.outcome for a in answers} == {daemon_pb2.UPDATE_OUTCOME_ROLLED_BACK}
    assert answers[0].message == answers[1].message
    assert len(events(daemon, "UpdateRolledBack", "slow")) == 1


def test_an_operation_id_used_for_another_agent_is_refused(daemon: DaemonProcess) -> None:
    daemon.sync(1, [steady("one"), steady("two")])
    running_version(daemon, "one", "1")
    push(daemon, "one", "2", deadline_s=20.0, operation_id="shared")
    with pytest.raises(grpc.RpcError) as caught:
        push(daemon, "two", "2", deadline_s=20.0, operation_id="shared")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "operation_id" in caught.value.details()
    assert daemon.agents()["two"].desired_version == "1"


def test_a_newer_generation_replaces_the_pushed_version(daemon: DaemonProcess) -> None:
    daemon.sync(1, [steady("gen")])
    running_version(daemon, "gen", "1")
    answer = push(daemon, "gen", "2", deadline_s=20.0)
    assert answer.outcome == daemon_pb2.UPDATE_OUTCOME_SUCCEEDED
    running_version(daemon, "gen", "2")
    daemon.sync(2, [steady("gen")])
    info = running_version(daemon, "gen", "1")
    assert info.desired_version == "1"
    assert daemon.list().observed_generation == 2
    assert len(daemon.node_processes()) == 1


def test_an_update_that_succeeded_outlives_a_daemon_restart_until_a_newer_generation(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("kept")])
    running_version(daemon, "kept", "1")
    assert push(daemon, "kept", "2", deadline_s=20.0).outcome == (
        daemon_pb2.UPDATE_OUTCOME_SUCCEEDED
    )
    updated = running_version(daemon, "kept", "2")

    daemon.kill()
    daemon.start()
    adopted = running_version(daemon, "kept", "2")
    assert (adopted.pid, adopted.desired_version) == (updated.pid, "2"), "adopted, not reverted"

    daemon.sync(2, [steady("kept")])
    running_version(daemon, "kept", "1")
    daemon.kill()
    daemon.start()
    assert running_version(daemon, "kept", "1").desired_version == "1"


def test_a_rolled_back_update_returns_to_the_version_an_earlier_update_installed(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("twice")])
    running_version(daemon, "twice", "1")
    assert (
        push(daemon, "twice", "2", deadline_s=20.0).outcome == daemon_pb2.UPDATE_OUTCOME_SUCCEEDED
    )
    running_version(daemon, "twice", "2")

    answer = push(daemon, "twice", "3", SILENT, deadline_s=3.0)
    assert answer.outcome == daemon_pb2.UPDATE_OUTCOME_ROLLED_BACK, answer.message
    assert (answer.previous_version, answer.current_version) == ("2", "2")
    running_version(daemon, "twice", "2")
    assert daemon.agents()["twice"].desired_version == "2"


def cli_update(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "reconciler", "agent", "update", "--daemon", daemon.address]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=90, check=False)


def test_the_cli_rolls_an_agent_forward_and_exits_1_when_it_is_rolled_back(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [steady("cli")])
    running_version(daemon, "cli", "1")

    forward = cli_update(daemon, "cli", "--version", "2", "--health-deadline", "20s")
    assert forward.returncode == 0, forward.stderr
    assert f"agent cli on {daemon.address}: succeeded, 1 -> 2" in forward.stdout
    running_version(daemon, "cli", "2")

    broken = ("cli", "--version", "3", "--health-deadline", "3s", "-o", "json", "--", *SILENT)
    back = cli_update(daemon, *broken)
    assert back.returncode == 1
    assert "agent cli: update rolled back" in back.stderr
    answer = json.loads(back.stdout)[0]
    assert answer["outcome"] == "UPDATE_OUTCOME_ROLLED_BACK"
    assert (answer["previousVersion"], answer["currentVersion"]) == ("2", "2")
    running_version(daemon, "cli", "2")

    unknown = cli_update(daemon, "nobody", "--version", "2")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr

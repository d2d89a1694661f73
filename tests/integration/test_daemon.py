"""The node daemon end to end: real daemon process, real agents, real gRPC."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from tests.support.daemon import DaemonProcess, spec, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "daemon")
    process.start()
    yield process
    process.close()


def fleet(n: int, *, version: str = "1") -> list[agent_pb2.AgentSpec]:
    return [spec(f"a{i:02d}", version=version) for i in range(n)]


def test_fifty_agents_converge_and_a_new_generation_acts_on_exactly_its_changes(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, fleet(50))
    first = wait_for(lambda: len(daemon.running()) == 50 and daemon.running(), what="50 running")
    assert len({p.pid for p in daemon.node_processes()}) == 50, "one process per agent"

    agents = fleet(50)
    kept = agents[20:]
    changed = [spec(a.id, version="2") for a in agents[10:20]]
    added = [spec(f"b{i}") for i in range(5)]
    daemon.sync(2, [*changed, *kept, *added])

    def settled() -> dict[str, int] | None:
        listed = daemon.list()
        running = daemon.running()
        ok = listed.observed_generation == 2 and len(running) == 45 and len(listed.agents) == 45
        return running if ok else None

    second = wait_for(settled, what="generation 2 applied")
    assert set(second) == {a.id for a in [*changed, *kept, *added]}
    for agent in kept:
        assert second[agent.id] == first[agent.id], f"{agent.id} must not restart"
    for agent in changed:
        assert second[agent.id] != first[agent.id], f"{agent.id} must restart"
    for stopped in agents[:10]:
        with pytest.raises(ProcessLookupError):
            os.kill(first[stopped.id], 0)
    assert len({p.pid for p in daemon.node_processes()}) == 45


def test_a_killed_agent_is_restarted_at_once_and_a_crash_loop_backs_off(
    daemon: DaemonProcess,
) -> None:
    crashing = spec("crashy", command=("/bin/false",))
    daemon.sync(1, [spec("steady"), crashing])
    pid = wait_for(lambda: daemon.running().get("steady"), what="steady running")
    os.kill(pid, signal.SIGKILL)
    new_pid = wait_for(
        lambda: (p := daemon.running().get("steady")) and p != pid and p, what="restart"
    )
    assert new_pid != pid

    def backing_off() -> agent_pb2.AgentInfo | None:
        info = daemon.agents()["crashy"]
        return (
            info
            if info.phase == agent_pb2.AGENT_PHASE_BACKOFF and info.restart_count >= 3
            else None
        )

    info = wait_for(backing_off, what="crashy in backoff")
    assert info.backoff.reason == "exited with code 1"
    assert info.backoff.next_attempt_at.seconds > 0
    assert info.last_exit.exit_code == 1


@pytest.mark.parametrize("failure_output", [True, False])
def test_a_failing_agent_says_why_in_its_status_unless_output_stays_on_the_node(
    tmp_path: Path, failure_output: bool
) -> None:
    script = "echo loading; echo 'error: cannot open /etc/cfg.yaml' >&2; exit 3"
    daemon = DaemonProcess(
        tmp_path / "daemon", settings={"agents": {"failure_output": failure_output}}
    )
    try:
        daemon.start()
        daemon.sync(1, [spec("cfg", command=("/bin/sh", "-c", script))])
        info = wait_for(
            lambda: (i := daemon.agents()["cfg"]).phase == agent_pb2.AGENT_PHASE_BACKOFF and i,
            what="cfg in backoff",
        )
        said = "exited with code 3: error: cannot open /etc/cfg.yaml"
        expected = said if failure_output else "exited with code 3"
        assert (info.message, info.backoff.reason) == (expected, expected)
        assert info.last_exit.exit_code == 3
    finally:
        daemon.close()


def test_stale_and_replayed_generations(daemon: DaemonProcess) -> None:
    daemon.sync(5, [spec("one")])
    again = daemon.sync(5, [spec("one")])
    assert again.unchanged
    with pytest.raises(grpc.RpcError) as caught:
        daemon.sync(4, [spec("one")])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "current generation 5" in caught.value.details()


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        pytest.param(spec("x", command=("bin/sleep", "1")), "command[0]", id="relative-path"),
        pytest.param(spec("x", command=("/opt/evil/run",)), "command", id="outside-allow-list"),
        pytest.param(spec("x", command=("/bin/sleep", "a\x00b")), "command[1]", id="nul-byte"),
        pytest.param(spec("x", command=()), "command", id="empty-argv"),
    ],
)
def test_a_desired_state_with_one_invalid_agent_changes_nothing(
    daemon: DaemonProcess, bad: agent_pb2.AgentSpec, field: str
) -> None:
    daemon.sync(1, [spec("good")])
    wait_for(lambda: "good" in daemon.running(), what="good running")
    with pytest.raises(grpc.RpcError) as caught:
        daemon.sync(2, [spec("good2"), bad])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    listed = daemon.list()
    assert listed.current_generation == 1
    assert set(daemon.agents()) == {"good"}


def test_an_agent_ignoring_sigterm_is_killed_at_its_grace_period(daemon: DaemonProcess) -> None:
    stubborn = spec(
        "stubborn",
        command=("/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"),
        grace=1.0,
    )
    daemon.sync(1, [stubborn])
    pid = wait_for(lambda: daemon.running().get("stubborn"), what="running")
    started = time.monotonic()
    daemon.sync(2, [])
    wait_for(lambda: not daemon.node_processes(), what="all gone")
    assert time.monotonic() - started >= 1.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_forking_agent_leaves_no_process_behind_after_stop(daemon: DaemonProcess) -> None:
    forker = spec(
        "forker",
        command=("/bin/sh", "-c", "sleep 300 & setsid sleep 300 & sleep 300 & wait"),
        grace=2.0,
    )
    daemon.sync(1, [forker])
    wait_for(lambda: len(daemon.node_processes()) >= 4, what="children")
    daemon.sync(2, [])
    wait_for(lambda: not daemon.node_processes(), what="no process left")


def test_a_daemon_told_to_stop_its_agents_on_exit_leaves_none_running(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "daemon", settings={"agents": {"stop_agents_on_exit": True}})
    try:
        daemon.start()
        daemon.sync(1, fleet(20))  # restart policy Always: an exit is normally restarted
        wait_for(lambda: len(daemon.running()) == 20, what="20 running")
        pids = {p.pid for p in daemon.node_processes()}

        assert daemon.terminate() == 0
        assert daemon.node_processes() == [], "no agent was started again while stopping"
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        log = daemon.log_text()
        assert log.count("the daemon is exiting") == 20, "each exit recorded as a stop"
        assert "AgentExited" not in log
    finally:
        daemon.close()


def run_daemon_to_exit(daemon: DaemonProcess) -> subprocess.CompletedProcess[str]:
    daemon.write_config()
    argv = [sys.executable, "-m", "reconciler", "daemon", "--config", str(daemon.config_path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_a_second_daemon_on_a_state_directory_or_socket_in_use_refuses_and_disturbs_nothing(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon.sync(1, [spec("steady")])
    pid = wait_for(lambda: daemon.running().get("steady"), what="steady running")
    shared_dir = DaemonProcess(
        tmp_path / "same-dir", node_id=daemon.node_id, settings={"state_dir": str(daemon.state_dir)}
    )
    refused = run_daemon_to_exit(shared_dir)
    assert refused.returncode == 1
    assert (
        f"state directory {daemon.state_dir} is in use by another daemon "
        f"(pid {daemon.proc.pid if daemon.proc else 0})" in refused.stderr
    )
    shared_socket = DaemonProcess(
        tmp_path / "same-socket",
        node_id=daemon.node_id,
        settings={"heartbeat": {"socket_path": str(daemon.socket_path)}},
    )
    refused = run_daemon_to_exit(shared_socket)
    assert refused.returncode == 1
    assert f"{daemon.socket_path} is served by another process" in refused.stderr
    assert daemon.socket_path.is_socket(), "the running daemon's socket is left in place"
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(daemon.socket_path))
    assert list((shared_socket.state_dir).iterdir()) == [shared_socket.state_dir / "daemon.lock"]
    assert daemon.running() == {"steady": pid}
    assert (daemon.state_dir / "processes.json").exists()


def recorded(daemon: DaemonProcess, agent_id: str) -> bool:
    """``agent_id``'s pid is in the daemon's processes.json (adoption can find it)."""
    path = daemon.state_dir / "processes.json"
    return path.exists() and f'"{agent_id}"' in path.read_text()


def test_two_daemons_of_one_node_on_one_host_never_touch_each_others_agents(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon.sync(1, [spec("steady"), spec("other")])
    wait_for(lambda: len(daemon.running()) == 2, what="both running")
    before = daemon.running()
    trial = DaemonProcess(tmp_path / "trial", node_id=daemon.node_id)  # e.g. a trial run
    try:
        trial.start()
        trial.sync(1, [spec("steady")])
        theirs = wait_for(lambda: trial.running().get("steady"), what="the trial's steady")
        assert theirs not in before.values()
        wait_for(lambda: recorded(trial, "steady"), what="the trial's pid saved")
        trial.kill()  # its agents live on, to be adopted by the next trial daemon
        trial.start()
        assert trial.running() == {"steady": theirs}
        trial.sync(2, [])
        wait_for(lambda: not trial.running(), what="the trial's steady stopped")
        assert daemon.running() == before, "the node's daemon lost none of its agents"
        assert all(psutil.pid_exists(pid) for pid in before.values())
    finally:
        trial.kill()


def test_sighup_restarts_the_daemon_in_place_with_its_settings_read_again(
    tmp_path: Path,
) -> None:
    daemon = DaemonProcess(
        tmp_path / "daemon",
        settings={"agents": {"stop_agents_on_exit": True}, "backoff": {"max_s": 30.0}},
    )

    def max_backoff() -> float | None:
        with daemon.channel() as channel:
            try:
                answer = daemon.stub(channel).GetConfig(daemon_pb2.GetConfigRequest(), timeout=2)
            except grpc.RpcError:
                return None  # between the two images of the process
        return float(json.loads(answer.settings_json)["backoff"]["max_s"])

    try:
        daemon.start()
        assert daemon.proc is not None
        daemon.sync(1, [spec("steady")])
        pid = wait_for(lambda: daemon.running().get("steady"), what="steady running")
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good + "bogus: 1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: not restarting" in daemon.log_text(), what="the refusal")
        assert "bogus: unknown setting" in daemon.log_text()
        assert (max_backoff(), daemon.running()) == (30.0, {"steady": pid})

        daemon.settings["backoff"]["max_s"] = 45.0
        daemon.write_config()
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: max_backoff() == 45.0, what="the new settings")
        assert daemon.proc.poll() is None, "the same process, restarted in place"
        assert daemon.running() == {"steady": pid}, "the agent kept running and was adopted"
        assert psutil.Process(pid).ppid() == daemon.proc.pid, "still the daemon's child"
        assert (daemon.root / "daemon.log").read_text().count("daemon ready") == 2
    finally:
        daemon.close()


def test_a_killed_daemon_adopts_its_agents_and_restarts_only_the_dead(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, fleet(50))
    before = wait_for(lambda: len(daemon.running()) == 50 and daemon.running(), what="50")
    daemon.kill()
    os.kill(before["a07"], signal.SIGKILL)
    daemon.start()
    after = wait_for(lambda: len(daemon.running()) == 50 and daemon.running(), what="50 again")
    for agent_id, pid in before.items():
        if agent_id == "a07":
            assert after[agent_id] != pid
        else:
            assert after[agent_id] == pid, f"{agent_id} was restarted"
    assert daemon.list().current_generation == 1
    assert len({p.pid for p in daemon.node_processes()}) == 50
    assert daemon.agents()["a00"].restart_count == 0


def test_agents_that_ended_for_good_stay_down_across_a_daemon_restart(
    daemon: DaemonProcess,
) -> None:
    on_failure, never = agent_pb2.RESTART_POLICY_ON_FAILURE, agent_pb2.RESTART_POLICY_NEVER
    agents = [
        spec("job", ("/bin/true",), restart_policy=on_failure),
        spec("broken", ("/bin/false",), restart_policy=never),
        spec("steady"),
    ]
    daemon.sync(1, agents)

    def ended() -> dict[str, agent_pb2.AgentInfo] | None:
        infos = daemon.agents()
        done = (
            infos["job"].phase == agent_pb2.AGENT_PHASE_STOPPED
            and infos["broken"].phase == agent_pb2.AGENT_PHASE_FAILED
            and infos["steady"].phase == agent_pb2.AGENT_PHASE_RUNNING
        )
        return infos if done else None

    before = wait_for(ended, what="the job done and the broken agent failed")
    finished = daemon.state_dir / "finished.json"  # written a moment after the exits
    wait_for(
        lambda: (
            finished.exists() and set(json.loads(finished.read_text())["body"]) == {"job", "broken"}
        ),
        what="finished.json",
    )
    daemon.kill()
    daemon.start()
    after = wait_for(ended, what="the same after the restart")
    assert after["broken"].last_exit.exit_code == 1
    assert after["job"].message == before["job"].message
    time.sleep(1.0)  # a start would show in the log within this

    def starts(agent_id: str) -> int:
        return (daemon.root / "daemon.log").read_text().count(f"AgentStarted {agent_id}:")

    assert (starts("job"), starts("broken")) == (1, 1), "each ran once"
    daemon.sync(2, [spec("job", ("/bin/true", "again"), restart_policy=on_failure), *agents[1:]])
    wait_for(lambda: starts("job") == 2, what="the changed job run again")


def test_a_narrower_allow_list_at_restart_starts_no_program_it_refuses(
    daemon: DaemonProcess,
) -> None:
    daemon.sync(1, [spec("gone"), spec("kept")])
    before = wait_for(lambda: len(daemon.running()) == 2 and daemon.running(), what="both")
    daemon.kill()
    os.kill(before["gone"], signal.SIGKILL)
    daemon.settings = {"agents": {"allowed_commands": ["/usr/local/bin/*"]}}
    daemon.start()

    def refused() -> agent_pb2.AgentInfo | None:
        info = daemon.agents()["gone"]
        return info if "agents.allowed_commands" in info.message else None

    info = wait_for(refused, what="the refusal in the agent's status")
    assert info.pid == 0
    assert daemon.running() == {"kept": before["kept"]}, "a running process is left to run"
    assert "no longer allow" in (daemon.root / "daemon.log").read_text()


def test_stop_and_start_overrides_hold_until_a_newer_generation(daemon: DaemonProcess) -> None:
    daemon.sync(1, [spec("one")])
    wait_for(lambda: "one" in daemon.running(), what="running")
    daemon.operate("one", agent_pb2.OPERATION_STOP, operation_id="op-1")
    wait_for(lambda: daemon.agents()["one"].phase == agent_pb2.AGENT_PHASE_STOPPED, what="stopped")
    assert daemon.agents()["one"].override == agent_pb2.OVERRIDE_STOP
    replay = daemon.operate("one", agent_pb2.OPERATION_STOP, operation_id="op-1")
    assert replay.duplicate
    daemon.sync(2, [spec("one")])
    wait_for(lambda: "one" in daemon.running(), what="running again")
    assert daemon.agents()["one"].override == agent_pb2.OVERRIDE_NONE


def test_restart_is_imperative_and_clears_backoff(daemon: DaemonProcess) -> None:
    daemon.sync(1, [spec("one")])
    pid = wait_for(lambda: daemon.running().get("one"), what="running")
    answer = daemon.operate("one", agent_pb2.OPERATION_RESTART)
    assert answer.message
    wait_for(lambda: (p := daemon.running().get("one")) and p != pid, what="new pid")


def test_unknown_agents_and_bad_ids_get_clear_errors(daemon: DaemonProcess) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        daemon.operate("nobody", agent_pb2.OPERATION_RESTART)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        daemon.operate("../x", agent_pb2.OPERATION_RESTART)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent_id" in bad.value.details()


def reconciler(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_one_node_is_useful_without_a_manager_through_the_cli(daemon: DaemonProcess) -> None:
    daemon.sync(1, [spec("one", labels={"team": "obs"}), spec("two")])
    pid = wait_for(lambda: daemon.running().get("one"), what="running")

    listed = reconciler("get", "agents", "--daemon", daemon.address, "-l", "team=obs", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [a["spec"]["id"] for a in json.loads(listed.stdout)] == ["one"]

    table = reconciler("get", "agents", "--daemon", daemon.address)
    assert table.returncode == 0, table.stderr
    assert "one" in table.stdout
    assert "two" in table.stdout

    restart = reconciler("agent", "restart", "one", "--daemon", daemon.address)
    assert restart.returncode == 0, restart.stderr
    assert "restart" in restart.stdout
    wait_for(lambda: (p := daemon.running().get("one")) and p != pid, what="restarted")

    wait_for(
        lambda: "cpu" in reconciler("metrics", "one", "--daemon", daemon.address).stdout.lower(),
        what="metrics with samples",
    )
    missing = reconciler("agent", "restart", "nobody", "--daemon", daemon.address)
    assert missing.returncode == 1
    assert missing.stderr.startswith("NOT_FOUND")

    described = reconciler("describe", "agent", "one", "--daemon", daemon.address)
    assert described.returncode == 0, described.stderr
    fields = dict(line.split(":", 1) for line in described.stdout.splitlines() if ":" in line)
    assert fields["Phase"].strip() == "Running"
    assert fields["Restarts"].strip() == "1"
    assert fields["Labels"].strip() == "team=obs"
    assert "samples over the last 10m" in fields["Metrics"]
    as_json = reconciler("describe", "agent", "one", "--daemon", daemon.address, "-o", "json")
    document = json.loads(as_json.stdout)
    assert (document["agent"]["info"]["pid"], document["events"]) == (daemon.running()["one"], None)
    unknown = reconciler("describe", "agent", "nobody", "--daemon", daemon.address)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("NOT_FOUND")

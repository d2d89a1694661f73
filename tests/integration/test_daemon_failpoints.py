"""A real daemon SIGKILLed at named steps (``RECONCILER_FAILPOINTS``), then started again.

Saving the desired state: the daemon is killed at each step of writing generation 2
over generation 1; after a restart the store holds exactly one whole generation (the
old one before the rename, the new one after it), nothing was moved aside as corrupt,
and the agents converge to what the store holds, one process each.

Spawning an agent: the daemon is killed after a child was spawned and before its pid
was recorded; the next daemon finds that process by its environment and stops it, so
the agent does not run twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reconciler.api.agent.v1 import agent_pb2
from reconciler.daemon.controller import ProcessOwner, scan_node_processes
from reconciler.model import AgentId, NodeId
from tests.support.daemon import DaemonProcess, kill_node_processes, spec, wait_for

pytestmark = pytest.mark.slow

OLD = [spec("kept", version="1"), spec("changed", version="1"), spec("removed", version="1")]
NEW = [spec("kept", version="1"), spec("changed", version="2"), spec("added", version="2")]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "daemon")
    yield process
    process.close()


def converged(daemon: DaemonProcess, wanted: list[agent_pb2.AgentSpec]) -> bool:
    listed = daemon.list()
    running = {
        s.info.agent_id: s.info.desired_version
        for s in listed.agents
        if s.info.phase == agent_pb2.AGENT_PHASE_RUNNING
    }
    return (
        listed.observed_generation == listed.current_generation
        and running == {a.id: a.version for a in wanted}
        and len(listed.agents) == len(wanted)
    )


def one_process_each(daemon: DaemonProcess, wanted: list[agent_pb2.AgentSpec]) -> None:
    pids = daemon.running()
    processes = daemon.node_processes()
    assert sorted(p.pid for p in processes) == sorted(pids.values())
    assert set(pids) == {a.id for a in wanted}


@pytest.mark.parametrize(
    ("point", "holds"),
    [
        pytest.param("store.before_write", 1, id="before-write"),
        pytest.param("store.after_tmp_write", 1, id="after-temp-write"),
        pytest.param("store.after_tmp_fsync", 1, id="after-temp-fsync"),
        pytest.param("store.after_rename", 2, id="after-rename"),
        pytest.param("store.after_dir_fsync", 2, id="after-dir-fsync"),
        pytest.param("controller.after_persist", 2, id="after-persist"),
    ],
)
def test_a_daemon_killed_while_saving_keeps_one_whole_generation_and_converges_to_it(
    daemon: DaemonProcess, point: str, holds: int
) -> None:
    daemon.start()
    daemon.sync(1, OLD)
    wait_for(lambda: converged(daemon, OLD), what="generation 1 running")
    assert daemon.terminate() == 0

    daemon.env = {"RECONCILER_FAILPOINTS": f"{point}=kill"}
    daemon.start()
    with pytest.raises(grpc.RpcError):
        daemon.sync(2, NEW)
    assert daemon.wait_exit() == -signal.SIGKILL
    left_by_the_kill = set(daemon.state_dir.glob(".*.tmp"))
    if point.startswith("store.after_tmp"):
        assert left_by_the_kill, "the kill left a half-saved temp file"

    daemon.env = {}
    daemon.start()
    wanted = OLD if holds == 1 else NEW
    assert daemon.list().current_generation == holds
    assert not list(daemon.state_dir.glob("*.corrupt-*")), "nothing was unreadable"
    # Only the files the kill left: the restarted daemon may be saving right now.
    assert not left_by_the_kill & set(daemon.state_dir.glob(".*.tmp")), "temp files removed"
    wait_for(lambda: converged(daemon, wanted), what=f"generation {holds} running")
    one_process_each(daemon, wanted)

    daemon.sync(3, NEW)
    wait_for(lambda: converged(daemon, NEW), what="the next generation still applies")
    one_process_each(daemon, NEW)


def test_a_daemon_killed_between_spawn_and_record_does_not_run_the_agent_twice(
    daemon: DaemonProcess,
) -> None:
    daemon.env = {"RECONCILER_FAILPOINTS": "supervisor.after_spawn_before_record=kill"}
    daemon.start()
    with contextlib.suppress(grpc.RpcError):  # the daemon may die before it answers
        daemon.sync(1, [spec("only")])
    assert daemon.wait_exit() == -signal.SIGKILL
    orphans = daemon.node_processes()
    assert len(orphans) == 1, "the spawned agent outlived the daemon unrecorded"

    daemon.env = {}
    daemon.start()
    wait_for(lambda: converged(daemon, [spec("only")]), what="the agent running")
    wait_for(lambda: not orphans[0].is_running(), what="the unrecorded process stopped")
    one_process_each(daemon, [spec("only")])
    assert daemon.running()["only"] != orphans[0].pid


def test_node_processes_are_found_by_the_owner_marks_in_their_environment(
    tmp_path: Path,
) -> None:
    node_id = f"scan-{os.getpid()}"
    owner = ProcessOwner(NodeId(node_id), str(tmp_path / "state"))
    env = {"PATH": "/bin:/usr/bin", **owner.environment(), "RECONCILER_AGENT_ID": "a1"}
    other_node = {**env, "RECONCILER_NODE_ID": f"{node_id}-other"}
    other_daemon = {**env, "RECONCILER_DAEMON_DIR": str(tmp_path / "dev-state")}
    no_dir = {k: v for k, v in env.items() if k != "RECONCILER_DAEMON_DIR"}
    mine = subprocess.Popen(["/bin/sleep", "60"], env=env)
    theirs = [
        subprocess.Popen(["/bin/sleep", "60"], env=environ)
        for environ in (other_node, other_daemon, no_dir)
    ]
    try:
        found = wait_for(lambda: scan_node_processes(owner), what="the process")
        assert [(p.agent_id, p.pid, p.cmdline) for p in found] == [
            (AgentId("a1"), mine.pid, ("/bin/sleep", "60"))
        ]
    finally:
        for child in (mine, *theirs):
            child.kill()
            child.wait()
        kill_node_processes(node_id)

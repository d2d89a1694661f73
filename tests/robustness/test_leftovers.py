"""An agent that forks and exits: its restart does not run beside its children.

A real daemon runs ``agents/forking.py``; on SIGUSR1 it forks one child in its session
and one in a session of its own, then exits 3. The daemon restarts it, and before the
new instance starts, both children of the old one are gone: when the daemon spawned the
agent (its children are then the daemon's, as subreaper) and when the daemon adopted it
after a restart (its children then go to init).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.daemon.store import PROCESSES_FILE
from tests.robustness import procs
from tests.support.daemon import ALLOWED_WITH_PYTHON, DaemonProcess, spec, wait_for

pytestmark = pytest.mark.slow

FORKING = Path(__file__).resolve().parent / "agents" / "forking.py"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon", settings={"agents": {"allowed_commands": ALLOWED_WITH_PYTHON}}
    )
    process.start()
    yield process
    process.close()


def recorded_pid(daemon: DaemonProcess, agent_id: str) -> int | None:
    """The pid the daemon's processes file holds for ``agent_id`` (what it adopts)."""
    try:
        envelope = json.loads((daemon.state_dir / PROCESSES_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    entry = envelope["body"].get(agent_id)
    return int(entry["pid"]) if entry else None


@pytest.mark.parametrize("adopted", [False, True], ids=["spawned", "adopted"])
def test_an_agent_restarted_after_it_forked_and_exited_runs_without_its_predecessors_children(
    daemon: DaemonProcess, adopted: bool
) -> None:
    daemon.sync(1, [spec("forker", (sys.executable, str(FORKING)), grace=1.0)])
    first = wait_for(lambda: daemon.running().get("forker"), what="the agent running")
    if adopted:
        wait_for(lambda: recorded_pid(daemon, "forker") == first, what="the pid recorded")
        daemon.kill()
        daemon.start()
        assert daemon.running()["forker"] == first, "adopted, not restarted"
    usr1 = 1 << (signal.SIGUSR1 - 1)
    wait_for(lambda: procs.signals_caught(first) & usr1, what="the agent's SIGUSR1 handler")
    os.kill(first, signal.SIGUSR1)
    second = wait_for(
        lambda: daemon.running().get("forker") not in (None, first) and daemon.running()["forker"],
        what="the agent restarted",
    )
    if not adopted:  # an adopted agent is not the daemon's child: its status is unknown
        assert daemon.agents()["forker"].last_exit.exit_code == 3, "it forked, then exited"
    remaining = sorted(p.pid for p in procs.node_processes(daemon.node_id))
    assert remaining == [second], f"left behind: {sorted(set(remaining) - {second})}"

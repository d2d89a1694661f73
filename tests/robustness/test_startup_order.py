"""A restarted daemon listens for heartbeats before it adopts the agents that survived it.

An adopted agent's heartbeat deadline runs from its adoption; if the socket came up
later (a daemon starting on a busy host takes seconds), a healthy agent could miss
its deadline through no fault of its own and be restarted. The daemon's log shows the
order of the two steps.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import ALLOWED_WITH_PYTHON, DaemonProcess, spec, wait_for

pytestmark = pytest.mark.slow

STEADY = Path(__file__).resolve().parents[2] / "examples" / "agents" / "steady.py"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon", settings={"agents": {"allowed_commands": ALLOWED_WITH_PYTHON}}
    )
    process.start()
    yield process
    process.close()


def test_a_restarted_daemon_listens_for_heartbeats_before_it_adopts_agents(
    daemon: DaemonProcess,
) -> None:
    agent = spec("steady", (sys.executable, str(STEADY)), heartbeat=(0.5, 2.0), grace=1.0)
    daemon.sync(1, [agent])
    pid = wait_for(lambda: daemon.running().get("steady"), what="the agent healthy")
    daemon.kill()
    log_path = daemon.root / "daemon.log"
    before = len(log_path.read_text(errors="replace"))
    daemon.start()
    wait_for(lambda: daemon.running().get("steady") == pid, what="the agent adopted")
    second = log_path.read_text(errors="replace")[before:]
    listening = second.index("heartbeat socket listening")
    adopted = second.index("AgentAdopted")
    assert listening < adopted, "agents were adopted before the heartbeat socket listened"

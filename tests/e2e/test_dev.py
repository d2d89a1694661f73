"""`reconciler dev` end to end: the README's walkthrough from a second terminal."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import node_processes, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OFFSET = 20000


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    manager = f"127.0.0.1:{7060 + OFFSET}"
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args, "--manager", manager],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def agents() -> dict[str, dict[str, object]]:
    result = cli("get", "agents", "-o", "json")
    if result.returncode != 0:
        return {}
    return {a["spec"]["id"]: a for a in json.loads(result.stdout)}


def test_dev_runs_the_quickstart_and_every_command_works_beside_it(tmp_path: Path) -> None:
    log = (tmp_path / "dev.log").open("w")
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler",
            "dev",
            "--state-dir",
            str(tmp_path / "state"),
            "--port-offset",
            str(OFFSET),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        running = wait_for(
            lambda: (
                (found := agents())
                # info is null until the daemon has reported the agent
                and all(
                    (a["info"] or {}).get("phase") == "AGENT_PHASE_RUNNING" for a in found.values()
                )
                and len(found) == 4
                and found
            ),
            timeout_s=60,
            what="the quickstart agents running",
        )
        pids = {agent_id: a["info"]["pid"] for agent_id, a in running.items()}
        assert set(pids) == {"steady", "crashy", "shimmed-sleep", "plain-sleep"}

        nodes = cli("get", "nodes")
        assert nodes.returncode == 0, nodes.stderr
        assert "Ready" in nodes.stdout

        node = socket.gethostname()
        restart = cli("agent", "restart", "steady", "--node", node)
        assert restart.returncode == 0, restart.stderr
        wait_for(
            lambda: (
                (agents().get("steady", {}).get("info") or {}).get("pid")
                not in (None, pids["steady"])
            ),
            what="steady restarted",
        )
        events = cli("events")
        assert events.returncode == 0, events.stderr
        assert "steady" in events.stdout
    finally:
        dev.send_signal(signal.SIGINT)
        code = dev.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "dev.log").read_text()
    for pid in pids.values():
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    # Nor any agent started again while stopping (each carries the node's id).
    assert node_processes(socket.gethostname()) == []

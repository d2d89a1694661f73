"""``reconciler apply -f FILE --daemon ADDR``: one node's desired state without a Manager.

Real daemon processes and the real CLI: the sets that select the node become its whole
desired state as the next generation, an unchanged apply changes nothing, a dropped
agent is stopped, a bad file or agent changes nothing, and a daemon that follows a
Manager is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.api.agent.v1 import agent_pb2
from tests.support.daemon import DaemonProcess, free_port, wait_for
from tests.support.manager import agent_set_yaml, sleeper

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "daemon", settings={"node": {"labels": {"role": "edge"}}})
    process.start()
    yield process
    process.close()


def apply(daemon: DaemonProcess, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "apply", "-f", str(path), "--daemon",
         daemon.address, *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def write(path: Path, *documents: str) -> Path:
    path.write_text("---\n".join(documents))
    return path


def test_the_sets_selecting_the_node_become_its_desired_state(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    edge = agent_set_yaml(
        "edge", agents=[sleeper("a"), sleeper("b")], match_labels={"role": "edge"}
    )
    other = agent_set_yaml("other", agents=[sleeper("x")], match_labels={"role": "db"})
    pinned = agent_set_yaml("pinned", agents=[sleeper("p")], node_ids=[daemon.node_id])
    first = write(tmp_path / "first.yaml", edge, other, pinned)

    applied = apply(daemon, first, "--wait", "--timeout", "30s")
    assert applied.returncode == 0, applied.stderr
    assert f"node/{daemon.node_id} configured" in applied.stdout
    assert "generation 0 -> 1  +a +b +p" in applied.stdout
    pids = daemon.running()
    assert set(pids) == {"a", "b", "p"}, "only the sets that select the node"

    again = apply(daemon, first)
    assert again.returncode == 0, again.stderr
    assert f"node/{daemon.node_id} unchanged (generation 1)" in again.stdout
    assert daemon.list().current_generation == 1

    edge = agent_set_yaml(
        "edge", agents=[sleeper("a"), sleeper("c")], match_labels={"role": "edge"}
    )
    second = write(tmp_path / "second.yaml", edge, pinned)
    planned = apply(daemon, second, "--dry-run", "-o", "json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout) == [
        {"nodeId": daemon.node_id, "previousGeneration": 1, "generation": 2,
         "added": ["c"], "changed": [], "removed": ["b"], "dryRun": True}
    ]  # fmt: skip
    assert daemon.list().current_generation == 1, "a dry run sends nothing"

    applied = apply(daemon, second, "--wait", "--timeout", "30s")
    assert applied.returncode == 0, applied.stderr
    assert "generation 1 -> 2  +c -b" in applied.stdout
    after = wait_for(lambda: set(daemon.running()) == {"a", "c", "p"} and daemon.running())
    assert after["a"] == pids["a"], "unchanged agents kept running"
    assert after["p"] == pids["p"]


def test_a_program_named_bare_is_unchanged_when_applied_again(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    bare = {**sleeper("bare"), "command": ["sleep", "3600"]}
    path = write(tmp_path / "s.yaml", agent_set_yaml("s", agents=[bare]))
    assert apply(daemon, path, "--wait", "--timeout", "30s").returncode == 0
    (listed,) = daemon.list().agents
    assert listed.spec.command[0].endswith("/sleep"), "the daemon holds it resolved"
    again = apply(daemon, path)
    assert again.returncode == 0, again.stderr
    assert f"node/{daemon.node_id} unchanged (generation 1)" in again.stdout


def test_wait_ends_at_once_with_the_reason_when_an_agent_fails_for_good(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    broken = {"id": "broken", "command": ["/bin/false"], "restartPolicy": "Never"}
    path = write(tmp_path / "s.yaml", agent_set_yaml("s", agents=[sleeper("a"), broken]))
    failed = apply(daemon, path, "--wait", "--timeout", "5m")
    assert failed.returncode == 1
    assert "failed: agents stopped for good:" in failed.stderr
    assert f"agent broken on {daemon.node_id}: Failed" in failed.stderr


def test_wait_does_not_wait_for_an_agent_an_operator_stopped(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    path = write(tmp_path / "s.yaml", agent_set_yaml("s", agents=[sleeper("a"), sleeper("b")]))
    assert apply(daemon, path, "--wait", "--timeout", "30s").returncode == 0
    daemon.operate("b", agent_pb2.OPERATION_STOP)
    wait_for(lambda: set(daemon.running()) == {"a"})

    again = apply(daemon, path, "--wait", "--timeout", "30s")
    assert again.returncode == 0, again.stderr
    assert f"note: agent b on {daemon.node_id}: stopped by an operator" in again.stderr
    assert set(daemon.running()) == {"a"}, "an unchanged apply keeps the override"


def test_wait_counts_an_agent_that_completed_as_done(daemon: DaemonProcess, tmp_path: Path) -> None:
    job = {"id": "job", "command": ["/bin/true"], "restartPolicy": "OnFailure"}
    path = write(tmp_path / "s.yaml", agent_set_yaml("s", agents=[sleeper("a"), job]))
    applied = apply(daemon, path, "--wait", "--timeout", "30s")
    assert applied.returncode == 0, applied.stderr
    assert f"note: agent job on {daemon.node_id}: completed (exited with code 0" in (applied.stderr)


def test_a_bad_file_or_agent_changes_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", agent_set_yaml("s", agents=[sleeper("a")]))
    assert apply(daemon, good, "--wait").returncode == 0

    typo = write(tmp_path / "typo.yaml", "apiVersion: reconciler/v1\nkind: AgentSet\nspec: [")
    refused = apply(daemon, typo)
    assert refused.returncode != 0
    assert "typo.yaml" in refused.stderr

    outside = {"id": "evil", "command": ["/usr/sbin/nologin"]}
    bad = write(tmp_path / "bad.yaml", agent_set_yaml("s", agents=[sleeper("a"), outside]))
    refused = apply(daemon, bad)
    assert refused.returncode != 0
    assert "the daemon refused agent 'evil' (agents[1].command[0]): " in refused.stderr
    assert "agents.allowed_commands" in refused.stderr
    assert daemon.list().current_generation == 1
    assert set(daemon.running()) == {"a"}

    twice = write(
        tmp_path / "twice.yaml",
        agent_set_yaml("s", agents=[sleeper("a")]),
        agent_set_yaml("t", agents=[sleeper("a")]),
    )
    refused = apply(daemon, twice)
    assert refused.returncode != 0
    assert "defined by both AgentSet 's' and AgentSet 't'" in refused.stderr


def test_a_daemon_that_follows_a_manager_is_refused(tmp_path: Path) -> None:
    manager = f"127.0.0.1:{free_port()}"  # nothing listens: the daemon keeps retrying
    daemon = DaemonProcess(tmp_path / "daemon", settings={"manager": {"address": manager}})
    try:
        daemon.start()
        path = write(tmp_path / "s.yaml", agent_set_yaml("s", agents=[sleeper("a")]))
        refused = apply(daemon, path)
        assert refused.returncode != 0
        assert f"from the Manager at {manager}" in refused.stderr
        assert daemon.list().current_generation == 0
    finally:
        daemon.close()

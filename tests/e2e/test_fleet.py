"""A fleet of real processes: a ``reconciler manager``, several ``reconciler daemon``
processes and the real CLI, on SQLite and on PostgreSQL.

An AgentSet selecting nodes by label reaches exactly those nodes (checked on the
daemons and by process), ``apply --wait`` returns 0 once they converged, and applying
the same file again changes nothing. Two Manager processes on one PostgreSQL serve one
fleet: an apply through one reaches a daemon that talks only to the other.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import DaemonProcess, wait_for
from tests.support.manager import (
    Fleet,
    ManagerProcess,
    UnixSocketDaemon,
    agent_set_yaml,
    cli,
    sleeper,
)
from tests.support.postgres import isolated_schema

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def store_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """ "" for SQLite, else the DSN of a fresh schema on the test PostgreSQL."""
    if request.param == "sqlite":
        yield ""
        return
    with isolated_schema(request.getfixturevalue("postgres_dsn")) as dsn:
        yield dsn


def agent_processes(daemon: DaemonProcess) -> dict[str, tuple[int, list[str]]]:
    """agent id -> (pid, argv) of the live processes the daemon says run its agents."""
    found = {}
    for agent_id, info in daemon.agents().items():
        if info.pid:
            found[agent_id] = (info.pid, psutil.Process(info.pid).cmdline())
    return found


def converged(daemon: DaemonProcess, agent_ids: set[str]) -> bool:
    running = daemon.running()
    return set(running) == agent_ids and all(psutil.pid_exists(p) for p in running.values())


def test_an_agent_set_reaches_the_nodes_its_labels_select_and_reapplying_changes_nothing(
    fleet: Fleet, store_dsn: str, tmp_path: Path
) -> None:
    manager = fleet.manager(postgres_dsn=store_dsn)
    edge = [
        fleet.daemon(f"edge-{i}", manager_address=manager.address, labels={"role": "edge"})
        for i in (1, 2)
    ]
    core = fleet.daemon("core-1", manager_address=manager.address, labels={"role": "core"})
    manager.wait_ready_nodes({d.node_id for d in [*edge, core]})
    path = tmp_path / "edge.yaml"
    agents = [sleeper("shipper"), sleeper("tailer", "3601")]
    path.write_text(agent_set_yaml("edge-agents", agents=agents, match_labels={"role": "edge"}))

    started = time.monotonic()
    applied = cli("apply", "-f", str(path), "--wait", "--timeout", "60s", manager=manager.address)
    took_s = time.monotonic() - started
    print(f"apply --wait on {'postgres' if store_dsn else 'sqlite'}: {took_s:.2f}s")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "agentset/edge-agents created" in applied.stdout

    for daemon in edge:
        assert converged(daemon, {"shipper", "tailer"}), daemon.list()
        processes = agent_processes(daemon)
        assert processes["shipper"][1] == ["/bin/sleep", "3600"]
        assert processes["tailer"][1] == ["/bin/sleep", "3601"]
        assert {p.pid for p in daemon.node_processes()} >= {pid for pid, _ in processes.values()}
    assert core.agents() == {}
    assert core.node_processes() == []
    nodes = manager.nodes()
    assert nodes[core.node_id].desired_generation == nodes[core.node_id].observed_generation
    before = {d.node_id: (agent_processes(d), nodes[d.node_id].desired_generation) for d in edge}

    again = cli("apply", "-f", str(path), "--wait", "--timeout", "60s", manager=manager.address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "agentset/edge-agents unchanged (revision 1)" in again.stdout
    nodes = manager.nodes()
    after = {d.node_id: (agent_processes(d), nodes[d.node_id].desired_generation) for d in edge}
    assert after == before
    for daemon in edge:
        assert all(info.restart_count == 0 for info in daemon.agents().values())


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def served(manager: ManagerProcess, method: str) -> float:
    """How many calls of ManagerService ``method`` the Manager answered OK."""
    pattern = re.compile(
        r'^reconciler_grpc_server_handled_total\{[^}]*grpc_code="OK"[^}]*'
        rf'grpc_method="{method}"[^}}]*\}} (\S+)$',
        re.MULTILINE,
    )
    return sum(float(m) for m in pattern.findall(metrics_text(manager.metrics_url)))


@pytest.mark.postgres
def test_a_daemon_heartbeating_to_one_manager_converges_on_an_apply_through_another(
    fleet: Fleet, postgres_dsn: str, tmp_path: Path
) -> None:
    with isolated_schema(postgres_dsn) as dsn:
        applying = fleet.manager(postgres_dsn=dsn)
        serving = fleet.manager(postgres_dsn=dsn)
        daemon = fleet.daemon(
            "edge-1",
            manager_address=serving.address,
            labels={"role": "edge"},
            kind=UnixSocketDaemon,
        )
        applying.wait_ready_nodes({daemon.node_id})
        assert applying.nodes()[daemon.node_id].daemon_address == ""
        path = tmp_path / "edge.yaml"
        agents = [sleeper("shipper")]
        path.write_text(agent_set_yaml("edge-agents", agents=agents, match_labels={"role": "edge"}))
        pulled_before = served(serving, "GetDesiredState")

        started = time.monotonic()
        applied = cli(
            "apply", "-f", str(path), "--wait", "--timeout", "60s", manager=applying.address
        )
        print(f"converged through the other replica in {time.monotonic() - started:.2f}s")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert converged(daemon, {"shipper"}), daemon.list()
        assert psutil.Process(daemon.running()["shipper"]).cmdline() == ["/bin/sleep", "3600"]
        assert served(serving, "GetDesiredState") > pulled_before
        assert served(applying, "GetDesiredState") == 0
        fleet.close()  # before the schema is dropped


def test_the_manager_reaches_a_daemon_at_the_address_it_advertises(
    fleet: Fleet, tmp_path: Path
) -> None:
    manager = fleet.manager()
    daemon = fleet.daemon(
        "advertised",
        manager_address=manager.address,
        labels={"role": "advertised"},
        grpc={"advertise_address": "localhost"},  # a bare host takes the listen port
    )
    manager.wait_ready_nodes({daemon.node_id})
    assert manager.nodes()[daemon.node_id].daemon_address == f"localhost:{daemon.grpc_port}"
    path = tmp_path / "set.yaml"
    path.write_text(
        agent_set_yaml("advertised", agents=[sleeper("one")], match_labels={"role": "advertised"})
    )
    applied = cli("apply", "-f", str(path), "--wait", "--timeout", "60s", manager=manager.address)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    pid = daemon.running()["one"]
    restart = cli("agent", "restart", "one", "--node", daemon.node_id, manager=manager.address)
    assert restart.returncode == 0, restart.stdout + restart.stderr  # proxied through the Manager
    wait_for(lambda: daemon.running().get("one") not in (None, pid), what="one restarted")

"""The operator commands against a real Manager on port 0 with fake daemons.

The CLI runs as a real process (``python -m reconciler``), as operators run it; the
Manager and the fake daemons run in the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.api.agent.v1 import agent_pb2, node_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.api.manager.v1 import manager_pb2
from reconciler.cli.apply_cmd import convergence
from reconciler.cli.metrics_cmd import chart, human_bytes
from reconciler.manager.store.memory import MemoryStore
from tests.integration.test_manager_support import (
    FakeDaemon,
    Manager,
    fake_daemon,
    manager_settings,
    reconciler,
    running_manager,
    until,
)

SHIPPERS = """\
apiVersion: reconciler/v1
kind: AgentSet
metadata:
  name: shippers
spec:
  nodeSelector:
    matchLabels: {role: edge}
  agents:
    - id: ship
      command: [/bin/sleep, "600"]
      version: "1.0"
      labels: {team: obs}
    - id: spare
      command: [/bin/sleep, "600"]
      state: stopped
"""


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    async with running_manager(manager_settings(tmp_path), store=MemoryStore()) as running:
        yield running


@pytest.fixture
async def fleet(manager: Manager) -> AsyncIterator[dict[str, FakeDaemon]]:
    async with (
        fake_daemon("edge-1") as edge_1,
        fake_daemon("edge-2") as edge_2,
        fake_daemon("core-1") as core_1,
    ):
        await manager.register("edge-1", labels={"role": "edge"}, daemon=edge_1)
        await manager.register("edge-2", labels={"role": "edge"}, daemon=edge_2)
        await manager.register("core-1", labels={"role": "core"}, daemon=core_1)
        yield {"edge-1": edge_1, "edge-2": edge_2, "core-1": core_1}


@pytest.fixture
def shippers(tmp_path: Path) -> Path:
    path = tmp_path / "shippers.yaml"
    path.write_text(SHIPPERS)
    return path


async def report_running(manager: Manager, daemon: FakeDaemon) -> None:
    """Report what a fake daemon holds as observed: every wanted agent Running."""
    agents = [
        agent_pb2.AgentInfo(agent_id=agent_id, phase=agent_pb2.AGENT_PHASE_RUNNING, pid=100)
        for agent_id in daemon.seen.agents
    ]
    await manager.nodes.SyncAgentStates(
        manager_pb2.SyncAgentStatesRequest(
            node_id=daemon.seen.node_id,
            observed_generation=daemon.seen.generation,
            current_generation=daemon.seen.generation,
            agents=agents,
        ),
        timeout=5,
    )


def fields(text: str) -> dict[str, str]:
    """The ``Key:  value`` lines at the top of ``describe`` output."""
    head = text.split("\n\n")[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in head.splitlines())}


# --------------------------------------------------------------------------- apply


async def test_apply_creates_the_set_and_prints_the_changes_per_node(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    result = await reconciler(manager, "apply", "-f", str(shippers))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "agentset/shippers created (revision 1)",
        "  edge-1  generation 0 -> 1  +ship +spare",
        "  edge-2  generation 0 -> 1  +ship +spare",
    ]
    await until(lambda: fleet["edge-2"].seen.agents == ["ship", "spare"])
    again = await reconciler(manager, "apply", "-f", str(shippers))
    assert again.stdout == "agentset/shippers unchanged (revision 1)\n"


async def test_apply_dry_run_shows_what_would_change_and_stores_nothing(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    result = await reconciler(manager, "apply", "-f", str(shippers), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "agentset/shippers created (dry run) (revision 1)"
    listed = await manager.fleet.ListAgentSets(fleet_pb2.ListAgentSetsRequest(), timeout=5)
    assert list(listed.agent_sets) == []


async def test_apply_output_json_is_the_api_response(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    result = await reconciler(manager, "apply", "-f", str(shippers), "-o", "json")
    (response,) = json.loads(result.stdout)
    assert response["changed"] is True
    assert response["agentSet"]["spec"]["agents"][0]["restartPolicy"] == "RESTART_POLICY_ALWAYS"
    assert [c["nodeId"] for c in response["nodeChanges"]] == ["edge-1", "edge-2"]


async def test_apply_wait_returns_zero_once_the_nodes_report_their_agents_running(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    async def daemons_report() -> None:
        await until(lambda: all(fleet[n].seen.generation == 1 for n in ("edge-1", "edge-2")))
        for node_id in ("edge-1", "edge-2"):
            await report_running(manager, fleet[node_id])

    reporter = asyncio.create_task(daemons_report())
    result = await reconciler(manager, "apply", "-f", str(shippers), "--wait", "--timeout", "20s")
    await reporter
    assert result.exit_code == 0, result.stderr
    assert "agents running" in result.stderr


async def test_apply_wait_fails_with_the_reasons_at_the_timeout(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    result = await reconciler(manager, "apply", "-f", str(shippers), "--wait", "--timeout", "1s")
    assert result.exit_code == 1
    assert "not converged within 1s:" in result.stderr
    assert "agent ship on edge-1: not reported yet" in result.stderr
    assert "agent ship on edge-2: not reported yet" in result.stderr
    assert "spare" not in result.stderr  # desired stopped: not waited for


async def test_apply_wait_names_a_node_that_has_not_acted_on_its_generation(
    manager: Manager, shippers: Path
) -> None:
    await manager.register("edge-9", labels={"role": "edge"})  # no address: never pushed
    result = await reconciler(manager, "apply", "-f", str(shippers), "--wait", "--timeout", "1s")
    assert result.exit_code == 1
    assert "node edge-9: observed generation 0 < 1 (status Ready)" in result.stderr


async def test_apply_wait_fails_at_once_when_an_agent_failed_for_good(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    async def daemon_reports_failure() -> None:
        await until(lambda: all(fleet[n].seen.generation == 1 for n in ("edge-1", "edge-2")))
        await report_running(manager, fleet["edge-1"])
        failed = agent_pb2.AgentInfo(
            agent_id="ship", phase=agent_pb2.AGENT_PHASE_FAILED, message="exited with code 2"
        )
        await manager.nodes.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(
                node_id="edge-2", observed_generation=1, current_generation=1, agents=[failed]
            ),
            timeout=5,
        )

    reporter = asyncio.create_task(daemon_reports_failure())
    result = await reconciler(manager, "apply", "-f", str(shippers), "--wait", "--timeout", "60s")
    await reporter
    assert result.exit_code == 1
    assert "agent ship on edge-2: Failed (exited with code 2)" in result.stderr


async def test_a_bad_file_fails_before_anything_is_sent(manager: Manager, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(SHIPPERS.replace("state: stopped", "state: paused"))
    result = await reconciler(manager, "apply", "-f", str(path))
    assert result.exit_code == 1
    assert result.stderr == (
        f"{path}: spec.agents[1].state: must be one of running, stopped, got 'paused'\n"
    )


async def test_a_conflict_is_one_line_with_the_status_name(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path, tmp_path: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    other = tmp_path / "other.yaml"
    other.write_text(SHIPPERS.replace("name: shippers", "name: other"))
    result = await reconciler(manager, "apply", "-f", str(other))
    assert result.exit_code == 1
    assert result.stderr.startswith("FAILED_PRECONDITION: agent 'ship' on node 'edge-1'")
    assert len(result.stderr.splitlines()) == 1


async def test_an_unreachable_manager_is_one_line_naming_it(shippers: Path) -> None:
    result = await reconciler("127.0.0.1:1", "get", "nodes")
    assert result.exit_code == 1
    assert result.stderr.startswith("UNAVAILABLE: cannot reach the Manager at 127.0.0.1:1")
    assert len(result.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- get


async def test_get_nodes_lists_nodes_filtered_by_label(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    result = await reconciler(manager, "get", "nodes", "-l", "role=edge")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATUS", "AGENTS"]
    assert [line.split()[0] for line in lines[1:]] == ["edge-1", "edge-2"]
    assert all(line.split()[1] == "Ready" for line in lines[1:])


async def test_get_nodes_json_and_yaml_are_canonical_api_json(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    as_json = json.loads((await reconciler(manager, "get", "nodes", "-o", "json")).stdout)
    as_yaml = yaml.safe_load((await reconciler(manager, "get", "nodes", "-o", "yaml")).stdout)
    assert [n["nodeId"] for n in as_json] == ["core-1", "edge-1", "edge-2"]
    assert as_json[0]["status"] == "NODE_STATUS_READY"
    assert as_json[0]["observedGeneration"] == "0"
    assert [n["nodeId"] for n in as_yaml] == ["core-1", "edge-1", "edge-2"]


async def test_get_agents_shows_desired_and_observed(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    await until(lambda: fleet["edge-1"].seen.generation == 1)
    await report_running(manager, fleet["edge-1"])
    result = await reconciler(manager, "get", "agents", "--node", "edge-1")
    assert result.exit_code == 0, result.stderr
    rows = [line.split()[:4] for line in result.stdout.splitlines()]
    assert rows == [
        ["NODE", "AGENT", "PHASE", "DESIRED"],
        ["edge-1", "ship", "Running", "Running"],
        ["edge-1", "spare", "Running", "Stopped"],
    ]
    labelled = await reconciler(manager, "get", "agents", "-l", "team=obs", "-o", "json")
    assert [(a["nodeId"], a["spec"]["id"]) for a in json.loads(labelled.stdout)] == [
        ("edge-1", "ship"),
        ("edge-2", "ship"),
    ]


async def test_get_agentsets_lists_sets_and_those_selecting_a_node(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    result = await reconciler(manager, "get", "agentsets")
    assert result.stdout.splitlines()[1].split()[:4] == ["shippers", "1", "2", "role=edge"]
    on_core = await reconciler(manager, "get", "agentsets", "--node", "core-1")
    assert "shippers" not in on_core.stdout
    on_edge = await reconciler(manager, "get", "agentsets", "--node", "edge-2", "-o", "yaml")
    assert [s["metadata"]["name"] for s in yaml.safe_load(on_edge.stdout)] == ["shippers"]


# -------------------------------------------------------------------------- delete


async def test_delete_agentset_removes_its_agents_from_the_nodes(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    result = await reconciler(manager, "delete", "agentset", "shippers")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "agentset/shippers deleted",
        "  edge-1  generation 1 -> 2  -ship -spare",
        "  edge-2  generation 1 -> 2  -ship -spare",
    ]
    await until(lambda: fleet["edge-1"].seen.generation == 2 and not fleet["edge-1"].seen.agents)
    missing = await reconciler(manager, "delete", "agentset", "shippers")
    assert missing.exit_code == 1
    assert missing.stderr == "NOT_FOUND: AgentSet 'shippers' not found\n"


async def test_delete_node_forgets_the_node_and_names_its_status(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    result = await reconciler(manager, "delete", "node", "core-1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "node/core-1 deleted (was Ready)\n"
    nodes = await reconciler(manager, "get", "nodes", "-o", "json")
    assert [n["nodeId"] for n in json.loads(nodes.stdout)] == ["edge-1", "edge-2"]
    missing = await reconciler(manager, "delete", "node", "core-1")
    assert missing.exit_code == 1
    assert missing.stderr == "NOT_FOUND: node 'core-1' not found\n"


# ------------------------------------------------- events, agent, metrics, describe


async def test_events_lists_the_stored_events_and_filters_by_node(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    result = await reconciler(manager, "events")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split()[:5] == ["TIME", "TYPE", "NODE", "AGENT", "MESSAGE"]
    assert "AgentSetApplied" in result.stdout
    as_json = json.loads((await reconciler(manager, "events", "-o", "json")).stdout)
    assert [e["type"] for e in as_json] == ["EVENT_TYPE_NODE_REGISTERED"] * 3 + [
        "EVENT_TYPE_AGENT_SET_APPLIED"
    ]
    assert [e["sequence"] for e in as_json] == ["1", "2", "3", "4"]
    on_core = await reconciler(manager, "events", "--node", "core-1", "-o", "json")
    assert [(e["nodeId"], e["type"]) for e in json.loads(on_core.stdout)] == [
        ("core-1", "EVENT_TYPE_NODE_REGISTERED")
    ]


async def test_events_follow_prints_new_events_as_they_come(manager: Manager) -> None:
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "events",
        "--follow",
        "-o",
        "json",
        "--node",
        "late",
        "--manager",
        manager.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert follower.stdout is not None
    try:
        line = asyncio.create_task(follower.stdout.readline())

        async def registered_and_printed() -> bool:
            await manager.register("late")  # again until the follower, once started, sees one
            return line.done()

        await until(registered_and_printed, what="a followed event")
        event = json.loads(line.result())
        assert (event["nodeId"], event["type"]) == ("late", "EVENT_TYPE_NODE_REGISTERED")
        assert follower.returncode is None
    finally:
        follower.terminate()
        await follower.wait()


async def test_agent_restart_is_proxied_through_the_manager(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    await until(lambda: fleet["edge-1"].seen.agents == ["ship", "spare"])
    result = await reconciler(
        manager, "agent", "restart", "ship", "--node", "edge-1", "--operation-id", "op-7"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "agent ship on edge-1: restart: done\n"
    (operation,) = fleet["edge-1"].seen.operations
    assert (operation.agent_id, operation.operation_id) == ("ship", "op-7")
    assert operation.operation == agent_pb2.OPERATION_RESTART


async def test_agent_without_node_is_refused_when_the_agent_is_on_several_nodes(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    result = await reconciler(manager, "agent", "stop", "ship")
    assert result.exit_code == 1
    assert result.stderr == "agent 'ship' is on several nodes (edge-1, edge-2): use --node\n"


async def test_agent_on_an_unknown_agent_relays_not_found(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    result = await reconciler(manager, "agent", "start", "ghost", "--node", "edge-1")
    assert result.exit_code == 1
    assert result.stderr == "NOT_FOUND: upstream call failed: agent 'ghost' not found\n"


async def test_metrics_draws_a_chart_of_cpu_and_memory(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    result = await reconciler(manager, "metrics", "ship", "--node", "edge-1", "--since", "10m")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("agent ship on edge-1: 5 samples from ")
    assert "CPU %    max 40.0  avg 20.0  last 40.0" in lines
    assert "Memory   max 4.8 MiB  last 4.8 MiB" in lines
    cpu_top = lines[lines.index("CPU %    max 40.0  avg 20.0  last 40.0") + 1]
    assert cpu_top.endswith("┤    █")
    as_json = await reconciler(manager, "metrics", "ship", "--node", "edge-1", "-o", "json")
    assert len(json.loads(as_json.stdout)["dataPoints"]) == 5


async def test_describe_node_shows_its_registration_agents_and_events(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    await until(lambda: fleet["edge-1"].seen.generation == 1)
    result = await reconciler(manager, "describe", "node", "edge-1")
    assert result.exit_code == 0, result.stderr
    shown = fields(result.stdout)
    assert shown["Node"] == "edge-1"
    assert shown["Status"].startswith("Ready (last heartbeat ")
    assert shown["Labels"] == "role=edge"
    assert shown["Generations"] == "desired 1, observed 1"
    assert "Agents (2):" in result.stdout
    assert "NodeRegistered" in result.stdout
    missing = await reconciler(manager, "describe", "node", "nope")
    assert (missing.exit_code, missing.stderr) == (1, "NOT_FOUND: node 'nope' not found\n")


async def test_describe_agent_shows_spec_status_metrics_and_events(
    manager: Manager, fleet: dict[str, FakeDaemon], shippers: Path
) -> None:
    await reconciler(manager, "apply", "-f", str(shippers))
    await until(lambda: fleet["edge-1"].seen.generation == 1)
    await report_running(manager, fleet["edge-1"])
    result = await reconciler(manager, "describe", "agent", "ship", "--node", "edge-1")
    assert result.exit_code == 0, result.stderr
    shown = fields(result.stdout)
    assert shown["Command"] == "/bin/sleep 600"
    assert shown["Desired"] == "Running, restart policy Always, version 1.0"
    assert shown["Phase"] == "Running"
    assert shown["PID"].startswith("100 (started ")
    assert shown["Metrics"].startswith("cpu avg 20.0% max 40.0%, memory last 4.8 MiB")
    as_yaml = yaml.safe_load(
        (
            await reconciler(manager, "describe", "agent", "ship", "--node", "edge-1", "-o", "yaml")
        ).stdout
    )
    assert as_yaml["agent"]["info"]["phase"] == "AGENT_PHASE_RUNNING"
    assert len(as_yaml["metrics"]["dataPoints"]) == 5


# ------------------------------------------------------------- pure helpers


def node_info(node_id: str, *, desired: int, observed: int) -> Any:
    return node_pb2.NodeInfo(
        node_id=node_id,
        desired_generation=desired,
        observed_generation=observed,
        status=node_pb2.NODE_STATUS_READY,
    )


def agent_state(
    node_id: str, agent_id: str, phase: int, *, running: bool = True, override: int = 0
) -> Any:
    state = agent_pb2.AgentState(node_id=node_id)
    state.info.override = override  # type: ignore[assignment]
    state.spec.id = agent_id
    state.spec.state = (
        agent_pb2.DESIRED_STATE_RUNNING if running else agent_pb2.DESIRED_STATE_STOPPED
    )
    state.info.agent_id = agent_id
    state.info.phase = phase  # type: ignore[assignment]
    return state


RUNNING = agent_pb2.AGENT_PHASE_RUNNING


@pytest.mark.parametrize(
    ("nodes", "agents", "converged", "failed"),
    [
        pytest.param(
            [node_info("n1", desired=2, observed=2)],
            [agent_state("n1", "a", RUNNING)],
            True,
            False,
            id="acted-and-running",
        ),
        pytest.param(
            [node_info("n1", desired=2, observed=1)],
            [agent_state("n1", "a", RUNNING)],
            False,
            False,
            id="running-but-not-acted-on-the-new-generation",
        ),
        pytest.param(
            [node_info("n1", desired=3, observed=2)],
            [agent_state("n1", "a", RUNNING)],
            False,
            False,
            id="a-newer-generation-since-the-apply",
        ),
        pytest.param(
            [node_info("n1", desired=2, observed=2)],
            [agent_state("n1", "a", agent_pb2.AGENT_PHASE_BACKOFF)],
            False,
            False,
            id="backing-off-is-pending",
        ),
        pytest.param(
            [node_info("n1", desired=2, observed=2)],
            [agent_state("n1", "a", agent_pb2.AGENT_PHASE_FAILED)],
            False,
            True,
            id="failed-for-good",
        ),
        pytest.param(
            [node_info("n1", desired=2, observed=1)],
            [agent_state("n1", "a", agent_pb2.AGENT_PHASE_FAILED)],
            False,
            False,
            id="failed-under-the-old-generation-is-still-pending",
        ),
        pytest.param(
            [node_info("n1", desired=2, observed=2)],
            [agent_state("n1", "a", agent_pb2.AGENT_PHASE_STOPPED, running=False)],
            True,
            False,
            id="desired-stopped-is-not-waited-for",
        ),
        pytest.param(
            [node_info("n1", desired=2, observed=2)],
            [
                agent_state("n1", "a", RUNNING),
                agent_state(
                    "n1", "b", agent_pb2.AGENT_PHASE_STOPPED, override=agent_pb2.OVERRIDE_STOP
                ),
            ],
            True,
            False,
            id="held-stopped-by-an-operator-is-not-waited-for",
        ),
        pytest.param([], [], False, False, id="node-gone"),
    ],
)
def test_convergence_needs_the_new_generation_acted_on_and_agents_running(
    nodes: list[Any], agents: list[Any], converged: bool, failed: bool
) -> None:
    held = any(a.info.override == agent_pb2.OVERRIDE_STOP for a in agents)
    state = convergence({"n1": 0 if held else 2}, nodes, agents)
    assert (state.converged, bool(state.failed)) == (converged, failed)


def test_an_agent_held_stopped_is_named_and_left_out_of_the_count() -> None:
    held = agent_state("n1", "b", agent_pb2.AGENT_PHASE_STOPPED, override=agent_pb2.OVERRIDE_STOP)
    nodes = [node_info("n1", desired=2, observed=2)]
    state = convergence({"n1": 0}, nodes, [agent_state("n1", "a", RUNNING), held])
    assert (state.agents_total, state.agents_running) == (1, 1)
    assert state.left_out == (
        "agent b on n1: stopped by an operator (`reconciler agent start` resumes it)",
    )
    assert state.converged


@pytest.mark.parametrize(
    ("policy", "exit_code", "done"),
    [
        pytest.param(agent_pb2.RESTART_POLICY_ON_FAILURE, 0, True, id="on-failure-exit-0"),
        pytest.param(agent_pb2.RESTART_POLICY_NEVER, 0, True, id="never-exit-0"),
        pytest.param(agent_pb2.RESTART_POLICY_ALWAYS, 0, False, id="always-is-restarted"),
        pytest.param(agent_pb2.RESTART_POLICY_ON_FAILURE, 3, False, id="on-failure-exit-3"),
    ],
)
def test_an_agent_that_completed_is_done(policy: int, exit_code: int, done: bool) -> None:
    job = agent_state("n1", "job", agent_pb2.AGENT_PHASE_STOPPED)
    job.spec.restart_policy = policy  # type: ignore[assignment]
    job.info.last_exit.exit_code = exit_code
    state = convergence({"n1": 2}, [node_info("n1", desired=2, observed=2)], [job])
    assert state.converged is done
    if done:
        name = agent_pb2.RestartPolicy.Name(policy).removeprefix("RESTART_POLICY_")
        assert state.left_out[0].startswith("agent job on n1: completed (exited with code 0")
        assert name.replace("_", "").lower() in state.left_out[0].lower()


def test_an_override_on_a_node_the_apply_changed_is_waited_out() -> None:
    # The new generation cleared it; the Manager may still hold the report before.
    stale = agent_state("n1", "b", agent_pb2.AGENT_PHASE_STOPPED, override=agent_pb2.OVERRIDE_STOP)
    state = convergence({"n1": 2}, [node_info("n1", desired=2, observed=2)], [stale])
    assert not state.left_out
    assert state.pending == ("agent b on n1: Stopped",)


def test_the_chart_scales_to_the_maximum_in_eighths() -> None:
    assert chart([0, 1, 2, 4], height=2, width=10) == ["   █", " ▄██"]
    assert chart([], height=1) == [""]
    assert chart([0, 0], height=1) == ["  "]


def test_the_chart_keeps_the_peak_of_each_column_when_squeezed() -> None:
    values = [0.0] * 100
    values[37] = 8.0
    (row,) = chart(values, height=1, width=10)
    assert row == "   █      "


@pytest.mark.parametrize(
    ("size", "text"),
    [
        pytest.param(512, "512 B", id="bytes"),
        pytest.param(1536, "1.5 KiB", id="kib"),
        pytest.param(5 * 1024**3, "5.0 GiB", id="gib"),
    ],
)
def test_sizes_are_shown_in_binary_units(size: int, text: str) -> None:
    assert human_bytes(size) == text


async def test_get_watch_prints_again_when_the_answer_changes(manager: Manager) -> None:
    await manager.register("first")
    watcher = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "reconciler", "get", "nodes", "--watch", "--manager", manager.address),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert watcher.stdout is not None
    seen: list[str] = []

    async def read_lines() -> None:
        assert watcher.stdout is not None
        while line := await watcher.stdout.readline():
            seen.append(line.decode())

    reader = asyncio.create_task(read_lines())
    try:
        await until(lambda: any(line.startswith("first ") for line in seen), what="a table")
        await manager.register("second")
        await until(lambda: any(line.startswith("second ") for line in seen), what="a reprint")
        assert sum(line.startswith("NODE ") for line in seen) == 2
    finally:
        watcher.terminate()
        await watcher.wait()
        await reader

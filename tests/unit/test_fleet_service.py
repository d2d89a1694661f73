"""ManagerService and FleetService on the memory store: real gRPC on port 0, fake daemons."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from reconciler.api.agent.v1 import agent_pb2, event_pb2, metrics_pb2, node_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.api.manager.v1 import manager_pb2
from reconciler.config import TelemetryExporter
from reconciler.convert import specs_from_json, timestamp
from reconciler.manager.agentset import check_agent_set
from reconciler.manager.fleet import FleetChanges
from reconciler.manager.records import AgentSetRecord, NodeRecord
from reconciler.manager.service import EventLog
from reconciler.manager.store.memory import MemoryStore
from reconciler.telemetry import ExportPlan, SpanCounters, Tracing
from tests.integration.test_manager_support import (
    FakeDaemon,
    Manager,
    agent_set,
    fake_daemon,
    manager_settings,
    running_manager,
    until,
)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    async with running_manager(manager_settings(tmp_path), store=MemoryStore()) as running:
        yield running


@pytest.fixture
async def fleet(manager: Manager) -> AsyncIterator[dict[str, FakeDaemon]]:
    """Three registered nodes with fake daemons: two edge nodes and one core node."""
    async with (
        fake_daemon("edge-1") as edge_1,
        fake_daemon("edge-2") as edge_2,
        fake_daemon("core-1") as core_1,
    ):
        await manager.register("edge-1", labels={"role": "edge"}, daemon=edge_1)
        await manager.register("edge-2", labels={"role": "edge"}, daemon=edge_2)
        await manager.register("core-1", labels={"role": "core"}, daemon=core_1)
        yield {"edge-1": edge_1, "edge-2": edge_2, "core-1": core_1}


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# ----------------------------------------------------------------- apply and push


async def test_applying_a_set_pushes_its_agents_to_the_selected_nodes_only(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    response = await manager.apply(agent_set("shippers", "ship", "tail", labels={"role": "edge"}))
    assert response.changed
    assert response.agent_set.metadata.revision == 1
    assert [(c.node_id, list(c.added_agent_ids), c.generation) for c in response.node_changes] == [
        ("edge-1", ["ship", "tail"], 1),
        ("edge-2", ["ship", "tail"], 1),
    ]
    await until(lambda: fleet["edge-1"].seen.accepted == [1] and fleet["edge-2"].seen.accepted)
    assert fleet["edge-2"].seen.agents == ["ship", "tail"]
    await manager.app.pusher.idle()
    assert fleet["core-1"].seen.calls == []


async def test_applying_the_same_set_twice_changes_nothing_the_second_time(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    first = await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    await manager.app.pusher.idle()
    second = await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    await manager.app.pusher.idle()
    assert not second.changed
    assert list(second.node_changes) == []
    assert second.agent_set.metadata.revision == first.agent_set.metadata.revision == 1
    assert len(fleet["edge-1"].seen.calls) == 1
    assert (await manager.node("edge-1")).desired_generation == 1


async def test_a_dry_run_shows_the_changes_and_stores_and_pushes_nothing(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    response = await manager.apply(agent_set("all", "a"), dry_run=True)
    assert response.changed
    assert [c.node_id for c in response.node_changes] == ["core-1", "edge-1", "edge-2"]
    listed = await manager.fleet.ListAgentSets(fleet_pb2.ListAgentSetsRequest(), timeout=5)
    assert list(listed.agent_sets) == []
    await manager.app.pusher.idle()
    assert all(not daemon.seen.calls for daemon in fleet.values())
    assert (await manager.node("core-1")).desired_generation == 0


async def test_a_changed_spec_gives_the_affected_nodes_a_new_generation(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    response = await manager.apply(
        agent_set("shippers", "ship", labels={"role": "edge"}, version="2")
    )
    assert [
        (c.node_id, list(c.changed_agent_ids), c.generation) for c in response.node_changes
    ] == [
        ("edge-1", ["ship"], 2),
        ("edge-2", ["ship"], 2),
    ]
    assert response.agent_set.metadata.revision == 2
    await until(lambda: fleet["edge-1"].seen.generation == 2)


async def test_two_sets_defining_one_agent_on_a_node_are_refused_naming_both(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    error = await rpc_error(manager.apply(agent_set("pinned", "ship", node_ids=("edge-2",))))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "'pinned'" in (error.details() or "")
    assert "'shippers'" in (error.details() or "")
    assert "'edge-2'" in (error.details() or "")
    assert (await manager.node("edge-2")).desired_generation == 1


async def test_deleting_a_set_removes_its_agents_with_a_new_generation(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    await until(lambda: fleet["edge-1"].seen.generation == 1)
    response = await manager.fleet.DeleteAgentSet(
        fleet_pb2.DeleteAgentSetRequest(name="shippers"), timeout=5
    )
    assert response.changed
    assert [(c.node_id, list(c.removed_agent_ids)) for c in response.node_changes] == [
        ("edge-1", ["ship"]),
        ("edge-2", ["ship"]),
    ]
    await until(lambda: fleet["edge-1"].seen.generation == 2 and fleet["edge-1"].seen.agents == [])
    error = await rpc_error(
        manager.fleet.GetAgentSet(fleet_pb2.GetAgentSetRequest(name="shippers"), timeout=5)
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_deleting_an_unknown_set_is_not_found(manager: Manager) -> None:
    error = await rpc_error(
        manager.fleet.DeleteAgentSet(fleet_pb2.DeleteAgentSetRequest(name="nope"), timeout=5)
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_a_stale_expected_revision_is_aborted(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("s", "a"))
    error = await rpc_error(manager.apply(agent_set("s", "a", version="2"), expected_revision=7))
    assert error.code() is grpc.StatusCode.ABORTED
    ok = await manager.apply(agent_set("s", "a", version="2"), expected_revision=1)
    assert ok.agent_set.metadata.revision == 2


async def test_a_node_registering_later_gets_its_desired_state_at_registration(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    async with fake_daemon("edge-3") as late:
        response = await manager.register("edge-3", labels={"role": "edge"}, daemon=late)
        assert response.desired_generation == 1
        await until(lambda: late.seen.agents == ["ship"])


async def test_a_relabelled_node_gets_a_new_desired_state_when_it_registers_again(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    response = await manager.register("core-1", labels={"role": "edge"}, daemon=fleet["core-1"])
    assert response.desired_generation == 1
    await until(lambda: fleet["core-1"].seen.agents == ["ship"])


async def test_a_daemon_holding_a_newer_generation_than_a_fresh_manager_gets_one_above_it(
    manager: Manager,
) -> None:
    await manager.apply(agent_set("all", "a"))
    async with fake_daemon("old-1") as daemon:
        daemon.seen.generation = 41
        response = await manager.register("old-1", daemon=daemon, current_generation=41)
        assert response.desired_generation == 42
        await until(lambda: daemon.seen.accepted == [42])


async def test_getting_and_listing_sets_shows_their_bookkeeping(manager: Manager) -> None:
    await manager.apply(agent_set("b-set", "a"))
    await manager.apply(agent_set("a-set", "b"))
    listed = await manager.fleet.ListAgentSets(fleet_pb2.ListAgentSetsRequest(), timeout=5)
    assert [s.metadata.name for s in listed.agent_sets] == ["a-set", "b-set"]
    got = await manager.fleet.GetAgentSet(fleet_pb2.GetAgentSetRequest(name="a-set"), timeout=5)
    assert got.agent_set.metadata.revision == 1
    assert got.agent_set.metadata.created_at.seconds > 0
    assert got.agent_set.spec.agents[0].id == "b"


# ------------------------------------------------------------------ push retries


async def test_a_push_retries_unavailable_and_acts_once(manager: Manager) -> None:
    async with fake_daemon("flaky") as daemon:
        daemon.fail_next(grpc.StatusCode.UNAVAILABLE, times=2)
        await manager.register("flaky", daemon=daemon)
        await manager.apply(agent_set("all", "a"))
        await until(lambda: daemon.seen.accepted == [1])
        await manager.app.pusher.idle()
        assert len(daemon.seen.calls) == 3
        assert daemon.seen.accepted == [1]


async def test_a_daemon_refusing_with_failed_precondition_is_not_retried(
    manager: Manager,
) -> None:
    async with fake_daemon("ahead") as daemon:
        daemon.fail_next(grpc.StatusCode.FAILED_PRECONDITION, times=3)
        await manager.register("ahead", daemon=daemon)
        await manager.apply(agent_set("all", "a"))
        await until(lambda: len(daemon.seen.calls) == 1)
        await manager.app.pusher.idle()
        assert len(daemon.seen.calls) == 1


async def test_a_push_gives_up_after_max_attempts(manager: Manager) -> None:
    async with fake_daemon("down") as daemon:
        daemon.fail_next(grpc.StatusCode.UNAVAILABLE, times=50)
        await manager.register("down", daemon=daemon)
        await manager.apply(agent_set("all", "a"))
        await until(lambda: len(daemon.seen.calls) >= 5)
        await manager.app.pusher.idle()
        assert len(daemon.seen.calls) == 5


async def test_a_daemon_that_missed_the_push_sees_the_generation_in_heartbeats_and_pulls(
    manager: Manager,
) -> None:
    await manager.register("pull-only")
    await manager.apply(agent_set("all", "a", "b"))
    beat = await manager.nodes.Heartbeat(
        manager_pb2.HeartbeatRequest(node_id="pull-only"), timeout=5
    )
    assert (beat.known, beat.desired_generation) == (True, 1)
    pulled = await manager.nodes.GetDesiredState(
        manager_pb2.GetDesiredStateRequest(node_id="pull-only"), timeout=5
    )
    assert (pulled.generation, [a.id for a in pulled.agents]) == (1, ["a", "b"])
    assert pulled.agents[0].restart_policy == agent_pb2.RESTART_POLICY_ALWAYS


# ------------------------------------------------------------- ManagerService


async def test_a_heartbeat_from_an_unknown_node_answers_known_false(manager: Manager) -> None:
    beat = await manager.nodes.Heartbeat(manager_pb2.HeartbeatRequest(node_id="ghost"), timeout=5)
    assert (beat.known, beat.desired_generation) == (False, 0)
    assert beat.server_time.seconds > 0


async def test_a_heartbeat_reaches_the_store_behind_its_answer(tmp_path: Path) -> None:
    store = MemoryStore()
    async with running_manager(manager_settings(tmp_path), store=store) as manager:
        await manager.register("n1")
        registered = await store.get_node("n1")
        assert registered is not None
        request = manager_pb2.HeartbeatRequest(node_id="n1", current_generation=0)
        await manager.nodes.Heartbeat(request, timeout=5)

        async def stored() -> bool:
            node = await store.get_node("n1")
            return node is not None and node.last_heartbeat_at > registered.last_heartbeat_at

        await until(stored, what="n1's heartbeat in the store")


async def test_a_heartbeat_is_answered_while_the_store_is_down_and_stored_once_it_is_back(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    async with running_manager(manager_settings(tmp_path), store=store) as manager:
        await manager.register("n1")
        await manager.apply(agent_set("all", "a"))
        store.set_available(False)
        beat = await manager.nodes.Heartbeat(
            manager_pb2.HeartbeatRequest(node_id="n1", current_generation=1), timeout=5
        )
        assert (beat.known, beat.desired_generation) == (True, 1)
        store.set_available(True)

        async def stored() -> bool:
            node = await store.get_node("n1")
            return node is not None and node.current_generation == 1

        await until(stored, what="the heartbeat written after the outage")


async def test_re_registering_keeps_the_identity_and_desired_generation(manager: Manager) -> None:
    first = await manager.register("n1")
    await manager.apply(agent_set("all", "a"))
    again = await manager.register("n1", current_generation=1)
    assert again.registered_at == first.registered_at
    assert again.desired_generation == 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(manager_pb2.RegisterNodeRequest(node_id="bad id"), "node_id", id="node-id"),
        pytest.param(manager_pb2.RegisterNodeRequest(node_id="n", ip="not-an-ip"), "ip", id="ip"),
        pytest.param(
            manager_pb2.RegisterNodeRequest(node_id="n", daemon_address="nohost"),
            "daemon_address",
            id="address",
        ),
        pytest.param(
            manager_pb2.RegisterNodeRequest(node_id="n", labels={"": "x"}), "labels", id="label"
        ),
        pytest.param(
            manager_pb2.RegisterNodeRequest(node_id="n", hostname="h" * 300),
            "hostname",
            id="hostname",
        ),
    ],
)
async def test_a_malformed_registration_is_refused_naming_the_field(
    manager: Manager, request_: manager_pb2.RegisterNodeRequest, field: str
) -> None:
    error = await rpc_error(manager.nodes.RegisterNode(request_, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}:")
    listed = await manager.fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
    assert list(listed.nodes) == []


@pytest.mark.parametrize(
    "call",
    [
        pytest.param("ReportMetrics", id="metrics"),
        pytest.param("SyncAgentStates", id="sync"),
        pytest.param("GetDesiredState", id="pull"),
    ],
)
async def test_calls_from_an_unregistered_node_fail_with_failed_precondition(
    manager: Manager, call: str
) -> None:
    requests = {
        "ReportMetrics": manager_pb2.ReportMetricsRequest(node_id="ghost"),
        "SyncAgentStates": manager_pb2.SyncAgentStatesRequest(node_id="ghost"),
        "GetDesiredState": manager_pb2.GetDesiredStateRequest(node_id="ghost"),
    }
    error = await rpc_error(getattr(manager.nodes, call)(requests[call], timeout=5))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "RegisterNode" in (error.details() or "")


async def test_observed_states_and_events_show_in_list_agents_and_the_event_stream(
    manager: Manager,
) -> None:
    await manager.register("n1")
    await manager.apply(agent_set("all", "a", "b", agent_labels={"team": "obs"}))
    running = agent_pb2.AgentInfo(agent_id="a", phase=agent_pb2.AGENT_PHASE_RUNNING, pid=42)
    unmanaged = agent_pb2.AgentInfo(agent_id="stray", phase=agent_pb2.AGENT_PHASE_RUNNING)
    started = event_pb2.Event(
        type=event_pb2.EVENT_TYPE_AGENT_STARTED, agent_id="a", reason="Started", message="pid 42"
    )
    response = await manager.nodes.SyncAgentStates(
        manager_pb2.SyncAgentStatesRequest(
            node_id="n1",
            observed_generation=1,
            current_generation=1,
            agents=[running, unmanaged],
            events=[started],
        ),
        timeout=5,
    )
    assert (response.desired_generation, response.accepted_events) == (1, 1)
    listed = await manager.fleet.ListAgents(fleet_pb2.ListAgentsRequest(node_id="n1"), timeout=5)
    shown = {(a.info.agent_id or a.spec.id): a for a in listed.agents}
    assert sorted(shown) == ["a", "b", "stray"]
    assert shown["a"].info.phase == agent_pb2.AGENT_PHASE_RUNNING
    assert shown["a"].spec.version == "1"
    assert not shown["b"].HasField("info")
    assert not shown["stray"].HasField("spec")
    by_label = await manager.fleet.ListAgents(
        fleet_pb2.ListAgentsRequest(label_selector={"team": "obs"}), timeout=5
    )
    assert [a.spec.id for a in by_label.agents] == ["a", "b"]
    by_set = await manager.fleet.ListAgents(fleet_pb2.ListAgentsRequest(agent_set="all"), timeout=5)
    assert [a.spec.id for a in by_set.agents] == ["a", "b"]
    node = await manager.node("n1")
    assert (node.observed_generation, node.agent_count) == (1, 2)

    stream = manager.fleet.WatchEvents(
        fleet_pb2.WatchEventsRequest(node_id="n1", since=timestamp(0)), timeout=10
    )
    kinds = []
    async for event in stream:
        kinds.append((event.type, event.agent_id, event.sequence > 0))
        if event.type == event_pb2.EVENT_TYPE_AGENT_STARTED:
            break
    stream.cancel()
    assert kinds[-1] == (event_pb2.EVENT_TYPE_AGENT_STARTED, "a", True)
    assert kinds[0][0] == event_pb2.EVENT_TYPE_NODE_REGISTERED


async def test_a_deleted_node_is_forgotten_and_a_live_daemon_registers_again_above_it(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    await manager.apply(agent_set("shippers", "ship", "tail", labels={"role": "edge"}))
    await until(lambda: fleet["edge-1"].seen.accepted == [1, 2])
    deleted = await manager.fleet.DeleteNode(
        fleet_pb2.DeleteNodeRequest(node_id="edge-1"), timeout=5
    )
    assert (deleted.node.node_id, deleted.node.agent_count) == ("edge-1", 2)
    assert deleted.node.status == node_pb2.NODE_STATUS_READY
    listed = await manager.fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
    assert [n.node_id for n in listed.nodes] == ["core-1", "edge-2"]
    agents = await manager.fleet.ListAgents(fleet_pb2.ListAgentsRequest(), timeout=5)
    assert {a.node_id for a in agents.agents} == {"edge-2"}
    again = await rpc_error(
        manager.fleet.DeleteNode(fleet_pb2.DeleteNodeRequest(node_id="edge-1"), timeout=5)
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND

    stream = manager.fleet.WatchEvents(
        fleet_pb2.WatchEventsRequest(node_id="edge-1", since=timestamp(0)), timeout=10
    )
    async for event in stream:
        if event.type == event_pb2.EVENT_TYPE_NODE_DELETED:
            assert event.message == "node edge-1 deleted (was Ready)"
            break
    stream.cancel()

    response = await manager.register(
        "edge-1", labels={"role": "edge"}, daemon=fleet["edge-1"], current_generation=2
    )
    assert response.desired_generation == 2, "its generation kept, never back to 1"
    assert (await manager.node("edge-1")).agent_count == 2
    assert fleet["edge-1"].seen.accepted == [1, 2], "nothing new to push"


@pytest.mark.parametrize(
    ("node_id", "code"),
    [
        pytest.param("", grpc.StatusCode.INVALID_ARGUMENT, id="empty"),
        pytest.param("bad id!", grpc.StatusCode.INVALID_ARGUMENT, id="malformed"),
        pytest.param("ghost", grpc.StatusCode.NOT_FOUND, id="unknown"),
    ],
)
async def test_deleting_a_node_that_is_not_there_changes_nothing(
    manager: Manager, node_id: str, code: grpc.StatusCode
) -> None:
    await manager.register("n1")
    error = await rpc_error(
        manager.fleet.DeleteNode(fleet_pb2.DeleteNodeRequest(node_id=node_id), timeout=5)
    )
    assert error.code() == code
    listed = await manager.fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
    assert [n.node_id for n in listed.nodes] == ["n1"]


async def test_a_report_naming_another_node_in_an_event_is_refused(manager: Manager) -> None:
    await manager.register("n1")
    event = event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_STARTED, node_id="n2")
    error = await rpc_error(
        manager.nodes.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(node_id="n1", events=[event]), timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("events[0].node_id")


async def test_a_node_without_heartbeats_turns_not_ready_and_its_agents_unknown(
    tmp_path: Path,
) -> None:
    settings = manager_settings(tmp_path, not_ready_after_s=0.3)
    async with running_manager(settings, store=MemoryStore()) as manager:
        await manager.register("quiet")
        await manager.apply(agent_set("all", "a"))
        info = agent_pb2.AgentInfo(agent_id="a", phase=agent_pb2.AGENT_PHASE_RUNNING)
        await manager.nodes.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(node_id="quiet", agents=[info]), timeout=5
        )

        async def status() -> int:
            return int((await manager.node("quiet")).status)

        async def not_ready() -> bool:
            return await status() == node_pb2.NODE_STATUS_NOT_READY

        assert await status() == node_pb2.NODE_STATUS_READY
        await until(not_ready, what="NotReady", deadline_s=10)
        listed = await manager.fleet.ListAgents(fleet_pb2.ListAgentsRequest(), timeout=5)
        assert [a.info.phase for a in listed.agents] == [agent_pb2.AGENT_PHASE_UNKNOWN]
        assert "NotReady" in listed.agents[0].info.message
        not_ready = await manager.fleet.ListNodes(
            fleet_pb2.ListNodesRequest(status=node_pb2.NODE_STATUS_NOT_READY), timeout=5
        )
        assert [n.node_id for n in not_ready.nodes] == ["quiet"]
        await manager.nodes.Heartbeat(manager_pb2.HeartbeatRequest(node_id="quiet"), timeout=5)
        assert await status() == node_pb2.NODE_STATUS_READY


async def test_reported_metrics_answer_for_a_node_the_manager_cannot_call(
    manager: Manager,
) -> None:
    await manager.register("nat-node")
    now = time.time()
    points = [
        metrics_pb2.ResourceDataPoint(timestamp=timestamp(now - 1), cpu_percent=5, memory_bytes=7),
        metrics_pb2.ResourceDataPoint(timestamp=timestamp(now - 99999), cpu_percent=1),
    ]
    response = await manager.nodes.ReportMetrics(
        manager_pb2.ReportMetricsRequest(
            node_id="nat-node", metrics=[metrics_pb2.MetricData(agent_id="a", data_points=points)]
        ),
        timeout=5,
    )
    assert response.accepted_points == 1
    query = metrics_pb2.AgentMetricsRequest(agent_id="a", duration_seconds=600)
    answer = await manager.fleet.GetAgentMetrics(
        fleet_pb2.GetAgentMetricsRequest(node_id="nat-node", request=query), timeout=5
    )
    assert [(p.cpu_percent, p.memory_bytes) for p in answer.data_points] == [(5.0, 7)]
    error = await rpc_error(
        manager.fleet.GetAgentMetrics(
            fleet_pb2.GetAgentMetricsRequest(
                node_id="nat-node", request=metrics_pb2.AgentMetricsRequest(agent_id="b")
            ),
            timeout=5,
        )
    )
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION


# --------------------------------------------------------- proxied to daemons


async def test_operations_are_proxied_to_the_node_and_daemon_errors_relayed(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("shippers", "ship", labels={"role": "edge"}))
    await until(lambda: fleet["edge-1"].seen.agents == ["ship"])
    operation = agent_pb2.AgentOperationRequest(
        agent_id="ship", operation=agent_pb2.OPERATION_RESTART, operation_id="op-1"
    )
    answer = await manager.fleet.OperateAgent(
        fleet_pb2.OperateAgentRequest(node_id="edge-1", request=operation), timeout=5
    )
    assert (answer.agent_id, answer.operation_id) == ("ship", "op-1")
    assert fleet["edge-1"].seen.operations == [operation]
    missing = agent_pb2.AgentOperationRequest(agent_id="nope", operation=agent_pb2.OPERATION_STOP)
    error = await rpc_error(
        manager.fleet.OperateAgent(
            fleet_pb2.OperateAgentRequest(node_id="edge-1", request=missing), timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND
    unknown = await rpc_error(
        manager.fleet.OperateAgent(
            fleet_pb2.OperateAgentRequest(node_id="no-such-node", request=operation), timeout=5
        )
    )
    assert unknown.code() is grpc.StatusCode.NOT_FOUND


async def test_metrics_are_proxied_to_the_node(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    query = metrics_pb2.AgentMetricsRequest(agent_id="ship", duration_seconds=60)
    answer = await manager.fleet.GetAgentMetrics(
        fleet_pb2.GetAgentMetricsRequest(node_id="edge-1", request=query), timeout=5
    )
    assert len(answer.data_points) == 5


async def test_an_unreachable_node_is_unavailable(manager: Manager) -> None:
    async with fake_daemon("gone") as daemon:
        await manager.register("gone", daemon=daemon)
    operation = agent_pb2.AgentOperationRequest(agent_id="a", operation=agent_pb2.OPERATION_STOP)
    error = await rpc_error(
        manager.fleet.OperateAgent(
            fleet_pb2.OperateAgentRequest(node_id="gone", request=operation), timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ WatchEvents


async def test_watch_events_follows_new_events_as_they_are_stored(manager: Manager) -> None:
    stream = manager.fleet.WatchEvents(fleet_pb2.WatchEventsRequest(), timeout=10)
    received: list[event_pb2.Event] = []

    async def read() -> None:
        async for event in stream:
            received.append(event)

    reader = asyncio.create_task(read())
    try:

        async def registered_and_seen() -> bool:
            await manager.register("n1")  # again until the stream, once started, sees one
            return any(e.node_id == "n1" for e in received)

        await until(registered_and_seen, what="a registration event")
    finally:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert received[-1].type == event_pb2.EVENT_TYPE_NODE_REGISTERED


async def test_watch_events_resumes_after_a_sequence(manager: Manager) -> None:
    for node_id in ("n1", "n2", "n3"):
        await manager.register(node_id)
    stream = manager.fleet.WatchEvents(fleet_pb2.WatchEventsRequest(after_sequence=1), timeout=10)
    got = []
    async for event in stream:
        got.append(event.node_id)
        if len(got) == 2:
            break
    stream.cancel()
    assert got == ["n2", "n3"]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        pytest.param(
            fleet_pb2.WatchEventsRequest(since=timestamp(1), after_sequence=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="since-and-after",
        ),
        pytest.param(
            fleet_pb2.WatchEventsRequest(node_id="bad id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="bad-node",
        ),
        pytest.param(
            fleet_pb2.WatchEventsRequest(types=[999]),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="unknown-type",
        ),
    ],
)
async def test_bad_watch_requests_are_refused(
    manager: Manager, request_: fleet_pb2.WatchEventsRequest, code: grpc.StatusCode
) -> None:
    stream = manager.fleet.WatchEvents(request_, timeout=5)
    error = await rpc_error(stream.read())
    assert error.code() is code


async def test_watching_after_a_sequence_no_longer_retained_is_out_of_range(
    tmp_path: Path,
) -> None:
    settings = manager_settings(tmp_path, events_max=2)
    async with running_manager(settings, store=MemoryStore()) as manager:
        for node_id in ("n1", "n2", "n3", "n4"):
            await manager.register(node_id)
        stream = manager.fleet.WatchEvents(
            fleet_pb2.WatchEventsRequest(after_sequence=1), timeout=5
        )
        error = await rpc_error(stream.read())
        assert error.code() is grpc.StatusCode.OUT_OF_RANGE


# ---------------------------------------------------------------- hostile input


async def test_an_agent_set_with_a_hostile_spec_is_refused_naming_the_field(
    manager: Manager,
) -> None:
    message = agent_set("s", "a")
    message.spec.agents[0].restart_policy = agent_pb2.RESTART_POLICY_UNSPECIFIED
    error = await rpc_error(manager.apply(message))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("spec.agents[0].restartPolicy")
    message = agent_set("s", "a")
    message.spec.agents[0].env["LD_PRELOAD"] = "/tmp/evil.so"
    error = await rpc_error(manager.apply(message))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_the_metrics_endpoint_counts_rpcs_and_nodes(
    manager: Manager, fleet: dict[str, FakeDaemon]
) -> None:
    await manager.apply(agent_set("all", "a"))
    await manager.app.pusher.idle()
    await manager.app.readiness.sweep()
    url = f"http://{manager.app.addresses.metrics}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.text()
    assert (
        'reconciler_grpc_server_handled_total{grpc_code="OK",grpc_method="RegisterNode",'
        'grpc_service="reconciler.api.manager.v1.ManagerService"} 3.0' in body
    )
    assert 'reconciler_manager_nodes{status="Ready"} 3.0' in body
    assert 'reconciler_manager_push_seconds_count{outcome="Accepted"} 3.0' in body
    assert "reconciler_manager_store_seconds_count" in body


async def test_health_reports_serving(manager: Manager) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(manager.channel)
    answer = await stub.Check(
        health_pb2.HealthCheckRequest(service="reconciler.api.fleet.v1.FleetService"), timeout=5
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------- concurrent replicas


class InterleavingStore(MemoryStore):
    """A memory store that runs ``after_next_list`` right after a listing of AgentSets
    is read and before it is returned: another replica's change landing in between."""

    def __init__(self) -> None:
        super().__init__()
        self.after_next_list: Callable[[], Awaitable[object]] | None = None

    async def list_agent_sets(self) -> list[AgentSetRecord]:
        listed = await super().list_agent_sets()
        hook, self.after_next_list = self.after_next_list, None
        if hook is not None:
            await hook()
        return listed


class NoPush:
    def request(self, node_ids: Iterable[str]) -> None:
        list(node_ids)


async def test_a_change_landing_between_two_reads_is_planned_again_not_overwritten() -> None:
    store = InterleavingStore()
    await store.upsert_node(NodeRecord("n1", "h", "", {}, "v", "", (), 1.0, 1.0))
    events = EventLog(store, keep_last=100)
    mine = FleetChanges(store, events=events, pusher=NoPush())
    theirs = FleetChanges(store, events=events, pusher=NoPush())
    store.after_next_list = lambda: theirs.apply(check_agent_set(agent_set("left", "l")))
    outcome = await mine.apply(check_agent_set(agent_set("right", "r")))
    desired = await store.get_desired("n1")
    assert desired is not None
    assert (desired.generation, [s.id for s in specs_from_json(desired.agents)]) == (
        2,
        ["l", "r"],
    )
    assert [(n.previous_generation, n.generation) for n in outcome.plan.nodes] == [(1, 2)]


async def test_a_push_carries_the_trace_of_the_apply_that_caused_it(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, plan=ExportPlan(TelemetryExporter.OTLP), counters=SpanCounters())
    settings = manager_settings(tmp_path)
    async with (
        running_manager(settings, store=MemoryStore(), tracing=tracing) as manager,
        fake_daemon("n1") as daemon,
    ):
        await manager.register("n1", daemon=daemon)
        await manager.apply(agent_set("all", "a"))
        await until(lambda: daemon.seen.traceparents, what="a traced push")
    (apply_span,) = [s for s in exporter.get_finished_spans() if s.name.endswith("ApplyAgentSet")]
    trace_id = daemon.seen.traceparents[0].split("-")[1]
    assert trace_id == f"{apply_span.context.trace_id:032x}"

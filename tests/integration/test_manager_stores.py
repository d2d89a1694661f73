"""The Manager end to end on its real stores: SQLite and PostgreSQL.

The core scenarios of the memory-store service tests, on the databases a Manager
really runs on, plus what only a database gives: a restart keeps everything, and two
Manager replicas on one database serve one fleet (apply through one while a daemon
talks to the other).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.api.agent.v1 import event_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.api.manager.v1 import manager_pb2
from reconciler.config import ManagerSettings, StoreBackend
from tests.integration.test_manager_support import (
    agent_set,
    fake_daemon,
    manager_settings,
    running_manager,
    until,
)
from tests.support.postgres import isolated_schema

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ManagerSettings]:
    """Manager settings on a fresh database of the backend under test."""
    if request.param == "postgres":
        with isolated_schema(request.getfixturevalue("postgres_dsn")) as dsn:
            yield manager_settings(tmp_path, backend=StoreBackend.POSTGRES, postgres_dsn=dsn)
        return
    yield manager_settings(tmp_path)


async def test_an_apply_converges_the_selected_nodes_and_a_reapply_changes_nothing(
    settings: ManagerSettings,
) -> None:
    async with (
        running_manager(settings) as manager,
        fake_daemon("edge-1") as edge_1,
        fake_daemon("edge-2") as edge_2,
        fake_daemon("core-1") as core_1,
    ):
        await manager.register("edge-1", labels={"role": "edge"}, daemon=edge_1)
        await manager.register("edge-2", labels={"role": "edge"}, daemon=edge_2)
        await manager.register("core-1", labels={"role": "core"}, daemon=core_1)
        shippers = agent_set("shippers", "ship", labels={"role": "edge"})
        first = await manager.apply(shippers)
        assert [c.node_id for c in first.node_changes] == ["edge-1", "edge-2"]
        await until(lambda: edge_1.seen.agents == ["ship"] and edge_2.seen.agents == ["ship"])
        again = await manager.apply(shippers)
        assert (again.changed, list(again.node_changes)) == (False, [])
        await manager.app.pusher.idle()
        assert (len(edge_1.seen.calls), core_1.seen.calls) == (1, [])
        deleted = await manager.fleet.DeleteAgentSet(
            fleet_pb2.DeleteAgentSetRequest(name="shippers"), timeout=10
        )
        assert [c.generation for c in deleted.node_changes] == [2, 2]
        await until(lambda: edge_2.seen.generation == 2 and edge_2.seen.agents == [])


async def test_a_restarted_manager_keeps_nodes_sets_and_generations(
    settings: ManagerSettings,
) -> None:
    async with running_manager(settings) as manager:
        await manager.register("n1", labels={"role": "edge"})
        await manager.apply(agent_set("all", "a"))
        await manager.apply(agent_set("all", "a", version="2"))
    async with running_manager(settings) as manager:
        node = await manager.node("n1")
        assert (node.desired_generation, dict(node.labels)) == (2, {"role": "edge"})
        got = await manager.fleet.GetAgentSet(fleet_pb2.GetAgentSetRequest(name="all"), timeout=10)
        assert got.agent_set.metadata.revision == 2
        again = await manager.apply(agent_set("all", "a", version="2"))
        assert not again.changed


async def test_a_stopping_manager_writes_the_heartbeats_it_queued(
    settings: ManagerSettings,
) -> None:
    async with running_manager(settings) as manager:
        await manager.register("n1")
        request = manager_pb2.HeartbeatRequest(node_id="n1", observed_generation=7)
        await manager.nodes.Heartbeat(request, timeout=10)
    async with running_manager(settings) as manager:
        assert (await manager.node("n1")).observed_generation == 7


async def test_two_managers_on_one_database_serve_one_fleet(settings: ManagerSettings) -> None:
    async with (
        running_manager(settings) as first,
        running_manager(settings) as second,
        fake_daemon("n1") as daemon,
    ):
        await second.register("n1", daemon=daemon)
        await first.apply(agent_set("all", "a", "b"))

        async def second_answers_generation_1() -> bool:
            request = manager_pb2.HeartbeatRequest(node_id="n1")
            beat = await second.nodes.Heartbeat(request, timeout=10)
            return bool(beat.known and beat.desired_generation == 1)

        await until(second_answers_generation_1, what="generation 1 in the other's answers")
        pulled = await second.nodes.GetDesiredState(
            manager_pb2.GetDesiredStateRequest(node_id="n1"), timeout=10
        )
        assert [a.id for a in pulled.agents] == ["a", "b"]
        await until(lambda: daemon.seen.agents == ["a", "b"])


async def test_concurrent_applies_through_two_managers_both_land(
    settings: ManagerSettings,
) -> None:
    async with running_manager(settings) as first, running_manager(settings) as second:
        for node_id in ("n1", "n2"):
            await first.register(node_id)
        await asyncio.gather(
            first.apply(agent_set("left", "l")), second.apply(agent_set("right", "r"))
        )
        pulled = await first.nodes.GetDesiredState(
            manager_pb2.GetDesiredStateRequest(node_id="n2"), timeout=10
        )
        assert (pulled.generation, [a.id for a in pulled.agents]) == (2, ["l", "r"])


async def test_events_stored_through_one_manager_stream_from_the_other(
    settings: ManagerSettings,
) -> None:
    async with running_manager(settings) as first, running_manager(settings) as second:
        request = fleet_pb2.WatchEventsRequest(types=[event_pb2.EVENT_TYPE_AGENT_SET_APPLIED])
        stream = second.fleet.WatchEvents(request, timeout=30)
        seen: list[str] = []

        async def read() -> None:
            async for event in stream:
                seen.append(event.message)

        reader = asyncio.create_task(read())
        try:
            version = 0

            async def applied_and_seen() -> bool:
                nonlocal version
                version += 1  # each apply is a change, so each stores an event
                await first.apply(agent_set("all", "a", version=str(version)))
                return bool(seen)

            await until(applied_and_seen, what="an event from the other replica")
        finally:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        assert seen[0].startswith("AgentSet all applied")

"""NodeTable on the memory store: heartbeats answered from memory, written behind."""

from __future__ import annotations

import pytest

from reconciler.manager.liveness import NodeTable, flush_interval_for
from reconciler.manager.records import ApplyChange, DesiredRecord, NodeRecord
from reconciler.manager.service import EventLog, Readiness
from reconciler.manager.store.memory import MemoryStore
from reconciler.model.errors import Unavailable
from reconciler.model.events import EventType


def node(node_id: str = "n1", *, at: float = 100.0) -> NodeRecord:
    return NodeRecord(node_id, f"{node_id}.test", "10.0.0.1", {}, "1", "", (), at, at)


def desired(node_id: str, generation: int) -> DesiredRecord:
    return DesiredRecord(node_id, generation, "[]", updated_at=1.0)


async def stored_heartbeat(store: MemoryStore, node_id: str) -> float:
    found = await store.get_node(node_id)
    assert found is not None
    return found.last_heartbeat_at


async def test_a_heartbeat_of_an_unregistered_node_is_answered_none_and_queues_nothing() -> None:
    table = NodeTable(MemoryStore())

    answer = await table.beat("ghost", at=1.0, current_generation=0, observed_generation=0)

    assert answer is None
    assert dict(table.pending) == {}


async def test_a_known_node_is_answered_from_memory_while_the_store_is_down() -> None:
    store = MemoryStore()
    await store.upsert_node(node())
    await store.apply(ApplyChange(desired=(desired("n1", 3),)))
    table = NodeTable(store)
    assert await table.beat("n1", at=110.0, current_generation=1, observed_generation=1) == 3

    store.set_available(False)
    answer = await table.beat("n1", at=120.0, current_generation=2, observed_generation=2)

    assert answer == 3
    assert table.pending["n1"].at == 120.0


async def test_beats_are_written_in_one_flush_and_kept_queued_while_the_store_is_down() -> None:
    store = MemoryStore()
    for node_id in ("n1", "n2"):
        await store.upsert_node(node(node_id))
    table = NodeTable(store)
    await table.beat("n1", at=110.0, current_generation=1, observed_generation=1)
    await table.beat("n2", at=111.0, current_generation=1, observed_generation=1)
    store.set_available(False)

    with pytest.raises(Unavailable):
        await table.flush()
    assert set(table.pending) == {"n1", "n2"}
    assert await table.beat("n1", at=115.0, current_generation=2, observed_generation=2) == 0

    store.set_available(True)
    await table.flush()
    assert dict(table.pending) == {}
    assert await stored_heartbeat(store, "n1") == 115.0
    assert await stored_heartbeat(store, "n2") == 111.0


async def test_a_registration_newer_than_a_queued_beat_drops_the_beat() -> None:
    store = MemoryStore()
    await store.upsert_node(node(at=100.0))
    table = NodeTable(store)
    await table.beat("n1", at=110.0, current_generation=1, observed_generation=1)

    table.registered(await store.upsert_node(node(at=120.0)))

    assert dict(table.pending) == {}


async def test_desired_state_written_here_is_answered_at_once_for_known_nodes_only() -> None:
    store = MemoryStore()
    await store.upsert_node(node())
    table = NodeTable(store)
    await table.refresh()

    table.desired_written([desired("n1", 4), desired("deleted", 9)])

    assert await table.desired_generation("n1") == 4
    assert await table.desired_generation("deleted") is None


async def test_a_refresh_learns_other_writers_generations_and_forgets_deleted_nodes() -> None:
    store = MemoryStore()
    for node_id in ("n1", "n2"):
        await store.upsert_node(node(node_id))
    table = NodeTable(store)
    await table.beat("n2", at=110.0, current_generation=0, observed_generation=0)
    await store.apply(ApplyChange(desired=(desired("n1", 5),)))
    await store.delete_node("n2")

    await table.refresh()

    store.set_available(False)
    assert await table.desired_generation("n1") == 5
    assert dict(table.pending) == {}
    assert table.last_heartbeats() == {"n1": 100.0}


async def test_a_desired_generation_never_goes_back_on_refresh() -> None:
    store = MemoryStore()
    await store.upsert_node(node())
    table = NodeTable(store)
    await table.refresh()
    table.desired_written([desired("n1", 7)])

    await table.refresh()

    assert await table.desired_generation("n1") == 7


async def test_a_node_shows_the_newest_heartbeat_seen_here_before_it_is_stored() -> None:
    store = MemoryStore()
    await store.upsert_node(node(at=100.0))
    table = NodeTable(store)
    await table.beat("n1", at=130.0, current_generation=2, observed_generation=1)

    stored = await store.get_node("n1")
    assert stored is not None
    shown = table.overlay(stored)

    assert (shown.last_heartbeat_at, shown.current_generation) == (130.0, 2)
    assert table.overlay(node(at=200.0)).last_heartbeat_at == 200.0
    assert table.last_heartbeats() == {"n1": 130.0}


@pytest.mark.parametrize(
    ("not_ready_after_s", "expected_s"),
    [
        pytest.param(45.0, 1.0, id="default-one-second"),
        pytest.param(0.3, 0.03, id="a-tenth-of-a-short-window"),
    ],
)
def test_the_flush_interval_stays_far_below_the_not_ready_window(
    not_ready_after_s: float, expected_s: float
) -> None:
    assert flush_interval_for(not_ready_after_s) == pytest.approx(expected_s)


async def test_two_replicas_record_a_node_going_quiet_and_coming_back_once() -> None:
    store = MemoryStore()
    await store.upsert_node(node("n1", at=100.0))
    now = [100.0]
    replicas = []
    for _ in range(2):
        table = NodeTable(store, clock=lambda: now[0])
        readiness = Readiness(
            table,
            EventLog(store, keep_last=100),
            not_ready_after_s=45.0,
            clock=lambda: now[0],
            claim=store.claim_readiness,
        )
        replicas.append((table, readiness))
    for _, readiness in replicas:
        await readiness.sweep()  # both see it Ready
    now[0] = 200.0
    for _, readiness in replicas:
        await readiness.sweep()  # both see it NotReady; one records it

    table, readiness = replicas[0]  # the node's daemon talks to the first replica
    await table.beat("n1", at=200.0, current_generation=0, observed_generation=0)
    await readiness.heartbeat("n1")
    await table.flush()
    for _, other in replicas[1:]:
        await other.heartbeat("n1")  # a beat reaching another replica too
        await other.sweep()

    kinds = [e.type for e in await store.list_events() if e.node_id == "n1"]
    assert kinds == [str(EventType.NODE_NOT_READY), str(EventType.NODE_READY)]

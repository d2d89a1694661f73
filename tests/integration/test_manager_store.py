"""The Manager's store: one suite, run against every backend.

Each test gets an ``Opener`` for a fresh database: the in-memory fake, a SQLite file
under ``tmp_path``, or a new schema on the session's PostgreSQL server (tests marked
``postgres``). Tests that need two stores on one database (concurrent ``apply``,
reopening) run on the SQL backends only, since a ``MemoryStore`` shares nothing.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from reconciler.manager.records import (
    AgentSetRecord,
    ApplyChange,
    DesiredRecord,
    EventRecord,
    HeartbeatRecord,
    MetricPointRecord,
    NodeLivenessRecord,
    NodeRecord,
    ObservedAgentRecord,
)
from reconciler.manager.store import ManagerStore
from reconciler.manager.store.common import SchemaTooNew
from reconciler.manager.store.memory import MemoryStore
from reconciler.manager.store.postgres import PostgresStore
from reconciler.manager.store.sqlite import SqliteStore
from reconciler.model.errors import Conflict, InvalidArgument, Unavailable
from tests.support.postgres import isolated_schema


class Opener:
    """Opens migrated stores on one database and closes them all at the end."""

    def __init__(self, backend: str, make: Callable[[], ManagerStore]) -> None:
        self.backend = backend
        self._make = make
        self._opened: list[ManagerStore] = []

    async def open(self) -> ManagerStore:
        store = self._make()
        self._opened.append(store)
        await store.migrate()
        return store

    async def close_all(self) -> None:
        for store in self._opened:
            await store.close()


SQL_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
ALL_BACKENDS = ["memory", *SQL_BACKENDS]


async def _opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    backend: str = request.param
    if backend == "postgres":
        with isolated_schema(request.getfixturevalue("postgres_dsn")) as dsn:
            opener = Opener(backend, lambda: PostgresStore(dsn, pool_size=2))
            yield opener
            await opener.close_all()
        return
    if backend == "sqlite":
        path = tmp_path / "state" / "manager.db"
        opener = Opener(backend, lambda: SqliteStore(path))
    else:
        memory = MemoryStore()
        opener = Opener(backend, lambda: memory)
    yield opener
    await opener.close_all()


@pytest.fixture(params=ALL_BACKENDS)
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    async for value in _opener(request, tmp_path):
        yield value


@pytest.fixture(params=SQL_BACKENDS)
async def sql_opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    async for value in _opener(request, tmp_path):
        yield value


@pytest.fixture
async def store(opener: Opener) -> ManagerStore:
    return await opener.open()


def node(node_id: str = "node-a", *, at: float = 100.0, **changes: object) -> NodeRecord:
    fields: dict[str, object] = {
        "node_id": node_id,
        "hostname": f"{node_id}.example",
        "ip": "10.0.0.1",
        "labels": {"role": "edge"},
        "version": "0.1.0",
        "daemon_address": "10.0.0.1:7070",
        "capabilities": ("pidfd",),
        "registered_at": at,
        "last_heartbeat_at": at,
    }
    fields.update(changes)
    return NodeRecord(**fields)  # type: ignore[arg-type]


def agent_set(name: str = "web", revision: int = 1, *, document: str = "{}") -> AgentSetRecord:
    return AgentSetRecord(name, revision, document, created_at=10.0, updated_at=10.0 + revision)


def desired(node_id: str, generation: int) -> DesiredRecord:
    return DesiredRecord(node_id, generation, f'[{{"id":"g{generation}"}}]', updated_at=1.0)


def observed(node_id: str, agent_id: str, info: str = "{}") -> ObservedAgentRecord:
    return ObservedAgentRecord(node_id, agent_id, info, updated_at=5.0)


def event(node_id: str = "node-a", agent_id: str | None = "web", *, reason: str = "Started"):
    return EventRecord(0, 50.0, node_id, agent_id, "Normal", reason, f"{agent_id} {reason}")


async def snapshot(store: ManagerStore) -> tuple[object, ...]:
    return (
        await store.list_nodes(),
        await store.list_agent_sets(),
        await store.list_desired(),
        await store.list_observed(),
    )


# ----------------------------------------------------------------------------- nodes


async def test_upserting_a_known_node_keeps_its_registration_time_and_desired_generation(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node(at=100.0))
    await store.apply(ApplyChange(desired=(desired("node-a", 3),)))

    again = await store.upsert_node(
        node(at=200.0, ip="10.0.0.9", labels={"role": "core"}, desired_generation=0)
    )

    assert again.registered_at == 100.0
    assert again.desired_generation == 3
    assert again.ip == "10.0.0.9"
    assert again.labels == {"role": "core"}
    assert again.last_heartbeat_at == 200.0
    assert await store.get_node("node-a") == again


async def test_a_node_registering_after_its_desired_state_was_written_sees_its_generation(
    store: ManagerStore,
) -> None:
    await store.apply(ApplyChange(desired=(desired("node-a", 7),)))

    registered = await store.upsert_node(node(desired_generation=0))

    assert registered.desired_generation == 7


async def test_a_heartbeat_of_an_unknown_node_returns_none_and_creates_nothing(
    store: ManagerStore,
) -> None:
    answer = await store.record_heartbeat(
        "ghost", at=1.0, current_generation=1, observed_generation=1
    )

    assert answer is None
    assert await store.list_nodes() == []


async def test_a_heartbeat_records_its_time_and_the_daemons_generations(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node(at=100.0))
    await store.apply(ApplyChange(desired=(desired("node-a", 4),)))

    answer = await store.record_heartbeat(
        "node-a", at=130.0, current_generation=4, observed_generation=3
    )

    assert answer is not None
    assert (answer.last_heartbeat_at, answer.registered_at) == (130.0, 100.0)
    assert (answer.desired_generation, answer.current_generation) == (4, 4)
    assert answer.observed_generation == 3
    assert await store.get_node("node-a") == answer


async def test_a_batch_of_heartbeats_updates_known_nodes_and_skips_unknown_ones(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node("node-a", at=100.0))
    await store.upsert_node(node("node-b", at=100.0))

    await store.record_heartbeats(
        [
            HeartbeatRecord("node-b", at=140.0, current_generation=2, observed_generation=1),
            HeartbeatRecord("ghost", at=140.0, current_generation=9, observed_generation=9),
            HeartbeatRecord("node-a", at=130.0, current_generation=3, observed_generation=3),
        ]
    )

    nodes = {n.node_id: n for n in await store.list_nodes()}
    assert set(nodes) == {"node-a", "node-b"}
    assert (nodes["node-a"].last_heartbeat_at, nodes["node-a"].current_generation) == (130.0, 3)
    assert (nodes["node-b"].last_heartbeat_at, nodes["node-b"].observed_generation) == (140.0, 1)


async def test_a_batched_heartbeat_older_than_the_stored_one_changes_nothing(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node(at=100.0))
    await store.record_heartbeat("node-a", at=150.0, current_generation=5, observed_generation=5)

    await store.record_heartbeats(
        [HeartbeatRecord("node-a", at=120.0, current_generation=1, observed_generation=1)]
    )

    stored = await store.get_node("node-a")
    assert stored is not None
    assert (stored.last_heartbeat_at, stored.current_generation) == (150.0, 5)


async def test_a_heartbeat_batch_naming_a_node_twice_is_refused_and_changes_nothing(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node(at=100.0))
    before = await snapshot(store)
    beat = HeartbeatRecord("node-a", at=120.0, current_generation=1, observed_generation=1)

    with pytest.raises(InvalidArgument, match="beats"):
        await store.record_heartbeats([beat, beat])

    assert await snapshot(store) == before


async def test_liveness_lists_every_nodes_last_heartbeat_and_desired_generation_by_id(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node("node-b", at=200.0))
    await store.upsert_node(node("node-a", at=100.0))
    await store.apply(ApplyChange(desired=(desired("node-b", 3), desired("gone", 2))))

    assert await store.list_liveness() == [
        NodeLivenessRecord("node-a", last_heartbeat_at=100.0, desired_generation=0),
        NodeLivenessRecord("node-b", last_heartbeat_at=200.0, desired_generation=3),
    ]


async def test_nodes_are_listed_by_id_and_an_unknown_id_is_none(store: ManagerStore) -> None:
    for node_id in ("node-c", "node-a", "node-b"):
        await store.upsert_node(node(node_id))

    assert [n.node_id for n in await store.list_nodes()] == ["node-a", "node-b", "node-c"]
    assert await store.get_node("node-z") is None


async def test_deleting_a_node_forgets_it_and_its_agents_but_not_its_generation(
    store: ManagerStore,
) -> None:
    await store.upsert_node(node("node-a"))
    await store.upsert_node(node("node-b"))
    await store.apply(ApplyChange(desired=(desired("node-a", 2),)))
    await store.put_observed("node-a", [observed("node-a", "web")])
    await store.put_observed("node-b", [observed("node-b", "web")])

    assert await store.delete_node("node-a") is True
    assert await store.delete_node("node-a") is False

    assert await store.get_node("node-a") is None
    assert await store.list_observed() == [observed("node-b", "web")]
    back = await store.upsert_node(node("node-a"))
    assert back.desired_generation == 2


async def test_a_readiness_mark_is_claimed_once_until_it_changes(store: ManagerStore) -> None:
    await store.upsert_node(node("node-a"))
    assert await store.claim_readiness("node-a", "NotReady after 100.5") is True
    assert await store.claim_readiness("node-a", "NotReady after 100.5") is False, "replica 2"
    assert await store.claim_readiness("node-a", "Ready after 100.5") is True
    assert await store.claim_readiness("node-a", "NotReady after 100.5") is True, "a new outage"
    assert await store.claim_readiness("node-b", "NotReady after 100.5") is True, "per node"
    await store.delete_node("node-a")
    assert await store.claim_readiness("node-a", "NotReady after 100.5") is True, "forgotten"


# ----------------------------------------------------------------------------- apply


async def test_apply_writes_an_agent_set_and_several_nodes_desired_states(
    store: ManagerStore,
) -> None:
    change = ApplyChange(
        agent_set=agent_set("web", 1),
        desired=(desired("node-a", 1), desired("node-b", 1)),
    )

    await store.apply(change)

    assert await store.get_agent_set("web") == agent_set("web", 1)
    assert await store.list_desired() == [desired("node-a", 1), desired("node-b", 1)]
    assert await store.get_desired("node-b") == desired("node-b", 1)
    assert await store.get_desired("node-z") is None


async def test_updating_an_agent_set_keeps_its_creation_time(store: ManagerStore) -> None:
    await store.apply(ApplyChange(agent_set=agent_set("web", 1)))
    update = AgentSetRecord("web", 2, '{"v":2}', created_at=99.0, updated_at=99.0)

    await store.apply(ApplyChange(agent_set=update, expected_revision=1))

    assert await store.get_agent_set("web") == AgentSetRecord(
        "web", 2, '{"v":2}', created_at=10.0, updated_at=99.0
    )


async def test_apply_deletes_an_agent_set_and_writes_the_nodes_left(store: ManagerStore) -> None:
    await store.apply(ApplyChange(agent_set=agent_set("web", 1), desired=(desired("node-a", 1),)))
    await store.apply(ApplyChange(agent_set=agent_set("db", 1)))

    await store.apply(
        ApplyChange(delete_name="web", expected_revision=1, desired=(desired("node-a", 2),))
    )

    assert [s.name for s in await store.list_agent_sets()] == ["db"]
    assert await store.get_desired("node-a") == desired("node-a", 2)


STALE_CHANGES = [
    pytest.param(
        ApplyChange(agent_set=agent_set("web", 3), expected_revision=None),
        id="creating-a-set-that-exists",
    ),
    pytest.param(
        ApplyChange(agent_set=agent_set("web", 2), expected_revision=1),
        id="updating-from-an-old-revision",
    ),
    pytest.param(
        ApplyChange(agent_set=agent_set("new", 2), expected_revision=1),
        id="updating-a-set-that-does-not-exist",
    ),
    pytest.param(ApplyChange(delete_name="web", expected_revision=1), id="deleting-a-newer-set"),
    pytest.param(
        ApplyChange(
            agent_set=agent_set("web", 3),
            expected_revision=2,
            desired=(desired("node-b", 1), desired("node-a", 5)),
        ),
        id="a-generation-equal-to-the-stored-one",
    ),
    pytest.param(
        ApplyChange(
            agent_set=agent_set("web", 3),
            expected_revision=2,
            desired=(desired("node-b", 1), desired("node-a", 4)),
        ),
        id="a-generation-older-than-the-stored-one",
    ),
    pytest.param(
        ApplyChange(desired=(desired("node-new", 0),)), id="generation-zero-for-a-new-node"
    ),
]


@pytest.mark.parametrize("change", STALE_CHANGES)
async def test_a_stale_apply_raises_conflict_and_changes_nothing(
    store: ManagerStore, change: ApplyChange
) -> None:
    await store.upsert_node(node("node-a"))
    await store.apply(ApplyChange(agent_set=agent_set("web", 1), desired=(desired("node-a", 5),)))
    await store.apply(ApplyChange(agent_set=agent_set("web", 2), expected_revision=1))
    before = await snapshot(store)

    with pytest.raises(Conflict):
        await store.apply(change)

    assert await snapshot(store) == before


CONTENDED = [
    pytest.param(("a", "a"), id="one-agent-set-revision"),
    pytest.param(("a", "b"), id="one-node-generation"),
]


@pytest.mark.parametrize("names", CONTENDED)
async def test_two_stores_applying_against_the_same_state_never_both_succeed(
    sql_opener: Opener, names: tuple[str, str]
) -> None:
    first, second = await sql_opener.open(), await sql_opener.open()
    await first.apply(ApplyChange(agent_set=agent_set("a", 1), desired=(desired("node-x", 1),)))
    await first.apply(ApplyChange(agent_set=agent_set("b", 1)))

    for round_ in range(1, 16):
        generation = round_ + 1
        changes = [
            ApplyChange(
                agent_set=agent_set(name, round_ + 1, document=f'"{who}"'),
                expected_revision=(await first.get_agent_set(name) or agent_set()).revision,
                desired=(desired("node-x", generation),),
            )
            for who, name in zip(("first", "second"), names, strict=True)
        ]
        results = await asyncio.gather(
            first.apply(changes[0]), second.apply(changes[1]), return_exceptions=True
        )

        winners = [i for i, result in enumerate(results) if result is None]
        assert len(winners) == 1, results
        loser = results[1 - winners[0]]
        assert isinstance(loser, Conflict), loser
        won = changes[winners[0]]
        assert won.agent_set is not None
        assert await second.get_agent_set(won.agent_set.name) == won.agent_set
        assert (await second.get_desired("node-x")) == desired("node-x", generation)


# ---------------------------------------------------------------------------- observed


async def test_put_observed_replaces_the_nodes_whole_set_and_leaves_others(
    store: ManagerStore,
) -> None:
    await store.put_observed("node-a", [observed("node-a", "old"), observed("node-a", "web")])
    await store.put_observed("node-b", [observed("node-b", "db")])

    await store.put_observed("node-a", [observed("node-a", "web", '{"v":2}')])

    assert await store.list_observed("node-a") == [observed("node-a", "web", '{"v":2}')]
    assert await store.list_observed() == [
        observed("node-a", "web", '{"v":2}'),
        observed("node-b", "db"),
    ]
    await store.put_observed("node-a", [])
    assert await store.list_observed("node-a") == []


BAD_OBSERVED = [
    pytest.param([observed("node-b", "web")], "agents[0].node_id", id="another-nodes-agent"),
    pytest.param(
        [observed("node-a", "web"), observed("node-a", "web")], "agents", id="a-repeated-agent"
    ),
]


@pytest.mark.parametrize(("agents", "field"), BAD_OBSERVED)
async def test_put_observed_refuses_bad_records_and_changes_nothing(
    store: ManagerStore, agents: list[ObservedAgentRecord], field: str
) -> None:
    await store.put_observed("node-a", [observed("node-a", "db")])

    with pytest.raises(InvalidArgument) as caught:
        await store.put_observed("node-a", agents)

    assert caught.value.field == field
    assert await store.list_observed() == [observed("node-a", "db")]


# ----------------------------------------------------------------------------- metrics


def point(time: float, *, agent_id: str = "web", cpu: float = 1.5) -> MetricPointRecord:
    return MetricPointRecord("node-a", agent_id, time, cpu, 1024 * int(time))


async def test_adding_metrics_drops_points_older_than_the_window(store: ManagerStore) -> None:
    await store.add_metrics([point(t) for t in (100.0, 110.0, 120.0)], keep_after=0.0)

    await store.add_metrics([point(130.0), point(130.0, agent_id="db")], keep_after=115.0)

    assert await store.query_metrics("node-a", "web", since=0.0) == [point(120.0), point(130.0)]
    assert await store.query_metrics("node-a", "db", since=0.0) == [point(130.0, agent_id="db")]


async def test_metrics_are_queried_since_a_time_and_a_repeated_point_is_kept_once(
    store: ManagerStore,
) -> None:
    await store.add_metrics([point(t) for t in (1.0, 2.0, 3.0)], keep_after=0.0)
    await store.add_metrics([point(2.0, cpu=99.0)], keep_after=0.0)

    assert await store.query_metrics("node-a", "web", since=2.0) == [point(2.0), point(3.0)]
    assert await store.query_metrics("node-b", "web", since=0.0) == []


# ------------------------------------------------------------------------------ events


async def test_event_sequences_grow_and_keep_last_bounds_the_total(store: ManagerStore) -> None:
    first = await store.add_events([event(reason=f"r{i}") for i in range(5)], keep_last=3)
    later = await store.add_events([event(reason="late")], keep_last=3)

    sequences = [e.sequence for e in first + later]
    assert sequences == sorted(set(sequences))
    assert sequences[0] > 0
    assert [e.reason for e in first] == [f"r{i}" for i in range(5)]
    kept = await store.list_events()
    assert [e.reason for e in kept] == ["r3", "r4", "late"]
    assert kept == [*first[3:], *later]
    assert await store.add_events([], keep_last=3) == []


async def test_list_events_filters_by_node_and_agent_and_follows_a_sequence(
    store: ManagerStore,
) -> None:
    added = await store.add_events(
        [event("node-a", "web"), event("node-a", None), event("node-b", "web"),
         event("node-a", "db"), event("node-a", "web", reason="Stopped")],
        keep_last=100,
    )  # fmt: skip

    assert await store.list_events(node_id="node-a", agent_id="web") == [added[0], added[4]]
    assert await store.list_events(node_id="node-a") == [added[i] for i in (0, 1, 3, 4)]
    assert await store.list_events(agent_id="web") == [added[i] for i in (0, 2, 4)]
    assert await store.list_events(after_sequence=added[2].sequence) == added[3:]
    assert await store.list_events(after_sequence=added[0].sequence, limit=2) == added[1:3]
    assert await store.list_events(after_sequence=added[4].sequence) == []


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.add_events([event()], keep_last=-1), id="negative-keep-last"),
        pytest.param(lambda s: s.list_events(limit=0), id="zero-limit"),
    ],
)
async def test_bad_event_arguments_are_refused(
    store: ManagerStore, call: Callable[[ManagerStore], object]
) -> None:
    with pytest.raises(InvalidArgument):
        await call(store)  # type: ignore[misc]
    assert await store.list_events() == []


# ------------------------------------------------------------------ schema, lifecycle


async def test_migrating_twice_is_harmless(opener: Opener) -> None:
    store = await opener.open()
    await store.apply(ApplyChange(agent_set=agent_set("web", 1)))

    await store.migrate()

    assert await store.get_agent_set("web") == agent_set("web", 1)


async def test_a_closed_store_raises_unavailable(opener: Opener) -> None:
    store = await opener.open()
    await store.close()

    with pytest.raises(Unavailable):
        await store.list_nodes()


async def test_a_store_opened_again_on_the_database_sees_the_data(sql_opener: Opener) -> None:
    first = await sql_opener.open()
    await first.upsert_node(node())
    await first.apply(ApplyChange(agent_set=agent_set("web", 1), desired=(desired("node-a", 1),)))
    added = await first.add_events([event()], keep_last=10)
    await first.close()

    second = await sql_opener.open()

    assert await second.get_node("node-a") == node(desired_generation=1)
    assert await second.get_agent_set("web") == agent_set("web", 1)
    more = await second.add_events([event()], keep_last=10)
    assert more[0].sequence > added[0].sequence


async def test_a_database_of_the_first_schema_is_upgraded_keeping_its_data(
    sql_opener: Opener,
) -> None:
    first = await sql_opener.open()
    await first.upsert_node(node())
    await _back_to_first_schema(first)
    await first.close()

    second = await sql_opener.open()  # migrates

    assert await second.get_node("node-a") == node()
    assert await second.claim_readiness("node-a", "NotReady after 1.0") is True


async def _back_to_first_schema(store: ManagerStore) -> None:
    statements = ("DROP TABLE readiness_marks", "DELETE FROM schema_version WHERE version > 1")
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            for statement in statements:
                conn.execute(statement)
        conn.close()
        return
    assert isinstance(store, PostgresStore)
    async with store._connection() as conn:
        for statement in statements:
            await conn.execute(statement)


async def test_a_database_migrated_by_a_newer_manager_is_refused(sql_opener: Opener) -> None:
    store = await sql_opener.open()
    await _set_schema_version(sql_opener, store, 999)

    with pytest.raises(SchemaTooNew):
        await store.migrate()


async def _set_schema_version(opener: Opener, store: ManagerStore, version: int) -> None:
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        conn.close()
        return
    assert isinstance(store, PostgresStore)
    async with store._connection() as conn:
        await conn.execute("INSERT INTO schema_version VALUES (%s, 0)", (version,))


# ---------------------------------------------------------------------- backend edges


async def test_the_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "manager.db"
    store = SqliteStore(path)
    await store.migrate()
    await store.upsert_node(node())
    try:
        for name in ("fresh", "fresh/manager.db", "fresh/manager.db-wal"):
            mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
            assert mode == (0o700 if name == "fresh" else 0o600), name
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        await store.close()


async def test_a_sqlite_database_locked_past_the_busy_timeout_is_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "manager.db"
    store = SqliteStore(path, busy_timeout_s=0.05)
    await store.migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Unavailable, match="locked"):
            await store.upsert_node(node())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (await store.upsert_node(node())).node_id == "node-a"
    await store.close()


async def test_a_sqlite_path_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.db").touch()
    (tmp_path / "manager.db").symlink_to(tmp_path / "elsewhere.db")
    store = SqliteStore(tmp_path / "manager.db")

    with pytest.raises(Unavailable):
        await store.migrate()
    await store.close()


async def test_a_postgres_server_that_is_away_is_unavailable(unused_tcp_port: int) -> None:
    store = PostgresStore(
        f"host=127.0.0.1 port={unused_tcp_port} user=nobody dbname=none connect_timeout=1",
        pool_size=1,
        timeout_s=0.5,
    )

    with pytest.raises(Unavailable):
        await store.migrate()
    await store.close()

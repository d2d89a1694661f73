"""``PostgresStore``: the Manager's store on PostgreSQL, for several Manager replicas.

psycopg 3 in async mode over a ``psycopg_pool.AsyncConnectionPool`` of ``pool_size``
connections (each checked before use, so a restarted server costs no failed call),
opened on first use. The Manager creates and upgrades the schema itself
(``migrate``): versions are recorded in ``schema_version`` and applied under an
advisory lock, so replicas starting together do it once.

Serialisation across replicas, by transaction-scoped advisory locks
(``pg_advisory_xact_lock``, released at commit or rollback):

- ``apply`` takes the apply lock before it reads the revision and generations it checks,
  so two replicas applying against the same revision cannot both succeed.
- ``add_events`` takes the events lock around taking sequence numbers, so sequences
  become visible in the order they were taken and a reader following with
  ``after_sequence`` never skips one that commits late.

Every ``psycopg.OperationalError`` (lost connection, server shutting down,
serialisation failure) and every pool timeout raises ``Unavailable``.

What it does not do: retry, or create the database or role (operators do; the chart's
PostgreSQL does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, LiteralString

import psycopg
import psycopg_pool

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
from reconciler.manager.store import sql
from reconciler.manager.store.common import (
    SchemaTooNew,
    check_desired_generation,
    check_events_args,
    check_heartbeats,
    check_limit,
    check_observed,
    check_revision,
)
from reconciler.model.errors import Unavailable

__all__ = ["MIGRATIONS", "PostgresStore"]

Connection = psycopg.AsyncConnection[tuple[Any, ...]]

#: (version, statements) in order; a released version is never edited, only appended to.
MIGRATIONS: Final[tuple[tuple[int, tuple[LiteralString, ...]], ...]] = (
    (
        1,
        (
            "CREATE TABLE nodes (node_id TEXT PRIMARY KEY, hostname TEXT NOT NULL,"
            " ip TEXT NOT NULL, labels TEXT NOT NULL, version TEXT NOT NULL,"
            " daemon_address TEXT NOT NULL, capabilities TEXT NOT NULL,"
            " registered_at DOUBLE PRECISION NOT NULL,"
            " last_heartbeat_at DOUBLE PRECISION NOT NULL,"
            " observed_generation BIGINT NOT NULL, current_generation BIGINT NOT NULL)",
            "CREATE TABLE agent_sets (name TEXT PRIMARY KEY, revision BIGINT NOT NULL,"
            " document TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
            " updated_at DOUBLE PRECISION NOT NULL)",
            "CREATE TABLE desired (node_id TEXT PRIMARY KEY, generation BIGINT NOT NULL,"
            " agents TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
            "CREATE TABLE observed (node_id TEXT NOT NULL, agent_id TEXT NOT NULL,"
            " info TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL,"
            " PRIMARY KEY (node_id, agent_id))",
            "CREATE TABLE metrics (node_id TEXT NOT NULL, agent_id TEXT NOT NULL,"
            " time DOUBLE PRECISION NOT NULL, cpu_percent DOUBLE PRECISION NOT NULL,"
            " memory_bytes BIGINT NOT NULL, PRIMARY KEY (node_id, agent_id, time))",
            "CREATE INDEX metrics_by_time ON metrics (time)",
            "CREATE TABLE events (sequence BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " time DOUBLE PRECISION NOT NULL, node_id TEXT NOT NULL, agent_id TEXT,"
            " type TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL)",
            "CREATE INDEX events_by_node ON events (node_id, sequence)",
            "CREATE INDEX events_by_agent ON events (node_id, agent_id, sequence)",
        ),
    ),
    (2, ("CREATE TABLE readiness_marks (node_id TEXT PRIMARY KEY, mark TEXT NOT NULL)",)),
)
_LATEST: Final = MIGRATIONS[-1][0]

# Advisory lock keys (bigint, database-wide): "rcnc" in ASCII, then a purpose number.
_MIGRATE_LOCK: Final = 0x72636E63_00000001
_APPLY_LOCK: Final = 0x72636E63_00000002
_EVENTS_LOCK: Final = 0x72636E63_00000003

_LOCK: Final = "SELECT pg_advisory_xact_lock(%s)"
_DESIRED_GENERATIONS: Final = "SELECT node_id, generation FROM desired WHERE node_id = ANY(%s)"


def _q(statement: LiteralString) -> LiteralString:
    """A shared statement with psycopg's placeholders."""
    return statement.replace("?", "%s")


class PostgresStore:
    """A ``ManagerStore`` on PostgreSQL; the pool opens on first use."""

    def __init__(self, dsn: str, *, pool_size: int = 10, timeout_s: float = 10.0) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout_s = timeout_s
        self._pool: psycopg_pool.AsyncConnectionPool[Connection] | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------ pool plumbing

    async def _ready_pool(self) -> psycopg_pool.AsyncConnectionPool[Connection]:
        if self._closed:
            raise Unavailable("the store is closed")
        async with self._open_lock:
            if self._pool is None:
                self._pool = await self._open_pool()
        return self._pool

    async def _open_pool(self) -> psycopg_pool.AsyncConnectionPool[Connection]:
        pool: psycopg_pool.AsyncConnectionPool[Connection] = psycopg_pool.AsyncConnectionPool(
            self._dsn,
            min_size=self._pool_size,
            max_size=self._pool_size,
            open=False,
            kwargs={"autocommit": True},
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            timeout=self._timeout_s,
            name="reconciler-manager",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout_s)
        except psycopg_pool.PoolTimeout as exc:
            await pool.close()
            raise Unavailable(f"PostgreSQL: no connection within {self._timeout_s} s") from exc
        return pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        pool = await self._ready_pool()
        try:
            async with pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable(f"PostgreSQL: {exc}") from exc

    async def _fetch_one(self, statement: LiteralString, params: Sequence[Any]) -> Any:
        async with self._connection() as conn:
            return await (await conn.execute(_q(statement), params)).fetchone()

    async def _fetch_all(self, statement: LiteralString, params: Sequence[Any] = ()) -> Any:
        async with self._connection() as conn:
            return await (await conn.execute(_q(statement), params)).fetchall()

    async def migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_LOCK, (_MIGRATE_LOCK,))
            await conn.execute(sql.SCHEMA_VERSION_CREATE)
            row = await (await conn.execute(sql.SCHEMA_VERSION_SELECT)).fetchone()
            current = int(row[0]) if row is not None else 0
            if current > _LATEST:
                raise SchemaTooNew(found=current, known=_LATEST)
            for version, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(_q(sql.SCHEMA_VERSION_INSERT), (version, time.time()))

    async def close(self) -> None:
        self._closed = True
        async with self._open_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # ----------------------------------------------------------------------------- nodes

    async def upsert_node(self, node: NodeRecord) -> NodeRecord:
        return sql.node_from_row(await self._fetch_one(sql.UPSERT_NODE, sql.node_params(node)))

    async def get_node(self, node_id: str) -> NodeRecord | None:
        row = await self._fetch_one(sql.GET_NODE, (node_id,))
        return sql.node_from_row(row) if row is not None else None

    async def list_nodes(self) -> list[NodeRecord]:
        return [sql.node_from_row(row) for row in await self._fetch_all(sql.LIST_NODES)]

    async def record_heartbeat(
        self, node_id: str, *, at: float, current_generation: int, observed_generation: int
    ) -> NodeRecord | None:
        params = (at, current_generation, observed_generation, node_id)
        row = await self._fetch_one(sql.RECORD_HEARTBEAT, params)
        return sql.node_from_row(row) if row is not None else None

    async def record_heartbeats(self, beats: Sequence[HeartbeatRecord]) -> None:
        check_heartbeats(beats)
        # In node id order, so two replicas' batches lock rows in one order (no deadlock).
        rows = [sql.heartbeat_params(b) for b in sorted(beats, key=lambda b: b.node_id)]
        if not rows:
            return
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(_q(sql.RECORD_HEARTBEAT_IF_NEWER), rows)

    async def list_liveness(self) -> list[NodeLivenessRecord]:
        return [sql.liveness_from_row(row) for row in await self._fetch_all(sql.LIST_LIVENESS)]

    async def delete_node(self, node_id: str) -> bool:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_q(sql.DELETE_OBSERVED_OF_NODE), (node_id,))
            await conn.execute(_q(sql.DELETE_READINESS_MARK), (node_id,))
            return (await conn.execute(_q(sql.DELETE_NODE), (node_id,))).rowcount > 0

    async def claim_readiness(self, node_id: str, mark: str) -> bool:
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(_q(sql.CLAIM_READINESS_MARK), (node_id, mark))
            return cursor.rowcount > 0

    # ------------------------------------------------------------------ AgentSets, apply

    async def get_agent_set(self, name: str) -> AgentSetRecord | None:
        row = await self._fetch_one(sql.GET_AGENT_SET, (name,))
        return sql.agent_set_from_row(row) if row is not None else None

    async def list_agent_sets(self) -> list[AgentSetRecord]:
        return [sql.agent_set_from_row(r) for r in await self._fetch_all(sql.LIST_AGENT_SETS)]

    async def apply(self, change: ApplyChange) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_LOCK, (_APPLY_LOCK,))
            await _check_apply(conn, change)
            if change.agent_set is not None:
                await conn.execute(_q(sql.PUT_AGENT_SET), sql.agent_set_params(change.agent_set))
            elif change.delete_name is not None:
                await conn.execute(_q(sql.DELETE_AGENT_SET), (change.delete_name,))
            if change.desired:
                async with conn.cursor() as cur:
                    rows = [sql.desired_params(d) for d in change.desired]
                    await cur.executemany(_q(sql.PUT_DESIRED), rows)

    async def get_desired(self, node_id: str) -> DesiredRecord | None:
        row = await self._fetch_one(sql.GET_DESIRED, (node_id,))
        return sql.desired_from_row(row) if row is not None else None

    async def list_desired(self) -> list[DesiredRecord]:
        return [sql.desired_from_row(row) for row in await self._fetch_all(sql.LIST_DESIRED)]

    # -------------------------------------------------------------------------- observed

    async def put_observed(self, node_id: str, agents: Sequence[ObservedAgentRecord]) -> None:
        check_observed(node_id, agents)
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_q(sql.DELETE_OBSERVED_OF_NODE), (node_id,))
            if agents:
                async with conn.cursor() as cur:
                    rows = [sql.observed_params(agent) for agent in agents]
                    await cur.executemany(_q(sql.INSERT_OBSERVED), rows)

    async def list_observed(self, node_id: str | None = None) -> list[ObservedAgentRecord]:
        if node_id is None:
            rows = await self._fetch_all(sql.LIST_OBSERVED)
        else:
            rows = await self._fetch_all(sql.LIST_OBSERVED_OF_NODE, (node_id,))
        return [sql.observed_from_row(row) for row in rows]

    # --------------------------------------------------------------------------- metrics

    async def add_metrics(self, points: Sequence[MetricPointRecord], *, keep_after: float) -> None:
        async with self._connection() as conn, conn.transaction():
            if points:
                async with conn.cursor() as cur:
                    rows = [sql.metric_params(point) for point in points]
                    await cur.executemany(_q(sql.INSERT_METRIC), rows)
            await conn.execute(_q(sql.PRUNE_METRICS), (keep_after,))

    async def query_metrics(
        self, node_id: str, agent_id: str, *, since: float
    ) -> list[MetricPointRecord]:
        rows = await self._fetch_all(sql.QUERY_METRICS, (node_id, agent_id, since))
        return [sql.metric_from_row(row) for row in rows]

    # ---------------------------------------------------------------------------- events

    async def add_events(
        self, events: Sequence[EventRecord], *, keep_last: int
    ) -> list[EventRecord]:
        check_events_args(keep_last=keep_last)
        added: list[EventRecord] = []
        if not events:
            return added
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_LOCK, (_EVENTS_LOCK,))
            for event in events:
                cur = await conn.execute(_q(sql.INSERT_EVENT), sql.event_params(event))
                row = await cur.fetchone()
                assert row is not None
                added.append(dataclasses.replace(event, sequence=int(row[0])))
            await conn.execute(_q(sql.PRUNE_EVENTS), (added[-1].sequence - keep_last,))
        return added

    async def list_events(
        self,
        *,
        after_sequence: int = 0,
        node_id: str | None = None,
        agent_id: str | None = None,
        limit: int = 1000,
    ) -> list[EventRecord]:
        check_limit(limit)
        query, params = sql.events_query(
            after_sequence=after_sequence, node_id=node_id, agent_id=agent_id, limit=limit
        )
        return [sql.event_from_row(row) for row in await self._fetch_all(query, params)]


async def _check_apply(conn: Connection, change: ApplyChange) -> None:
    """Raise ``Conflict`` when the AgentSet's revision or a node's generation moved on."""
    if change.target_name is not None:
        cur = await conn.execute(_q(sql.GET_AGENT_SET), (change.target_name,))
        row = await cur.fetchone()
        check_revision(change, int(row[1]) if row is not None else None)
    if not change.desired:
        return
    node_ids = [d.node_id for d in change.desired]
    cur = await conn.execute(_DESIRED_GENERATIONS, (node_ids,))
    stored = {str(node_id): int(generation) for node_id, generation in await cur.fetchall()}
    for desired in change.desired:
        check_desired_generation(
            desired.node_id, offered=desired.generation, stored=stored.get(desired.node_id)
        )


if TYPE_CHECKING:  # mypy checks that the class implements the Protocol
    from reconciler.manager.store import ManagerStore

    def _implements_protocol(store: PostgresStore) -> ManagerStore:
        return store

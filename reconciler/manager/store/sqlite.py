"""``SqliteStore``: the Manager's default store, one SQLite file in the state directory.

One connection, opened and used only by one dedicated worker thread; every method is a
small function the event loop hands to that thread, so the loop never blocks on disk
and no two statements race on the connection. Several ``SqliteStore`` objects (or
processes) on one file stay correct: writes take the database lock up front
(``BEGIN IMMEDIATE``) and wait for it up to ``busy_timeout_s``; a lock still held then
raises ``Unavailable``.

Durability: WAL journal with ``synchronous=NORMAL`` (a commit is safe against a crash
of the Manager; a power loss may drop the last few commits, never corrupt the file),
except ``apply``, which switches to ``synchronous=FULL`` for its transaction. A lost
heartbeat, observed state, metric or event is reported again by the daemons, but a lost
desired generation could be handed out a second time with different contents after a
push already reached a daemon, so that one commit waits for the disk. Its WAL sync also
covers every earlier commit.

The file (and its ``-wal`` and ``-shm`` companions, which SQLite creates with the same
mode) is 0600 in a 0700 directory created when missing; a symlink is refused, and so
is a directory that is a symlink or writable by group or others (``UnsafeStateDir``).

What it does not do: share one connection between threads, or retry: a caller that
gets ``Unavailable`` retries with its own backoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

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
from reconciler.model.errors import PermanentError, Unavailable

__all__ = ["MIGRATIONS", "SqliteStore", "UnsafeStateDir"]

T = TypeVar("T")

#: (version, statements) in order; a released version is never edited, only appended to.
MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            "CREATE TABLE nodes (node_id TEXT PRIMARY KEY, hostname TEXT NOT NULL,"
            " ip TEXT NOT NULL, labels TEXT NOT NULL, version TEXT NOT NULL,"
            " daemon_address TEXT NOT NULL, capabilities TEXT NOT NULL,"
            " registered_at REAL NOT NULL, last_heartbeat_at REAL NOT NULL,"
            " observed_generation INTEGER NOT NULL, current_generation INTEGER NOT NULL)",
            "CREATE TABLE agent_sets (name TEXT PRIMARY KEY, revision INTEGER NOT NULL,"
            " document TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)",
            "CREATE TABLE desired (node_id TEXT PRIMARY KEY, generation INTEGER NOT NULL,"
            " agents TEXT NOT NULL, updated_at REAL NOT NULL)",
            "CREATE TABLE observed (node_id TEXT NOT NULL, agent_id TEXT NOT NULL,"
            " info TEXT NOT NULL, updated_at REAL NOT NULL,"
            " PRIMARY KEY (node_id, agent_id)) WITHOUT ROWID",
            "CREATE TABLE metrics (node_id TEXT NOT NULL, agent_id TEXT NOT NULL,"
            " time REAL NOT NULL, cpu_percent REAL NOT NULL, memory_bytes INTEGER NOT NULL,"
            " PRIMARY KEY (node_id, agent_id, time)) WITHOUT ROWID",
            "CREATE INDEX metrics_by_time ON metrics (time)",
            "CREATE TABLE events (sequence INTEGER PRIMARY KEY AUTOINCREMENT,"
            " time REAL NOT NULL, node_id TEXT NOT NULL, agent_id TEXT,"
            " type TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL)",
            "CREATE INDEX events_by_node ON events (node_id, sequence)",
            "CREATE INDEX events_by_agent ON events (node_id, agent_id, sequence)",
        ),
    ),
    (2, ("CREATE TABLE readiness_marks (node_id TEXT PRIMARY KEY, mark TEXT NOT NULL)",)),
)
_LATEST: Final = MIGRATIONS[-1][0]


class SqliteStore:
    """A ``ManagerStore`` on one SQLite file; connects on first use."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self._path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manager-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    # ------------------------------------------------------------------ worker plumbing

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable("the store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._in_worker, work)
        except (sqlite3.OperationalError, OSError) as exc:
            raise Unavailable(f"SQLite database {self._path}: {exc}") from exc

    def _in_worker(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = _connect(self._path, busy_timeout_s=self._busy_timeout_s)
        return work(self._conn)

    def _close_in_worker(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def migrate(self) -> None:
        await self._run(_migrate)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_in_worker)
        self._executor.shutdown(wait=False)

    # ----------------------------------------------------------------------------- nodes

    async def upsert_node(self, node: NodeRecord) -> NodeRecord:
        def work(conn: sqlite3.Connection) -> NodeRecord:
            with _immediate(conn):
                row = _one(conn.execute(sql.UPSERT_NODE, sql.node_params(node)))
            return sql.node_from_row(row)

        return await self._run(work)

    async def get_node(self, node_id: str) -> NodeRecord | None:
        def work(conn: sqlite3.Connection) -> NodeRecord | None:
            row = conn.execute(sql.GET_NODE, (node_id,)).fetchone()
            return sql.node_from_row(row) if row is not None else None

        return await self._run(work)

    async def list_nodes(self) -> list[NodeRecord]:
        def work(conn: sqlite3.Connection) -> list[NodeRecord]:
            return [sql.node_from_row(row) for row in conn.execute(sql.LIST_NODES)]

        return await self._run(work)

    async def record_heartbeat(
        self, node_id: str, *, at: float, current_generation: int, observed_generation: int
    ) -> NodeRecord | None:
        params = (at, current_generation, observed_generation, node_id)

        def work(conn: sqlite3.Connection) -> NodeRecord | None:
            with _immediate(conn):
                row = _one(conn.execute(sql.RECORD_HEARTBEAT, params))
            return sql.node_from_row(row) if row is not None else None

        return await self._run(work)

    async def record_heartbeats(self, beats: Sequence[HeartbeatRecord]) -> None:
        check_heartbeats(beats)
        rows = [sql.heartbeat_params(beat) for beat in beats]
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                conn.executemany(sql.RECORD_HEARTBEAT_IF_NEWER, rows)

        await self._run(work)

    async def list_liveness(self) -> list[NodeLivenessRecord]:
        def work(conn: sqlite3.Connection) -> list[NodeLivenessRecord]:
            return [sql.liveness_from_row(row) for row in conn.execute(sql.LIST_LIVENESS)]

        return await self._run(work)

    async def delete_node(self, node_id: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            with _immediate(conn):
                conn.execute(sql.DELETE_OBSERVED_OF_NODE, (node_id,))
                conn.execute(sql.DELETE_READINESS_MARK, (node_id,))
                return conn.execute(sql.DELETE_NODE, (node_id,)).rowcount > 0

        return await self._run(work)

    async def claim_readiness(self, node_id: str, mark: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            with _immediate(conn):
                return conn.execute(sql.CLAIM_READINESS_MARK, (node_id, mark)).rowcount > 0

        return await self._run(work)

    # ------------------------------------------------------------------ AgentSets, apply

    async def get_agent_set(self, name: str) -> AgentSetRecord | None:
        def work(conn: sqlite3.Connection) -> AgentSetRecord | None:
            row = conn.execute(sql.GET_AGENT_SET, (name,)).fetchone()
            return sql.agent_set_from_row(row) if row is not None else None

        return await self._run(work)

    async def list_agent_sets(self) -> list[AgentSetRecord]:
        def work(conn: sqlite3.Connection) -> list[AgentSetRecord]:
            return [sql.agent_set_from_row(row) for row in conn.execute(sql.LIST_AGENT_SETS)]

        return await self._run(work)

    async def apply(self, change: ApplyChange) -> None:
        await self._run(lambda conn: _apply(conn, change))

    async def get_desired(self, node_id: str) -> DesiredRecord | None:
        def work(conn: sqlite3.Connection) -> DesiredRecord | None:
            row = conn.execute(sql.GET_DESIRED, (node_id,)).fetchone()
            return sql.desired_from_row(row) if row is not None else None

        return await self._run(work)

    async def list_desired(self) -> list[DesiredRecord]:
        def work(conn: sqlite3.Connection) -> list[DesiredRecord]:
            return [sql.desired_from_row(row) for row in conn.execute(sql.LIST_DESIRED)]

        return await self._run(work)

    # -------------------------------------------------------------------------- observed

    async def put_observed(self, node_id: str, agents: Sequence[ObservedAgentRecord]) -> None:
        check_observed(node_id, agents)
        rows = [sql.observed_params(agent) for agent in agents]

        def work(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                conn.execute(sql.DELETE_OBSERVED_OF_NODE, (node_id,))
                conn.executemany(sql.INSERT_OBSERVED, rows)

        await self._run(work)

    async def list_observed(self, node_id: str | None = None) -> list[ObservedAgentRecord]:
        def work(conn: sqlite3.Connection) -> list[ObservedAgentRecord]:
            if node_id is None:
                rows = conn.execute(sql.LIST_OBSERVED)
            else:
                rows = conn.execute(sql.LIST_OBSERVED_OF_NODE, (node_id,))
            return [sql.observed_from_row(row) for row in rows]

        return await self._run(work)

    # --------------------------------------------------------------------------- metrics

    async def add_metrics(self, points: Sequence[MetricPointRecord], *, keep_after: float) -> None:
        rows = [sql.metric_params(point) for point in points]

        def work(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                conn.executemany(sql.INSERT_METRIC, rows)
                conn.execute(sql.PRUNE_METRICS, (keep_after,))

        await self._run(work)

    async def query_metrics(
        self, node_id: str, agent_id: str, *, since: float
    ) -> list[MetricPointRecord]:
        def work(conn: sqlite3.Connection) -> list[MetricPointRecord]:
            rows = conn.execute(sql.QUERY_METRICS, (node_id, agent_id, since))
            return [sql.metric_from_row(row) for row in rows]

        return await self._run(work)

    # ---------------------------------------------------------------------------- events

    async def add_events(
        self, events: Sequence[EventRecord], *, keep_last: int
    ) -> list[EventRecord]:
        check_events_args(keep_last=keep_last)
        return await self._run(lambda conn: _add_events(conn, events, keep_last=keep_last))

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

        def work(conn: sqlite3.Connection) -> list[EventRecord]:
            return [sql.event_from_row(row) for row in conn.execute(query, params)]

        return await self._run(work)


# ------------------------------------------------------------------ in the worker thread


class UnsafeStateDir(PermanentError):
    """The database's directory is a symlink or writable by group or others."""


def _check_directory(directory: Path) -> None:
    """Refuse a directory in which someone else could swap or plant the database."""
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeStateDir(f"state directory {directory} is a symlink; use the real path")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStateDir(
            f"state directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 0700 {directory}"
        )


def _connect(path: Path, *, busy_timeout_s: float) -> sqlite3.Connection:
    """Create the directory (0700) and file (0600) when missing, then connect."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_directory(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _one(cursor: sqlite3.Cursor) -> Any:
    """The first row of a ``RETURNING`` statement, read to its end so the statement is
    finished before the transaction commits; ``None`` when there is none."""
    rows = cursor.fetchall()
    return rows[0] if rows else None


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds the database lock from its start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    with _immediate(conn):
        conn.execute(sql.SCHEMA_VERSION_CREATE)
        current = int(conn.execute(sql.SCHEMA_VERSION_SELECT).fetchone()[0])
        if current > _LATEST:
            raise SchemaTooNew(found=current, known=_LATEST)
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(sql.SCHEMA_VERSION_INSERT, (version, time.time()))


def _apply(conn: sqlite3.Connection, change: ApplyChange) -> None:
    conn.execute("PRAGMA synchronous=FULL")
    try:
        with _immediate(conn):
            _check_apply(conn, change)
            _write_apply(conn, change)
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")


def _check_apply(conn: sqlite3.Connection, change: ApplyChange) -> None:
    if change.target_name is not None:
        row = conn.execute(sql.GET_AGENT_SET, (change.target_name,)).fetchone()
        check_revision(change, int(row[1]) if row is not None else None)
    for desired in change.desired:
        row = conn.execute(sql.GET_DESIRED, (desired.node_id,)).fetchone()
        stored = int(row[1]) if row is not None else None
        check_desired_generation(desired.node_id, offered=desired.generation, stored=stored)


def _write_apply(conn: sqlite3.Connection, change: ApplyChange) -> None:
    if change.agent_set is not None:
        conn.execute(sql.PUT_AGENT_SET, sql.agent_set_params(change.agent_set))
    elif change.delete_name is not None:
        conn.execute(sql.DELETE_AGENT_SET, (change.delete_name,))
    conn.executemany(sql.PUT_DESIRED, [sql.desired_params(d) for d in change.desired])


def _add_events(
    conn: sqlite3.Connection, events: Sequence[EventRecord], *, keep_last: int
) -> list[EventRecord]:
    added: list[EventRecord] = []
    if not events:
        return added
    with _immediate(conn):
        for event in events:
            row = _one(conn.execute(sql.INSERT_EVENT, sql.event_params(event)))
            added.append(dataclasses.replace(event, sequence=int(row[0])))
        conn.execute(sql.PRUNE_EVENTS, (added[-1].sequence - keep_last,))
    return added


if TYPE_CHECKING:  # mypy checks that the class implements the Protocol
    from reconciler.manager.store import ManagerStore

    def _implements_protocol(store: SqliteStore) -> ManagerStore:
        return store

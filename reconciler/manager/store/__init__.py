"""The Manager's store: one Protocol, three implementations, one way to pick.

::

    ManagerStore (Protocol)
    ├── SqliteStore     sqlite.py: the default; one file in the state directory
    ├── PostgresStore   postgres.py: several Manager replicas over one database
    └── MemoryStore     memory.py: the fake for unit tests of the services

All three pass one test suite (``tests/integration/test_manager_store.py``). Every
method may raise ``Unavailable`` when the database cannot be reached (the caller
retries); ``apply`` raises ``Conflict`` when the stored state moved on; shape errors
raise ``InvalidArgument``. A failing call changes nothing.

What this package does not do: decide what a node should run (``plan.py``) or derive a
node's Ready status (the services do, from ``last_heartbeat_at``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from reconciler.config import ManagerSettings, StoreBackend
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

__all__ = ["ManagerStore", "open_store", "sqlite_path_of"]

SQLITE_FILE_NAME = "manager.db"


class ManagerStore(Protocol):
    """What the Manager keeps: nodes, AgentSets, desired and observed state, metrics
    and events. Lists come back in key order (events by sequence, metrics by time)."""

    async def migrate(self) -> None:
        """Create or upgrade the schema; safe to call again and from several replicas."""

    async def close(self) -> None:
        """Release connections; later calls raise ``Unavailable``."""

    async def upsert_node(self, node: NodeRecord) -> NodeRecord:
        """Insert or update a node; an existing id keeps its ``registered_at``. Returns
        the stored record (with its derived ``desired_generation``)."""

    async def get_node(self, node_id: str) -> NodeRecord | None: ...

    async def list_nodes(self) -> list[NodeRecord]: ...

    async def record_heartbeat(
        self, node_id: str, *, at: float, current_generation: int, observed_generation: int
    ) -> NodeRecord | None:
        """Note a node's heartbeat; ``None`` when the node is unknown."""

    async def record_heartbeats(self, beats: Sequence[HeartbeatRecord]) -> None:
        """Note many heartbeats (at most one per node) in one transaction. A beat
        changes its node only when it is not older than the stored heartbeat; a beat
        of an unknown node changes nothing."""

    async def list_liveness(self) -> list[NodeLivenessRecord]:
        """Every node's last heartbeat and desired generation, by node id: what
        heartbeat answers and the readiness sweep need, without the rest."""

    async def delete_node(self, node_id: str) -> bool:
        """Forget a node and its observed agents (its desired generation stays, so it
        never goes back); ``False`` when it was unknown."""

    async def claim_readiness(self, node_id: str, mark: str) -> bool:
        """Record ``mark`` (one readiness change of the node, the same text on every
        replica) as reported; True only for the first call with that mark, so one
        replica of several records the change's event."""

    async def get_agent_set(self, name: str) -> AgentSetRecord | None: ...

    async def list_agent_sets(self) -> list[AgentSetRecord]: ...

    async def apply(self, change: ApplyChange) -> None:
        """Write ``change`` in one transaction, serialised across replicas; ``Conflict``
        (and nothing written) when the revision or a generation moved on."""

    async def get_desired(self, node_id: str) -> DesiredRecord | None: ...

    async def list_desired(self) -> list[DesiredRecord]: ...

    async def put_observed(self, node_id: str, agents: Sequence[ObservedAgentRecord]) -> None:
        """Replace the node's whole set of observed agents."""

    async def list_observed(self, node_id: str | None = None) -> list[ObservedAgentRecord]: ...

    async def add_metrics(self, points: Sequence[MetricPointRecord], *, keep_after: float) -> None:
        """Add samples (a repeated sample is kept once) and drop those older than
        ``keep_after``."""

    async def query_metrics(
        self, node_id: str, agent_id: str, *, since: float
    ) -> list[MetricPointRecord]: ...

    async def add_events(
        self, events: Sequence[EventRecord], *, keep_last: int
    ) -> list[EventRecord]:
        """Add events, returning them with their sequences; keep the newest
        ``keep_last`` events in all."""

    async def list_events(
        self,
        *,
        after_sequence: int = 0,
        node_id: str | None = None,
        agent_id: str | None = None,
        limit: int = 1000,
    ) -> list[EventRecord]: ...


def sqlite_path_of(settings: ManagerSettings) -> Path:
    """The SQLite file: ``store.sqlite_path``, else ``<state_dir>/manager.db``."""
    if settings.store.sqlite_path:
        return Path(settings.store.sqlite_path)
    return Path(settings.state_dir) / SQLITE_FILE_NAME


def open_store(settings: ManagerSettings) -> ManagerStore:
    """The configured backend, not yet connected: it connects on first use, so call
    ``await store.migrate()`` first (a connection failure there raises ``Unavailable``)."""
    if settings.store.backend is StoreBackend.POSTGRES:
        from reconciler.manager.store.postgres import PostgresStore

        return PostgresStore(settings.store.postgres_dsn, pool_size=settings.store.pool_size)
    from reconciler.manager.store.sqlite import SqliteStore

    return SqliteStore(sqlite_path_of(settings))

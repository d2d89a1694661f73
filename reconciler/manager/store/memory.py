"""``MemoryStore``: the ``ManagerStore`` fake for unit tests of the Manager's services.

It keeps everything in dicts on the event loop and follows the same rules as the SQL
backends (it passes the same suite), including ``Conflict`` on a stale revision or
generation and the bounded metrics and events. ``set_available(False)`` makes every
call raise ``Unavailable``, to test a caller's retries.

What it does not do: persist anything, or share state between instances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
from reconciler.manager.store.common import (
    check_desired_generation,
    check_events_args,
    check_heartbeats,
    check_limit,
    check_observed,
    check_revision,
)
from reconciler.model.errors import Unavailable

__all__ = ["MemoryStore"]

_MetricKey = tuple[str, str, float]


class MemoryStore:
    """Everything in dicts; records are frozen, so handing them out is safe."""

    def __init__(self) -> None:
        self._available = True
        self._closed = False
        self._nodes: dict[str, NodeRecord] = {}
        self._agent_sets: dict[str, AgentSetRecord] = {}
        self._desired: dict[str, DesiredRecord] = {}
        self._observed: dict[tuple[str, str], ObservedAgentRecord] = {}
        self._readiness_marks: dict[str, str] = {}
        self._metrics: dict[_MetricKey, MetricPointRecord] = {}
        self._events: list[EventRecord] = []
        self._last_sequence = 0

    def set_available(self, available: bool) -> None:
        """While ``False`` every call raises ``Unavailable``."""
        self._available = available

    def _check(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed")
        if not self._available:
            raise Unavailable("the store is unavailable")

    def _with_desired(self, node: NodeRecord) -> NodeRecord:
        desired = self._desired.get(node.node_id)
        generation = desired.generation if desired is not None else 0
        return dataclasses.replace(node, labels=dict(node.labels), desired_generation=generation)

    async def migrate(self) -> None:
        self._check()

    async def close(self) -> None:
        self._closed = True

    async def upsert_node(self, node: NodeRecord) -> NodeRecord:
        self._check()
        old = self._nodes.get(node.node_id)
        registered_at = old.registered_at if old is not None else node.registered_at
        stored = dataclasses.replace(
            node, labels=dict(node.labels), registered_at=registered_at, desired_generation=0
        )
        self._nodes[node.node_id] = stored
        return self._with_desired(stored)

    async def get_node(self, node_id: str) -> NodeRecord | None:
        self._check()
        node = self._nodes.get(node_id)
        return self._with_desired(node) if node is not None else None

    async def list_nodes(self) -> list[NodeRecord]:
        self._check()
        return [self._with_desired(self._nodes[k]) for k in sorted(self._nodes)]

    async def record_heartbeat(
        self, node_id: str, *, at: float, current_generation: int, observed_generation: int
    ) -> NodeRecord | None:
        self._check()
        node = self._nodes.get(node_id)
        if node is None:
            return None
        node = dataclasses.replace(
            node,
            last_heartbeat_at=at,
            current_generation=current_generation,
            observed_generation=observed_generation,
        )
        self._nodes[node_id] = node
        return self._with_desired(node)

    async def record_heartbeats(self, beats: Sequence[HeartbeatRecord]) -> None:
        check_heartbeats(beats)
        self._check()
        for beat in beats:
            node = self._nodes.get(beat.node_id)
            if node is not None and node.last_heartbeat_at <= beat.at:
                self._nodes[beat.node_id] = dataclasses.replace(
                    node,
                    last_heartbeat_at=beat.at,
                    current_generation=beat.current_generation,
                    observed_generation=beat.observed_generation,
                )

    async def list_liveness(self) -> list[NodeLivenessRecord]:
        self._check()
        return [
            NodeLivenessRecord(k, self._nodes[k].last_heartbeat_at, self._generation_of(k))
            for k in sorted(self._nodes)
        ]

    def _generation_of(self, node_id: str) -> int:
        desired = self._desired.get(node_id)
        return desired.generation if desired is not None else 0

    async def delete_node(self, node_id: str) -> bool:
        self._check()
        for key in [k for k in self._observed if k[0] == node_id]:
            del self._observed[key]
        self._readiness_marks.pop(node_id, None)
        return self._nodes.pop(node_id, None) is not None

    async def claim_readiness(self, node_id: str, mark: str) -> bool:
        self._check()
        if self._readiness_marks.get(node_id) == mark:
            return False
        self._readiness_marks[node_id] = mark
        return True

    async def get_agent_set(self, name: str) -> AgentSetRecord | None:
        self._check()
        return self._agent_sets.get(name)

    async def list_agent_sets(self) -> list[AgentSetRecord]:
        self._check()
        return [self._agent_sets[k] for k in sorted(self._agent_sets)]

    async def apply(self, change: ApplyChange) -> None:
        self._check()
        stored = self._agent_sets.get(change.target_name) if change.target_name else None
        if change.target_name is not None:
            check_revision(change, stored.revision if stored is not None else None)
        for desired in change.desired:
            old = self._desired.get(desired.node_id)
            check_desired_generation(
                desired.node_id,
                offered=desired.generation,
                stored=old.generation if old is not None else None,
            )
        if change.agent_set is not None:
            kept = stored.created_at if stored is not None else change.agent_set.created_at
            self._agent_sets[change.agent_set.name] = dataclasses.replace(
                change.agent_set, created_at=kept
            )
        elif change.delete_name is not None:
            self._agent_sets.pop(change.delete_name, None)
        for desired in change.desired:
            self._desired[desired.node_id] = desired

    async def get_desired(self, node_id: str) -> DesiredRecord | None:
        self._check()
        return self._desired.get(node_id)

    async def list_desired(self) -> list[DesiredRecord]:
        self._check()
        return [self._desired[k] for k in sorted(self._desired)]

    async def put_observed(self, node_id: str, agents: Sequence[ObservedAgentRecord]) -> None:
        self._check()
        check_observed(node_id, agents)
        for key in [k for k in self._observed if k[0] == node_id]:
            del self._observed[key]
        for agent in agents:
            self._observed[(node_id, agent.agent_id)] = agent

    async def list_observed(self, node_id: str | None = None) -> list[ObservedAgentRecord]:
        self._check()
        keys = sorted(k for k in self._observed if node_id is None or k[0] == node_id)
        return [self._observed[k] for k in keys]

    async def add_metrics(self, points: Sequence[MetricPointRecord], *, keep_after: float) -> None:
        self._check()
        for point in points:
            self._metrics.setdefault((point.node_id, point.agent_id, point.time), point)
        for key in [k for k in self._metrics if k[2] < keep_after]:
            del self._metrics[key]

    async def query_metrics(
        self, node_id: str, agent_id: str, *, since: float
    ) -> list[MetricPointRecord]:
        self._check()
        keys = sorted(
            k for k in self._metrics if k[0] == node_id and k[1] == agent_id and k[2] >= since
        )
        return [self._metrics[k] for k in keys]

    async def add_events(
        self, events: Sequence[EventRecord], *, keep_last: int
    ) -> list[EventRecord]:
        self._check()
        check_events_args(keep_last=keep_last)
        added = []
        for event in events:
            self._last_sequence += 1
            added.append(dataclasses.replace(event, sequence=self._last_sequence))
        self._events.extend(added)
        del self._events[: max(0, len(self._events) - keep_last)]
        return added

    async def list_events(
        self,
        *,
        after_sequence: int = 0,
        node_id: str | None = None,
        agent_id: str | None = None,
        limit: int = 1000,
    ) -> list[EventRecord]:
        self._check()
        check_limit(limit)
        found = [
            e
            for e in self._events
            if e.sequence > after_sequence
            and (node_id is None or e.node_id == node_id)
            and (agent_id is None or e.agent_id == agent_id)
        ]
        return found[:limit]


if TYPE_CHECKING:  # mypy checks that the class implements the Protocol
    from reconciler.manager.store import ManagerStore

    def _implements_protocol(store: MemoryStore) -> ManagerStore:
        return store

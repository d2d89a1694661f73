"""``NodeTable``: every node's last heartbeat and desired generation, in memory, so a
heartbeat is answered without a store round-trip.

The table knows which nodes are registered and each one's desired generation. It
learns them from the store (``refresh`` reads ``list_liveness`` for all nodes; a
node it does not know is looked up once with ``get_node``), from registrations here
(``registered``) and from desired state written here (``desired_written``, called by
``fleet.FleetChanges`` after each ``apply``). A desired generation only grows, so the
table keeps the larger of what it holds and what it reads.

Heartbeats are written behind: ``beat`` keeps the newest beat of each node, and
``flush`` writes them all in one ``record_heartbeats`` transaction (``run`` flushes
every ``flush_interval_s``, ``close`` once more at stop). A beat never moves a node's
stored heartbeat back, so batches of several replicas land in any order. What the
write-behind costs:

- another replica sees a heartbeat here up to ``flush_interval_s`` late (far below
  ``nodes.not_ready_after_s``); this replica sees it at once (``seen_at``, ``overlay``);
- a replica that dies loses at most one batch: its nodes' next heartbeats (to any
  replica) record them again;
- a desired generation written by another replica reaches heartbeat answers here at
  the next ``refresh`` (``run`` refreshes after every flush): that replica pushes it,
  and a daemon that missed the push pulls when an answer shows it is behind;
- a node deleted by another replica is answered ``known`` until the next ``refresh``.

What it does not do: judge Ready or NotReady (``service.Readiness`` does, from
``seen_at`` and ``last_heartbeats``), or retry a failed flush on its own schedule (the
beats stay queued for the next one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from reconciler.manager.records import DesiredRecord, HeartbeatRecord, NodeRecord
from reconciler.manager.store import ManagerStore

__all__ = ["FLUSH_INTERVAL_S", "NodeTable", "flush_interval_for"]

log = logging.getLogger(__name__)

#: Longest wait before a heartbeat is written to the store.
FLUSH_INTERVAL_S: Final = 1.0


def flush_interval_for(not_ready_after_s: float) -> float:
    """``FLUSH_INTERVAL_S``, or a tenth of ``not_ready_after_s`` when that is shorter."""
    return max(0.01, min(FLUSH_INTERVAL_S, not_ready_after_s / 10))


class NodeTable:
    """Registered nodes, their desired generations and the heartbeats seen here."""

    def __init__(
        self,
        store: ManagerStore,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._flush_interval_s = flush_interval_s
        self._clock = clock
        self._generations: dict[str, int] = {}
        self._stored_at: dict[str, float] = {}
        self._seen: dict[str, HeartbeatRecord] = {}
        self._pending: dict[str, HeartbeatRecord] = {}
        self._flushing = asyncio.Lock()

    # -- answering -----------------------------------------------------------------

    async def desired_generation(self, node_id: str) -> int | None:
        """The node's desired generation; ``None`` when it is not registered."""
        generation = self._generations.get(node_id)
        if generation is not None:
            return generation
        node = await self._store.get_node(node_id)
        if node is None:
            return None
        return self._learn(node_id, node.desired_generation, node.last_heartbeat_at)

    async def beat(
        self, node_id: str, *, at: float, current_generation: int, observed_generation: int
    ) -> int | None:
        """Note a heartbeat (written at the next flush); the node's desired generation,
        or ``None`` (and nothing noted) when it is not registered."""
        generation = await self.desired_generation(node_id)
        if generation is None:
            return None
        record = HeartbeatRecord(node_id, at, current_generation, observed_generation)
        self._seen[node_id] = record
        self._pending[node_id] = record
        return generation

    def seen_at(self, node_id: str) -> float | None:
        """When this replica last saw the node heartbeat (``None``: not since start)."""
        seen = self._seen.get(node_id)
        return seen.at if seen is not None else None

    def overlay(self, node: NodeRecord) -> NodeRecord:
        """``node`` with a newer heartbeat seen here (maybe not yet stored) applied."""
        seen = self._seen.get(node.node_id)
        if seen is None or seen.at <= node.last_heartbeat_at:
            return node
        return dataclasses.replace(
            node,
            last_heartbeat_at=seen.at,
            current_generation=seen.current_generation,
            observed_generation=seen.observed_generation,
        )

    def last_heartbeats(self) -> dict[str, float]:
        """Every known node's newest heartbeat time, stored or seen here."""
        seen = self._seen
        return {
            node_id: max(stored_at, seen[node_id].at) if node_id in seen else stored_at
            for node_id, stored_at in self._stored_at.items()
        }

    # -- learning ------------------------------------------------------------------

    def _learn(self, node_id: str, generation: int, stored_at: float) -> int:
        known = max(generation, self._generations.get(node_id, 0))
        self._generations[node_id] = known
        self._stored_at[node_id] = max(stored_at, self._stored_at.get(node_id, stored_at))
        return known

    def registered(self, node: NodeRecord) -> None:
        """The node was just stored by a registration here (which counts as a beat)."""
        self._learn(node.node_id, node.desired_generation, node.last_heartbeat_at)
        pending = self._pending.get(node.node_id)
        if pending is not None and pending.at <= node.last_heartbeat_at:
            del self._pending[node.node_id]

    def desired_written(self, records: Iterable[DesiredRecord]) -> None:
        """Desired state was written here; registered nodes answer with it at once."""
        for record in records:
            if record.node_id in self._generations:
                self._generations[record.node_id] = max(
                    record.generation, self._generations[record.node_id]
                )

    async def refresh(self) -> None:
        """Read every node from the store: nodes registered or given desired state by
        other replicas are learnt, nodes deleted are forgotten."""
        rows = await self._store.list_liveness()
        generations = self._generations
        self._generations = {
            row.node_id: max(row.desired_generation, generations.get(row.node_id, 0))
            for row in rows
        }
        self._stored_at = {row.node_id: row.last_heartbeat_at for row in rows}
        for table in (self._seen, self._pending):
            for gone in [node_id for node_id in table if node_id not in self._generations]:
                del table[gone]

    # -- writing -------------------------------------------------------------------

    @property
    def pending(self) -> Mapping[str, HeartbeatRecord]:
        """The beats the next flush writes."""
        return self._pending

    async def flush(self) -> None:
        """Write the queued beats in one transaction; on failure they stay queued
        (unless a newer beat of the node arrived meanwhile) and the error propagates."""
        async with self._flushing:
            batch, self._pending = self._pending, {}
            if not batch:
                return
            try:
                await self._store.record_heartbeats(list(batch.values()))
            except BaseException:
                for node_id, beat in batch.items():
                    self._pending.setdefault(node_id, beat)
                raise
            for node_id, beat in batch.items():
                if node_id in self._stored_at:
                    self._stored_at[node_id] = max(beat.at, self._stored_at[node_id])

    async def run(self) -> None:
        """Every ``flush_interval_s`` until cancelled: flush, then refresh; store outages
        are logged (the beats stay queued)."""
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
                await self.refresh()
            except Exception:
                log.warning("node table: store unavailable", exc_info=True)

    async def close(self) -> None:
        """Write what is queued (at stop); an outage then loses one batch, logged."""
        try:
            await self.flush()
        except Exception:
            log.warning("lost %d heartbeats at stop", len(self._pending), exc_info=True)

"""The daemon's event log: a bounded history plus live subscribers.

The controller ``emit``s typed events as things happen; the Manager client drains
them to report upstream, and ``reconciler events`` reads them. A slow subscriber
loses its oldest events (counted), never slows the control loop or grows memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from reconciler.model.events import Event, EventType
from reconciler.model.ids import AgentId, NodeId

__all__ = ["EventLog", "Subscription"]

log = logging.getLogger(__name__)


class Subscription:
    """A bounded queue of events for one reader."""

    def __init__(self, log_: EventLog, *, capacity: int) -> None:
        self._log = log_
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=capacity)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def next(self) -> Event:
        """Wait for the next event."""
        return await self._queue.get()

    def drain(self) -> list[Event]:
        """Everything waiting now, without waiting."""
        events = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    def close(self) -> None:
        self._log.unsubscribe(self)


class EventLog:
    """Recent events of one node, and fan-out to subscribers."""

    def __init__(self, *, node_id: NodeId, wall: Callable[[], float], capacity: int = 1000) -> None:
        self._node_id = node_id
        self._wall = wall
        self._recent: deque[Event] = deque(maxlen=capacity)
        self._subscribers: list[Subscription] = []
        self.counts: dict[EventType, int] = {}

    def emit(
        self,
        type_: EventType,
        *,
        agent_id: AgentId | None = None,
        reason: str = "",
        message: str = "",
    ) -> Event:
        """Record an event and hand it to every subscriber."""
        event = Event(
            type=type_,
            time=self._wall(),
            node_id=self._node_id,
            agent_id=agent_id,
            reason=reason,
            message=message,
        )
        self._recent.append(event)
        self.counts[type_] = self.counts.get(type_, 0) + 1
        for subscriber in self._subscribers:
            subscriber.offer(event)
        log.info(
            "%s %s: %s",
            type_,
            agent_id or "-",
            message or reason,
            extra={"agent_id": agent_id, "event": str(type_)},
        )
        return event

    def recent(self, *, agent_id: AgentId | None = None, limit: int = 100) -> list[Event]:
        """The newest events, oldest first, optionally for one agent."""
        events = [e for e in self._recent if agent_id is None or e.agent_id == agent_id]
        return events[-limit:]

    def subscribe(self, *, capacity: int = 1000) -> Subscription:
        """A live feed of events from now on."""
        subscription = Subscription(self, capacity=capacity)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
